"""GGUF files into ropekit's model (ropekit.loading.gguf_file): q/k un-permutation, exact round trips of tiny
random models, de-quantization, rope metadata; ``slow`` tests load SmolLM2 and compare against transformers
loading the same GGUF."""

from __future__ import annotations

import copy

import gguf
import numpy as np
import pytest
import torch
from conftest import eval_text, float32_logits_atol
from file_edits import edited_gguf
from test_hostile_files import GGUFParts, V, tiny_gguf_parts
from tiny_llama import llama_cpp_permute, tiny_model, write_gguf

from ropekit.loading import load_model
from ropekit.loading.gguf_file import dequantize_tensor, reverse_permute
from ropekit.rope import apply_rotary, rope_cos_sin

# ---------------------------------------------------------------- q/k permutation


def test_reverse_permute_inverts_llama_cpp_permute():
    w = np.random.default_rng(0).standard_normal((3 * 16, 8)).astype(np.float32)
    for heads in (1, 3):
        np.testing.assert_array_equal(reverse_permute(llama_cpp_permute(w, heads), heads), w)


def test_permuted_rows_rotate_interleaved_like_half_layout():
    """Why the permutation exists: permuted q rotated interleaved = q rotated in the half layout."""
    torch.manual_seed(0)
    H, D, C, T = 2, 8, 12, 5
    w = torch.randn(H * D, C)
    x = torch.randn(1, T, C)
    cos, sin = rope_cos_sin(1.0 / 10000 ** (torch.arange(0, D, 2) / D), torch.arange(T))

    def rotated(weight, layout):
        q = (x @ weight.T).view(1, T, H, D).transpose(1, 2)  # [1, H, T, D]
        return apply_rotary(q, cos, sin, layout=layout)

    permuted = torch.from_numpy(llama_cpp_permute(w.numpy(), H))
    half = rotated(w, "half")  # HF
    interleaved = rotated(permuted, "interleaved")  # llama.cpp
    # llama.cpp's channel order is the permutation of HF's: apply it to the channels of the HF result.
    channel_perm = torch.from_numpy(llama_cpp_permute(np.arange(H * D)[:, None], H)[:, 0]).view(H, D)[0]
    torch.testing.assert_close(interleaved, half[..., channel_perm], atol=1e-6, rtol=0)


# ---------------------------------------------------------------- tiny GGUF round trips


def test_tiny_gguf_loads_exactly(tmp_path):
    model = tiny_model()
    path = write_gguf(tmp_path / "tiny.gguf", model)
    loaded, tokenizer = load_model(path)
    assert loaded.config == model.config
    ids = torch.randint(0, model.config.vocab_size, (2, 17))
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids), model(ids), atol=0, rtol=0)
    assert tokenizer.eos_token_id == 2 and tokenizer.bos_token_id == 1
    assert tokenizer.decode(tokenizer.encode("héllo <|im_end|>")) == "héllo <|im_end|>"
    assert tokenizer.encode("<|im_end|>") == [2]


def test_loaded_weights_share_one_arena_in_forward_order(tmp_path):
    """load_model puts the weights in one huge-page buffer (arena.py), laid out in the order the
    forward reads them, tied head still tied, values bit-identical (the test above checks logits)."""
    model = tiny_model()
    loaded, _ = load_model(write_gguf(tmp_path / "tiny.gguf", model))
    params = [p for p in loaded.parameters()]  # tied lm_head appears once
    storages = {p.untyped_storage().data_ptr() for p in params}
    assert len(storages) == 1, f"{len(storages)} storages"
    starts = [p.data_ptr() for p in params]
    assert starts == sorted(starts) and all(s % 64 == 0 for s in starts)
    assert (loaded.lm_head.weight is loaded.embed_tokens.weight) == loaded.config.tie_word_embeddings
    for name, p in loaded.named_parameters():
        torch.testing.assert_close(p, model.get_parameter(name), atol=0, rtol=0, msg=name)


@pytest.mark.parametrize("qtype, atol", [("F16", 1e-3), ("BF16", 2e-3), ("Q8_0", 3e-3), ("Q4_0", 6e-2),
                                         ("Q4_1", 4e-2), ("Q5_0", 3e-2)])
