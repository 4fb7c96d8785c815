"""Read a LLaMA-architecture GGUF file (llama.cpp's format) into ropekit's model.

The header is read by ``gguf_header.parse_gguf`` (every count and length bounded by the file),
and every number and tensor shape is checked (``checks``) before a tensor is read. Then three
things happen here and nowhere else:

1. metadata ``llama.*`` keys become a ``LlamaConfig`` (the rope settings, keys and factor tensors, read
   by ``RopeConfig.from_gguf``, the one GGUF rope reader);
2. tensors are de-quantized with the ``gguf`` package (``gguf.quants.dequantize``);
3. llama.cpp's q/k row permutation is undone. Its converter reorders the rows of
   ``q_proj``/``k_proj`` so that the "half" rope layout of HF checkpoints (pairs ``i, i+D/2``)
   becomes the interleaved layout ggml rotates (pairs ``2i, 2i+1``). Our model rotates in the
   "half" layout, so the loader inverts that permutation exactly as transformers does.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from ropekit.loading import checks
from ropekit.loading.gguf_header import GGUF_MAGIC, GGUFFile, TensorInfo, parse_gguf
from ropekit.model.llama import LlamaConfig
from ropekit.rope import RopeConfig
from ropekit.rope.formats import GGUF_ROPE_TENSORS

__all__ = ["GGUF_MAGIC", "GGUFFile", "TensorInfo", "dequantize_tensor", "open_gguf", "read_gguf", "read_metadata",
           "reverse_permute", "rope_tensors"]

# Quantization types we de-quantize (gguf.quants.dequantize supports more; these are tested or
# simple block formats). Anything else gets a clear error instead of a surprise.
SUPPORTED_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1",
                   "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K")

SUPPORTED_ARCHITECTURES = ("llama",)

# GGUF tensor name -> our parameter name (per-layer names use {i}).
_LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_GLOBAL_NAMES = {"token_embd.weight": "embed_tokens.weight", "output_norm.weight": "norm.weight",
                 "output.weight": "lm_head.weight"}


def open_gguf(path: str | os.PathLike) -> GGUFFile:
    """The checked header of a GGUF file (``gguf_header.parse_gguf``), tensor data mapped, not read.

    FileNotFoundError if it is absent; ValueError for a non-GGUF, truncated or corrupt file.
    """
    try:
        return parse_gguf(path)
    except FileNotFoundError:
        raise
    except OSError as err:
        raise ValueError(f"{path}: cannot read the file ({err.strerror or err})") from None


def read_metadata(gguf_file: GGUFFile) -> dict[str, Any]:
    """All metadata fields as Python values (str, int, float, bool; numpy arrays for numeric arrays,
    lists for string arrays)."""
    return dict(gguf_file.metadata)


# HF config key -> GGUF key under "{arch}."
_ARCH_KEYS = {"hidden_size": "embedding_length", "num_attention_heads": "attention.head_count",
              "num_key_value_heads": "attention.head_count_kv", "num_hidden_layers": "block_count",
              "intermediate_size": "feed_forward_length", "rms_norm_eps": "attention.layer_norm_rms_epsilon",
              "vocab_size": "vocab_size", "max_position_embeddings": "context_length",
              "head_dim": "attention.key_length"}


def architecture(meta: dict[str, Any], source: Any = "GGUF metadata") -> str:
    """``general.architecture``; ValueError unless it is one ropekit loads."""
    arch = meta.get("general.architecture")
    if not isinstance(arch, str) or arch not in SUPPORTED_ARCHITECTURES:
        raise checks.fail(source, "general.architecture", arch, "unsupported GGUF architecture; "
                                                                f"supported: {', '.join(SUPPORTED_ARCHITECTURES)}")
    return arch


def llama_config_from_metadata(meta: dict[str, Any], *, tie_word_embeddings: bool, source: Any = "GGUF metadata",
                               rope_tensors: Mapping[str, list[float]] | None = None) -> LlamaConfig:
    """Map GGUF ``llama.*`` keys to a ``LlamaConfig``, every number checked first (``checks.check_architecture``);
    the rope settings come from ``llama.rope.*`` and the rope factor tensors' values (``rope_tensors``, by
    tensor name) through ``RopeConfig.from_gguf``. ``source`` names the file in messages."""
    arch = architecture(meta, source)
    names = {hf_key: f"{arch}.{key}" for hf_key, key in _ARCH_KEYS.items()}
    hf = {hf_key: meta.get(name) for hf_key, name in names.items()}
    tokens = meta.get("tokenizer.ggml.tokens")
    if hf["vocab_size"] is None and isinstance(tokens, list):
        hf["vocab_size"], names["vocab_size"] = len(tokens), "tokenizer.ggml.tokens (count)"
    if hf["max_position_embeddings"] is None:
        raise checks.fail(source, names["max_position_embeddings"], checks.MISSING, "required")
    if hf["rms_norm_eps"] is None:
        hf["rms_norm_eps"] = 1e-5
    hf = checks.check_architecture(source, hf, names)
    value_length = meta.get(f"{arch}.attention.value_length")
    if value_length is not None and checks.check_int(source, f"{arch}.attention.value_length", value_length,
                                                     checks.MAX_HEAD_DIM) != hf["head_dim"]:
        raise checks.fail(source, f"{arch}.attention.value_length", value_length,
                          f"must equal the key length {hf['head_dim']} (ropekit's attention)")
    hf["tie_word_embeddings"] = tie_word_embeddings
    hf["rope_parameters"] = _rope_parameters(meta, arch, hf["head_dim"], source, rope_tensors)
    return checks.build_config(source, hf)


def _rope_parameters(meta: dict[str, Any], arch: str, head_dim: int, source: Any,
                     rope_tensors: Mapping[str, list[float]] | None) -> dict[str, Any]:
    """HF ``rope_parameters`` of the file as ``RopeConfig.from_gguf`` reads them (with the checked head
    dimension); its errors name ``source`` and the key."""
    try:
        rope = RopeConfig.from_gguf({**meta, f"{arch}.attention.key_length": head_dim}, rope_tensors)
    except ValueError as err:
        raise ValueError(f"{source}: {checks.one_line(err)}") from None
    return rope.to_hf()["rope_parameters"]


def dequantize_tensor(tensor) -> np.ndarray:
    """A GGUF tensor as float32 numpy, shape in PyTorch order (``[out, in]`` for a matrix)."""
    from gguf.quants import dequantize

    qtype = tensor.tensor_type.name
    if qtype not in SUPPORTED_TYPES:
        raise ValueError(f"tensor {tensor.name!r} has unsupported quantization type {qtype}; "
                         f"supported: {', '.join(SUPPORTED_TYPES)}")
    values = dequantize(tensor.data, tensor.tensor_type)
    return np.asarray(values, dtype=np.float32).reshape(tuple(reversed([int(n) for n in tensor.shape])))


def reverse_permute(weight: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's ``permute`` of q/k rows: interleaved pairs back to the "half" layout.

    llama.cpp (convert_hf_to_gguf.py) does ``w.reshape(H, 2, D/2, C).swapaxes(1, 2)``; this is its
    inverse (transformers' ``_reverse_permute_weights``). ``weight``: ``[H*D, C]``; ``n_head``: H
    (the KV head count for k).
    """
    half = weight.shape[0] // n_head // 2
    w = weight.reshape(n_head, half, 2, *weight.shape[1:])  # [H, D/2, 2, C]: row pairs (2i, 2i+1)
    return w.swapaxes(2, 1).reshape(weight.shape)  # [H, 2, D/2, C] -> [H*D, C]: halves i, i+D/2


