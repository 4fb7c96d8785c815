"""Independent references for the rope core: transformers' functions, complex RoPE, a naive loop."""

from __future__ import annotations

import math

import torch


def transformers_inv_freq(hf: dict, seq_len: int | None = None) -> tuple[torch.Tensor, float]:
    """transformers' own frequencies for an HF-style dict (``head_dim``, ``rope_parameters``, ...)."""
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    heads = 4
    config = LlamaConfig(hidden_size=hf["head_dim"] * heads, num_attention_heads=heads, num_key_value_heads=heads,
                         head_dim=hf["head_dim"], max_position_embeddings=hf.get("max_position_embeddings", 2048),
                         rope_parameters=dict(hf["rope_parameters"]))
    rope_type = config.rope_parameters["rope_type"]
    if rope_type == "default":
        return LlamaRotaryEmbedding.compute_default_rope_parameters(config)
    return ROPE_INIT_FUNCTIONS[rope_type](config, "cpu", seq_len=seq_len)


def complex_rope(x: torch.Tensor, inv_freq: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """Meta's formulation on interleaved pairs: (x_{2i} + j x_{2i+1}) * exp(j * p * theta_i), in complex128.

    x ``[B, H, T, D]`` with D = 2 * len(inv_freq); positions ``(T,)``.
    """
    pairs = x.double().reshape(*x.shape[:-1], -1, 2)  # [B,H,T,D] -> [B,H,T,D/2,2]
    z = torch.view_as_complex(pairs.contiguous())
    angles = positions.double()[:, None] * inv_freq.double()[None, :]  # (T, D/2)
    rotated = z * torch.polar(torch.ones_like(angles), angles)
    return torch.view_as_real(rotated).reshape(x.shape)  # [B,H,T,D/2,2] -> [B,H,T,D]


def naive_rope_half(x: torch.Tensor, inv_freq: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """A per-element Python loop over pairs (i, i + R/2), float64 maths. x ``[B, H, T, D]``, positions ``(T,)``."""
    out = x.double().clone()
    half = inv_freq.numel()
    for b in range(x.shape[0]):
        for h in range(x.shape[1]):
            for t in range(x.shape[2]):
                for i in range(half):
                    angle = float(positions[t]) * float(inv_freq[i])
                    c, s = math.cos(angle), math.sin(angle)
                    a, bb = float(x[b, h, t, i]), float(x[b, h, t, i + half])
                    out[b, h, t, i] = a * c - bb * s
                    out[b, h, t, i + half] = bb * c + a * s
    return out


def half_to_interleaved(x: torch.Tensor, rotary_dim: int) -> torch.Tensor:
    """Permute channels so pair (i, i+R/2) of the half layout becomes pair (2i, 2i+1)."""
    half = rotary_dim // 2
    order = torch.stack([torch.arange(half), torch.arange(half) + half], dim=-1).flatten()
    order = torch.cat([order, torch.arange(rotary_dim, x.shape[-1])])
    return x[..., order]