def test_tiny_gguf_dequantizes_each_type(tmp_path, qtype, atol):
    """Weights come back within the type's rounding error (absolute, weights ~ N(0, 0.1^2))."""
    model = tiny_model()
    loaded, _ = load_model(write_gguf(tmp_path / f"tiny-{qtype}.gguf", model, qtype=qtype))
    loaded_state = loaded.state_dict()
    for name, tensor in model.state_dict().items():
        error = (loaded_state[name] - tensor).abs().max().item()
        assert error <= atol, f"{qtype} {name}: max |diff| {error:.3g} > {atol}"


class _FakeTensor:
    def __init__(self, name, qtype, raw, shape):
        self.name, self.tensor_type, self.data, self.shape = name, qtype, raw, shape


def test_k_quants_are_accepted():
    """Q6_K known answer: all-zero quants with d=0.5 and scales 1 give -32 * 0.5 = -16 everywhere.

    (gguf-py cannot quantize K types, so this checks wiring and shape, plus one known value.)
    """
    block = np.zeros(210, dtype=np.uint8)  # ql[128] qh[64] scales[16] d(f16)
    block[192:208] = 1
    block[208:210] = np.frombuffer(np.float16(0.5).tobytes(), dtype=np.uint8)
    raw = np.tile(block, (2, 1))  # [2 rows, 1 block of 256]
    values = dequantize_tensor(_FakeTensor("w", gguf.GGMLQuantizationType.Q6_K, raw, [256, 2]))
    assert values.shape == (2, 256) and np.all(values == -16.0)
    q4k = np.random.default_rng(0).integers(0, 255, (3, 144), dtype=np.uint8)
    q4k[:, :4] = np.frombuffer(np.float16([0.01, 0.02]).tobytes(), dtype=np.uint8)  # finite d, dmin
    values = dequantize_tensor(_FakeTensor("w", gguf.GGMLQuantizationType.Q4_K, q4k, [256, 3]))
    expected = gguf.quants.dequantize(q4k, gguf.GGMLQuantizationType.Q4_K)
    np.testing.assert_array_equal(values, expected.reshape(3, 256))


def test_gguf_rope_scaling_metadata_becomes_rope_config(tmp_path):
    model = tiny_model()
    scaling = {"type": gguf.RopeScalingType.YARN, "factor": 4.0, "orig_ctx_len": 32}
    loaded, _ = load_model(write_gguf(tmp_path / "yarn.gguf", model, rope_scaling=scaling))
    rope = loaded.config.rope
    assert (rope.rope_type, rope.params.factor, rope.original_max_position_embeddings) == ("yarn", 4.0, 32)


# ---------------------------------------------------------------- bad input


def test_unsupported_architecture(tmp_path):
    path = write_gguf(tmp_path / "gpt2.gguf", tiny_model(), architecture="gpt2")
    with pytest.raises(ValueError, match="general.architecture = 'gpt2': unsupported GGUF architecture"):
        load_model(path)


def test_unsupported_quant_type():
    raw = np.zeros((1, 16), dtype=np.uint8)
    with pytest.raises(ValueError, match="unsupported quantization type IQ4_NL"):
        dequantize_tensor(_FakeTensor("w", gguf.GGMLQuantizationType.IQ4_NL, raw, [32, 1]))


@pytest.fixture(scope="module")
def base_parts(tmp_path_factory) -> GGUFParts:
    return tiny_gguf_parts(tmp_path_factory.mktemp("base"))


@pytest.mark.parametrize("key, types, value, match", [
    ("llama.rope.scaling.factor", V.FLOAT32, 0.5, r"llama.rope.scaling.factor = 0.5: must be a finite number in \[1"),
    ("llama.rope.scaling.original_context_length", V.UINT32, 0, r"original_context_length = 0: must be an integer"),
    ("llama.rope.freq_base", V.FLOAT32, -1.0, r"llama.rope.freq_base = -1.0: must be a finite number in \(1, inf\]"),
    ("llama.rope.dimension_count", V.UINT32, 7, r"llama.rope.dimension_count = 7: must be even"),
])
def test_gguf_bad_rope_metadata_names_the_key(tmp_path, base_parts, key, types, value, match):
    changes = {"llama__rope__scaling__type": (V.STRING, "yarn"), "llama__rope__scaling__factor": (V.FLOAT32, 4.0)}
    changes[key.replace(".", "__")] = (types, value)
    with pytest.raises(ValueError, match=match):
        load_model(edited_gguf(tmp_path, base_parts, **changes))


