"""Read a LLaMA-architecture GGUF file (llama.cpp's format) into ropekit's model.

Three things happen here and nowhere else:

1. metadata ``llama.*`` keys become a ``LlamaConfig`` (rope settings included);
2. tensors are de-quantized with the ``gguf`` package (``gguf.quants.dequantize``);
3. llama.cpp's q/k row permutation is undone. Its converter reorders the rows of
   ``q_proj``/``k_proj`` so that the "half" rope layout of HF checkpoints (pairs ``i, i+D/2``)
   becomes the interleaved layout ggml rotates (pairs ``2i, 2i+1``). Our model rotates in the
   "half" layout, so the loader inverts that permutation exactly as transformers does.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ropekit.model.llama import LlamaConfig

GGUF_MAGIC = b"GGUF"

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


def open_gguf(path: str | os.PathLike):
    """A ``gguf.GGUFReader`` for ``path``; clear errors for a missing, non-GGUF or truncated file."""
    import gguf

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"GGUF file not found: {path}")
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != GGUF_MAGIC:
        raise ValueError(f"{path} is not a GGUF file (starts with {magic!r}, expected {GGUF_MAGIC!r})")
    try:
        reader = gguf.GGUFReader(path)
    except Exception as exc:  # the reader fails in numpy/struct on a cut file; say what it means
        raise ValueError(f"{path} is not a readable GGUF file (truncated or corrupt): {exc}") from exc
    _check_complete(reader, path)
    return reader


def _check_complete(reader, path: Path) -> None:
    """Every tensor's bytes must lie inside the file (a cut download otherwise loads garbage)."""
    size = path.stat().st_size
    for tensor in reader.tensors:
        if tensor.data_offset + tensor.n_bytes > size:
            raise ValueError(f"{path} is truncated: tensor {tensor.name!r} ends at byte "
                             f"{tensor.data_offset + tensor.n_bytes}, the file has {size}")


def read_metadata(reader) -> dict[str, Any]:
    """All metadata fields as plain Python values (strings, numbers, lists)."""
    out = {}
    for key, field in reader.fields.items():
        if key.startswith("GGUF."):
            continue
        try:
            out[key] = field.contents()
        except Exception:  # a field type gguf-py cannot decode; we never need those
            continue
    return out


def llama_config_from_metadata(meta: dict[str, Any], *, tie_word_embeddings: bool) -> LlamaConfig:
    """Map GGUF ``llama.*`` keys to a ``LlamaConfig`` (rope settings from ``llama.rope.*``)."""
    arch = meta.get("general.architecture")
    if arch not in SUPPORTED_ARCHITECTURES:
        raise ValueError(f"unsupported GGUF architecture {arch!r}; "
                         f"supported: {', '.join(SUPPORTED_ARCHITECTURES)}")

    def get(key: str, default: Any = None) -> Any:
        value = meta.get(f"{arch}.{key}", default)
        if value is None:
            raise ValueError(f"GGUF metadata lacks required key '{arch}.{key}'")
        return value

    hidden, heads = int(get("embedding_length")), int(get("attention.head_count"))
    head_dim = int(meta.get(f"{arch}.attention.key_length", hidden // heads))
    vocab = meta.get(f"{arch}.vocab_size", len(meta.get("tokenizer.ggml.tokens", ())))
    hf = {
        "hidden_size": hidden,
        "num_attention_heads": heads,
        "num_key_value_heads": int(get("attention.head_count_kv", heads)),
        "num_hidden_layers": int(get("block_count")),
        "intermediate_size": int(get("feed_forward_length")),
        "rms_norm_eps": float(get("attention.layer_norm_rms_epsilon", 1e-5)),
        "vocab_size": int(vocab),
        "max_position_embeddings": int(get("context_length")),
        "head_dim": head_dim,
        "tie_word_embeddings": tie_word_embeddings,
    }
    hf["rope_parameters"] = _rope_parameters(meta, arch, head_dim)
    if hf["rope_parameters"].get("partial_rotary_factor") == 1.0:
        del hf["rope_parameters"]["partial_rotary_factor"]
    return LlamaConfig.from_hf(hf)


def _rope_parameters(meta: dict[str, Any], arch: str, head_dim: int) -> dict[str, Any]:
    """HF ``rope_parameters`` from ``{arch}.rope.*`` (llama.cpp writes none/linear/yarn scaling)."""
    params: dict[str, Any] = {"rope_type": "default",
                              "rope_theta": float(meta.get(f"{arch}.rope.freq_base", 10000.0))}
    rotary = int(meta.get(f"{arch}.rope.dimension_count", head_dim))
    params["partial_rotary_factor"] = rotary / head_dim
    scaling = meta.get(f"{arch}.rope.scaling.type", "none")
    factor = meta.get(f"{arch}.rope.scaling.factor")
    if scaling in ("none", None) or factor in (None, 0.0, 1.0):
        return params
    if scaling not in ("linear", "yarn"):
        raise ValueError(f"unsupported GGUF rope scaling type {scaling!r} (known: none, linear, yarn)")
    params.update(rope_type=scaling, factor=float(factor))
    original = meta.get(f"{arch}.rope.scaling.original_context_length")
    if scaling == "yarn" and original is not None:
        params["original_max_position_embeddings"] = int(original)
    return params


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


def gguf_state_dict(reader, config: LlamaConfig) -> dict[str, torch.Tensor]:
    """All tensors as float32 torch tensors under our parameter names, q/k un-permuted."""
    state = {}
    for tensor in reader.tensors:
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
    if len(parts) == 4 and parts[0] == "blk" and parts[2] in _LAYER_NAMES:
        return f"layers.{parts[1]}.{_LAYER_NAMES[parts[2]]}.{parts[3]}"
    return None


def read_gguf(path: str | os.PathLike, *, has_rope_override: bool = False
              ) -> tuple[LlamaConfig, dict[str, torch.Tensor], dict[str, Any]]:
    """``(config, float32 state dict, metadata)`` of a llama GGUF file.

    Llama 3.1 GGUFs store their rope as per-frequency factors (``rope_freqs.weight``) that do not
    map back to a rope type; such a file loads only with an explicit rope override.
    """
    reader = open_gguf(path)
    meta = read_metadata(reader)
    names = {t.name for t in reader.tensors}
    if "rope_freqs.weight" in names:
        if not has_rope_override:
            raise ValueError(f"{path} stores per-frequency rope factors (rope_freqs.weight, as "
                             "Llama 3.1 GGUFs do); pass the model's rope explicitly, "
                             "e.g. rope='llama3:factor=8,...'")
        reader.tensors = [t for t in reader.tensors if t.name != "rope_freqs.weight"]
    config = llama_config_from_metadata(meta, tie_word_embeddings="output.weight" not in names)
    return config, gguf_state_dict(reader, config), meta
