"""Read a Hugging Face LLaMA checkpoint folder: config.json, *.safetensors, tokenizer.json.

Everything is checked before a tensor is read: config.json must be a JSON object whose
architecture numbers pass ``checks.check_architecture``; each safetensors header (an 8-byte
little-endian length, then a JSON object ``name -> {dtype, shape, data_offsets}``) must describe
tensors stored back to back inside the file; and the tensors must be exactly the ones the config
implies, with its shapes.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path
from typing import Any

import torch

from ropekit.loading import checks
from ropekit.loading.checks import Raw, fail
from ropekit.model.llama import LlamaConfig

SUPPORTED_MODEL_TYPES = ("llama", "mistral")
SUPPORTED_ACTIVATIONS = ("silu", "swish")
MAX_CONFIG_BYTES = 16 << 20
MAX_HEADER_BYTES = 32 << 20  # a safetensors JSON header [~150 bytes per tensor: 200 KB for 1000 tensors]
DTYPE_BYTES = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
               "I32": 4, "U32": 4, "F32": 4, "F64": 8, "I64": 8, "U64": 8}
WEIGHT_DTYPES = ("F32", "F16", "BF16", "F64")


def read_hf_config(folder: str | os.PathLike) -> dict[str, Any]:
    """The parsed ``config.json``; ValueError unless it is a JSON object describing a LLaMA-architecture model."""
    path = Path(folder) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"no config.json in {folder}")
    hf = checks.read_json_object(path, MAX_CONFIG_BYTES)
    model_type = hf.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise fail(path, "model_type", model_type, f"unsupported; supported: {', '.join(SUPPORTED_MODEL_TYPES)}")
    act = hf.get("hidden_act", "silu")
    if act not in SUPPORTED_ACTIVATIONS:
        raise fail(path, "hidden_act", act, f"ropekit's MLP is SwiGLU ({' or '.join(SUPPORTED_ACTIVATIONS)})")
    if hf.get("mlp_bias"):
        raise fail(path, "mlp_bias", hf["mlp_bias"], "ropekit's MLP has no biases (must be false)")
    return hf


def read_safetensors_header(path: Path) -> dict[str, tuple[str, tuple[int, ...]]]:
    """``name -> (dtype, shape)`` from a safetensors file's header, without reading the data.

    ValueError naming the file and tensor unless the header is a JSON object of known dtypes,
    shapes of non-negative ints, and ``data_offsets`` that tile the data section exactly.
    """
    size = path.stat().st_size
    if size < 8:
        raise fail(path, "header length", Raw(f"{size} bytes"),
                   "a safetensors file starts with an 8-byte header length (the file is truncated)")
    try:
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            if n > min(size - 8, MAX_HEADER_BYTES):
                raise fail(path, "header length", n, f"at most {min(size - 8, MAX_HEADER_BYTES)} bytes "
                                                     f"(the file has {size}: truncated or corrupt)")
            raw = f.read(n)
    except OSError as err:
        raise ValueError(f"{path}: cannot read the file ({err.strerror or err})") from None
    try:
        header = json.loads(raw)
    except (ValueError, RecursionError) as err:
        raise ValueError(f"{path}: the header is not valid JSON: {checks.one_line(err)}") from None
    if not isinstance(header, dict):
        raise fail(path, "header", type(header).__name__, "must be a JSON object")
    return _header_entries(path, header, size - 8 - n)


def _header_entries(path: Path, header: dict[str, Any], data_size: int) -> dict[str, tuple[str, tuple[int, ...]]]:
    entries, spans = {}, []
    for name, info in header.items():
        if name == "__metadata__":
            if not isinstance(info, dict) or not all(isinstance(v, str) for v in info.values()):
                raise fail(path, "__metadata__", info, "must be an object of strings")
            continue
        dtype, shape, span = _header_entry(path, name, info, data_size)
        entries[name] = (dtype, shape)
        spans.append((*span, name))
    end = 0
    for begin, stop, name in sorted(spans):
        if begin != end:
            raise fail(path, f"tensor {name} data_offsets", [begin, stop], f"must start at {end} "
                                                                           "(tensors are stored back to back)")
        end = stop
    if end != data_size:
        raise fail(path, "data", Raw(f"{data_size} bytes"),
                   f"the tensors cover {end} bytes (truncated or corrupt file)")
    return entries


def _header_entry(path: Path, name: str, info: Any, data_size: int) -> tuple[str, tuple[int, ...], tuple[int, int]]:
    """``(dtype, shape, (begin, end))`` of one header entry, each checked."""
    if not isinstance(info, dict):
        raise fail(path, f"tensor {name}", info, "must be an object with dtype, shape and data_offsets")
    dtype, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
    if not isinstance(dtype, str) or dtype not in DTYPE_BYTES:
        raise fail(path, f"tensor {name} dtype", dtype, f"must be one of {', '.join(DTYPE_BYTES)}")
    if not isinstance(shape, list) or len(shape) > 8 or not all(_is_count(d) for d in shape):
        raise fail(path, f"tensor {name} shape", shape, "must be a list of at most 8 integers >= 0")
    if not isinstance(offsets, list) or len(offsets) != 2 or not all(_is_count(o) for o in offsets) \
            or not offsets[0] <= offsets[1] <= data_size:
        raise fail(path, f"tensor {name} data_offsets", offsets,
                   f"must be [begin, end] within the {data_size} data bytes (truncated or corrupt file)")
    n_bytes = DTYPE_BYTES[dtype]
    for dim in shape:
        n_bytes *= dim
    if offsets[1] - offsets[0] != n_bytes:
        raise fail(path, f"tensor {name} data_offsets", offsets, f"must span {n_bytes} bytes ({dtype} {shape})")
    return dtype, tuple(shape), (offsets[0], offsets[1])


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _our_name(name: str) -> str:
    return name.removeprefix("model.")


def safetensors_headers(folder: Path) -> dict[str, tuple[Path, str, tuple[int, ...]]]:
    """Our parameter name -> ``(shard file, name in the file, shape)`` over all ``*.safetensors`` shards
    (rope ``inv_freq`` buffers left out); ValueError for a tensor in two shards or of a non-float dtype."""
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors files in {folder}")
    out: dict[str, tuple[Path, str, tuple[int, ...]]] = {}
    for file in files:
        for name, (dtype, shape) in read_safetensors_header(file).items():
            if name.endswith("rotary_emb.inv_freq"):
                continue
            ours = _our_name(name)
            if ours in out:
                raise fail(file, f"tensor {name}", list(shape), f"also in {out[ours][0].name}")
            if dtype not in WEIGHT_DTYPES:
                raise fail(file, f"tensor {name} dtype", dtype, f"ropekit loads {', '.join(WEIGHT_DTYPES)} weights")
            out[ours] = (file, name, shape)
    return out


def read_safetensors(folder: str | os.PathLike) -> dict[str, torch.Tensor]:
    """All tensors of the folder's ``*.safetensors`` shards, under our names (``model.`` prefix dropped),
    each header checked before its data is read."""
    folder = Path(folder)
    files = sorted({file for file, _, _ in safetensors_headers(folder).values()})
    state = {}
    for file in files:
        for name, tensor in _load_file(file).items():
            if not name.endswith("rotary_emb.inv_freq"):
                state[_our_name(name)] = tensor
    return state


def _load_file(file: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    try:
        return load_file(str(file))
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as err:  # SafetensorError, OSError, or a Rust panic (a BaseException)
        raise ValueError(f"{file}: cannot read the safetensors file: {checks.one_line(err)}") from None


def read_hf_folder(folder: str | os.PathLike) -> tuple[LlamaConfig, dict[str, torch.Tensor], dict[str, Any]]:
    """``(config, state dict, raw config.json)`` of an HF LLaMA folder, checked before any tensor is read."""
    folder = Path(folder)
    hf = read_hf_config(folder)
    headers = safetensors_headers(folder)
    if "lm_head.weight" not in headers and "tie_word_embeddings" not in hf:
        hf = {**hf, "tie_word_embeddings": True}
    source = folder / "config.json"
    config = checks.build_config(source, checks.check_architecture(source, hf, {}))
    checks.check_layer_count(source, "num_hidden_layers", config.num_hidden_layers, list(headers))
    checks.check_tensor_shapes(folder, config, {name: shape for name, (_, _, shape) in headers.items()},
                               label=lambda n: f"{headers[n][1]} ({headers[n][0].name})" if n in headers else
                               ("" if n.startswith("lm_head") else "model.") + n)
    return config, read_safetensors(folder), hf