# ---------------------------------------------------------------- SmolLM2 against transformers


@pytest.fixture(scope="module")
def hf_smollm2(smollm2_path):
    transformers = pytest.importorskip("transformers")
    return transformers.AutoModelForCausalLM.from_pretrained(
        str(smollm2_path.parent), gguf_file=smollm2_path.name, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def text_ids(smollm2):
    _, tokenizer = smollm2
    return torch.tensor([tokenizer.encode(eval_text()[2000:20000])[:300]])  # [1, 300]


@pytest.mark.slow
def test_smollm2_config_from_gguf(smollm2):
    cfg = smollm2[0].config
    assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads,
            cfg.head_dim, cfg.intermediate_size, cfg.vocab_size) == (30, 576, 9, 3, 64, 1536, 49152)
    assert cfg.rope.rope_type == "default" and cfg.rope.rope_theta == 100000.0
    assert cfg.max_position_embeddings == 8192 and cfg.tie_word_embeddings


@pytest.mark.slow
def test_smollm2_logits_match_transformers(smollm2, hf_smollm2, text_ids):
    """fp32, 300 tokens: measured max |diff| 5e-5 (AMD Zen 4), 1.04e-4 (AMD Zen 3, AVX2 only): float32 rounding
    over 30 layers in another summation order; the bound comes from the error analysis, not one machine."""
    with torch.no_grad():
        ours, theirs = smollm2[0](text_ids), hf_smollm2(text_ids).logits
    cfg = smollm2[0].config
    atol = float32_logits_atol(theirs, cfg.num_hidden_layers, cfg.intermediate_size)
    torch.testing.assert_close(ours, theirs, atol=atol, rtol=0)


@pytest.mark.slow
def test_smollm2_yarn_override_matches_transformers(smollm2, hf_smollm2, text_ids):
    """yarn factor 2 from 8192: transformers 5 keeps rope in config.rope_parameters (theta repeated there)."""
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    model = smollm2[0]
    config = copy.deepcopy(hf_smollm2.config)
    config.rope_parameters = {"rope_type": "yarn", "factor": 2.0, "original_max_position_embeddings": 8192,
                              "rope_theta": 100000.0}
    original_hf, original_rope = hf_smollm2.model.rotary_emb, model.config.rope
    hf_smollm2.model.rotary_emb = LlamaRotaryEmbedding(config)
    model.set_rope("yarn:factor=2,original_max_position_embeddings=8192")
    try:
        with torch.no_grad():
            ours, theirs = model(text_ids), hf_smollm2(text_ids).logits
    finally:
        hf_smollm2.model.rotary_emb = original_hf
        model.set_rope(original_rope)
    assert model.config.rope == original_rope
    # transformers' YaRN frequencies and mscale come from float32 pow/log, ours from float64 rounded once:
    # measured max |diff| 1.05e-4 on one of 14.7M logits (a logit of 10.6, i.e. 1e-5 relative) on an
    # Intel Xeon (AMX) machine, 7e-5 on an AMD EPYC: within the rounding bound of the whole stack.
    cfg = model.config
    atol = float32_logits_atol(theirs, cfg.num_hidden_layers, cfg.intermediate_size)
    torch.testing.assert_close(ours, theirs, atol=atol, rtol=0)


@pytest.mark.slow
def test_smollm2_greedy_32_tokens_match_transformers(smollm2, hf_smollm2):
    from ropekit.model.generate import generate_ids

    model, tokenizer = smollm2
    prompt = tokenizer.encode("It is a truth universally acknowledged, that")
    ours = [int(t[0]) for t in generate_ids(model, [prompt], max_new_tokens=32)]
    theirs = hf_smollm2.generate(torch.tensor([prompt]), max_new_tokens=32, min_new_tokens=32,
                                 do_sample=False)
    assert ours == theirs[0, len(prompt):].tolist()
