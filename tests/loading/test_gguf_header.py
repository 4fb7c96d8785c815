"""The GGUF header reader (ropekit.loading.gguf_header): files that are not GGUF, truncated files, and counts,
lengths, types and offsets that the file cannot hold, each rejected with the field it names."""

from __future__ import annotations

import copy
import shutil
import struct

import pytest
from test_hostile_files import Driver, GGUFParts, gguf_bytes, tiny_gguf_parts, write_parts
from tiny_llama import tiny_model, write_gguf

from ropekit.loading import load_model
from ropekit.loading.gguf_file import open_gguf

# ---------------------------------------------------------------- not GGUF, truncated


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


@pytest.mark.slow
def test_smollm2_truncated_real_file(smollm2_path, tmp_path):
    cut = tmp_path / "cut.gguf"
    with open(smollm2_path, "rb") as src:
        cut.write_bytes(src.read(50_000_000))
    with pytest.raises(ValueError, match="truncated"):
        load_model(cut)
    shutil.rmtree(tmp_path, ignore_errors=True)


# ---------------------------------------------------------------- hostile headers (each test names the bug it guards)
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


def test_gguf_tensor_with_a_zero_dimension_is_rejected(tmp_path, base_parts):
    parts = copy.deepcopy(base_parts)
    parts.tensors[1].dims = [0]
    with pytest.raises(ValueError, match=r"tensor blk.0.attn_norm.weight dim 0 = 0: must be >= 1"):
        load_model(write_parts(tmp_path / "zero.gguf", parts))
