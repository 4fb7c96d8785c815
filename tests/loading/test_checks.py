"""Checks on a model's architecture numbers and tensors (ropekit.loading.checks), through both formats: GGUF
metadata and tensors, HF config.json values; every message names the key as the file spells it."""

from __future__ import annotations

import copy
import math
from pathlib import Path

import pytest
from file_edits import DELETE, edited_gguf, hf_config, hf_copy
from test_hostile_files import Driver, GGUFParts, V, tiny_gguf_parts, write_parts
from tiny_llama import tiny_model, write_hf_folder

from ropekit.loading import load_model

# ---------------------------------------------------------------- GGUF (each test names the bug it guards)
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


# HF folders


@pytest.fixture(scope="module")
def hf_base(tmp_path_factory) -> Path:
    return write_hf_folder(tmp_path_factory.mktemp("hf") / "tiny-hf", tiny_model(seed=1))


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