def gguf_state_dict(gguf_file: GGUFFile, config: LlamaConfig) -> dict[str, torch.Tensor]:
    """All tensors as float32 torch tensors under our parameter names, q/k un-permuted."""
    state = {}
    for tensor in gguf_file.tensors:
        name = _our_name(tensor.name)
        if name is None:
            raise ValueError(f"unexpected tensor {tensor.name!r} in a llama GGUF")
        values = dequantize_tensor(tensor)
        if name.endswith("q_proj.weight"):
            values = reverse_permute(values, config.num_attention_heads)
        elif name.endswith("k_proj.weight"):
            values = reverse_permute(values, config.num_key_value_heads)
        state[name] = torch.from_numpy(np.require(values, requirements=["C", "W"]))  # F32 views are read-only
    return state


def _our_name(gguf_name: str) -> str | None:
    if gguf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[gguf_name]
    parts = gguf_name.split(".")  # blk.{i}.{kind}.weight
    if len(parts) == 4 and parts[0] == "blk" and parts[1].isascii() and parts[1].isdigit() and parts[2] in _LAYER_NAMES:
        return f"layers.{int(parts[1])}.{_LAYER_NAMES[parts[2]]}.{parts[3]}"
    return None


def check_tensors(gguf_file: GGUFFile, config: LlamaConfig) -> None:
    """The file's tensors are exactly the ones ``config`` implies, each of its shape and of a type we
    de-quantize (the rope factor tensors excepted); the token list matches the embedding rows."""
    path, meta = gguf_file.path, gguf_file.metadata
    ours = {}
    for tensor in gguf_file.tensors:
        name = _our_name(tensor.name)
        if name is None or name in ours:
            raise checks.fail(path, f"tensor {tensor.name}", list(tensor.shape), "not a tensor of a llama GGUF")
        if tensor.tensor_type.name not in SUPPORTED_TYPES:
            raise checks.fail(path, f"tensor {tensor.name} type", tensor.tensor_type.name,
                              f"unsupported quantization type; supported: {', '.join(SUPPORTED_TYPES)}")
        ours[name] = tensor
    arch = meta["general.architecture"]
    checks.check_layer_count(path, f"{arch}.block_count", config.num_hidden_layers, list(ours))
    checks.check_tensor_shapes(path, config, {n: tuple(reversed(t.shape)) for n, t in ours.items()},
                               label=lambda n: ours[n].name if n in ours else _gguf_name(n))
    tokens = meta.get("tokenizer.ggml.tokens")
    if isinstance(tokens, list) and len(tokens) != config.vocab_size:
        raise checks.fail(path, "tokenizer.ggml.tokens (count)", len(tokens),
                          f"must equal the vocabulary size {config.vocab_size} (token_embd.weight rows)")


