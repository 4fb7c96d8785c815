"""Lower bounds on the memory a request needs, from a model's shape: checked before anything is allocated.

Both functions count only tensors that must exist at once (so a request they refuse could never
run); ``ropekit.resources.check_fits`` compares them with what the machine can give.
"""

from __future__ import annotations

import torch


def element_size(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def kv_cache_bytes(num_layers: int, batch_size: int, num_kv_heads: int, head_dim: int, tokens: int,
                   dtype: torch.dtype) -> int:
    """Keys and values of ``tokens`` slots in every layer: ``2 * L * B * Hkv * tokens * D`` elements."""
    return 2 * num_layers * batch_size * num_kv_heads * tokens * head_dim * element_size(dtype)


def forward_bytes(hidden_size: int, intermediate_size: int, kv_dim: int, tokens: int, dtype: torch.dtype,
                  batch_size: int = 1) -> int:
    """One layer's live activations over ``tokens`` positions: hidden state and residual, q, k and v,
    the MLP's gate and up projections (``B * T * (3C + 2I + 2 kv_dim)`` elements)."""
    return batch_size * tokens * (3 * hidden_size + 2 * intermediate_size + 2 * kv_dim) * element_size(dtype)


def model_shape(config) -> dict[str, int]:
    """The sizes the estimates need, from a ``LlamaConfig`` or a transformers ``PretrainedConfig``."""
    hidden = int(config.hidden_size)
    heads = int(config.num_attention_heads)
    head_dim = int(getattr(config, "head_dim", None) or hidden // heads)
    kv_heads = int(getattr(config, "num_key_value_heads", None) or heads)
    intermediate = int(getattr(config, "intermediate_size", None) or 4 * hidden)
    return {"num_layers": int(config.num_hidden_layers), "hidden_size": hidden, "intermediate_size": intermediate,
            "num_kv_heads": kv_heads, "head_dim": head_dim}


def request_bytes(config, tokens: int, dtype: torch.dtype, *, batch_size: int = 1, cache: bool = True) -> int:
    """A forward pass over ``tokens`` positions, plus (``cache``) a KV cache holding them all."""
    s = model_shape(config)
    total = forward_bytes(s["hidden_size"], s["intermediate_size"], s["num_kv_heads"] * s["head_dim"], tokens,
                          dtype, batch_size)
    if cache:
        total += kv_cache_bytes(s["num_layers"], batch_size, s["num_kv_heads"], s["head_dim"], tokens, dtype)
    return total