def _gguf_name(our_name: str) -> str:
    """Our parameter name -> llama.cpp's tensor name."""
    for gguf_name, ours in _GLOBAL_NAMES.items():
        if ours == our_name:
            return gguf_name
    _, index, rest = our_name.split(".", 2)
    module, kind = rest.rsplit(".", 1)
    short = next(g for g, o in _LAYER_NAMES.items() if o == module)
    return f"blk.{index}.{short}.{kind}"


def rope_tensors(gguf_file: GGUFFile) -> dict[str, list[float]]:
    """The file's rope factor tensors (``GGUF_ROPE_TENSORS``: Llama 3's ``rope_freqs``, LongRoPE's
    ``rope_factors_long`` / ``_short``) by name, as floats; each must be an F32 vector of finite entries > 0."""
    return {t.name: _rope_tensor_values(gguf_file.path, t) for t in gguf_file.tensors if t.name in GGUF_ROPE_TENSORS}


def _rope_tensor_values(path, tensor) -> list[float]:
    """A rope factor tensor as floats: an F32 vector of one factor per rotated pair."""
    if tensor.tensor_type.name != "F32" or len(tensor.shape) != 1:
        raise checks.fail(path, f"tensor {tensor.name}", f"{tensor.tensor_type.name} {list(tensor.shape)}",
                          "must be an F32 vector (one factor per rotated pair)")
    values = np.frombuffer(bytes(tensor.data), dtype="<f4")
    if not np.isfinite(values).all() or (values <= 0).any():
        raise checks.fail(path, f"tensor {tensor.name}", "non-finite or non-positive entries",
                          "every factor must be finite and > 0")
    return values.astype(float).tolist()


def read_gguf(path: str | os.PathLike, *, has_rope_override: bool = False
              ) -> tuple[LlamaConfig, dict[str, torch.Tensor], dict[str, Any]]:
    """``(config, float32 state dict, metadata)`` of a llama GGUF file, everything checked before a
    tensor is read.

    The rope factor tensors are settings, not weights: Llama 3.x GGUFs store their rope as per-frequency
    divisors (``rope_freqs.weight``), read back as ``llama3`` with its factor, band edges and trained
    length (or refused, naming the tensor, when no Llama 3 configuration produces them); LongRoPE's
    ``rope_factors_long`` / ``_short`` become ``longrope``. An explicit rope override replaces them.
    """
    gguf_file = open_gguf(path)
    meta = read_metadata(gguf_file)
    names = {t.name for t in gguf_file.tensors}
    factors = {} if has_rope_override else rope_tensors(gguf_file)
    gguf_file.tensors = [t for t in gguf_file.tensors if t.name not in GGUF_ROPE_TENSORS]
    config = llama_config_from_metadata(meta, tie_word_embeddings="output.weight" not in names, source=path,
                                        rope_tensors=factors)
    check_tensors(gguf_file, config)
    return config, gguf_state_dict(gguf_file, config), meta
