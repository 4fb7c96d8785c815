"""cos/sin tables from inverse frequencies and integer positions, exact at huge positions."""

from __future__ import annotations

import math

import torch

MAX_POSITION = 2**31  # positions must lie in [0, MAX_POSITION)


def check_positions(positions: torch.Tensor) -> None:
    """Raise ValueError unless ``positions`` is an integer tensor of shape (T,) or (B, T) in [0, 2^31)."""
    if not isinstance(positions, torch.Tensor) or positions.dtype.is_floating_point or positions.is_complex():
        raise ValueError(f"positions must be an integer tensor, got {getattr(positions, 'dtype', type(positions))}")
    if positions.dim() not in (1, 2):
        raise ValueError(f"positions must have shape (T,) or (B, T), got {tuple(positions.shape)}")
    if positions.numel() and (positions.min() < 0 or positions.max() >= MAX_POSITION):
        raise ValueError(f"positions must lie in [0, 2**31), got min {int(positions.min())}, "
                         f"max {int(positions.max())}")


def rotation_angles(inv_freq: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """angle[..., i] = positions * inv_freq[i] reduced to [0, 2*pi), in float64.

    Shapes: inv_freq ``(R/2,)``, positions ``(T,)`` or ``(B, T)`` -> ``positions.shape + (R/2,)``.
    float64 keeps the product exact to ~2e-7 rad even at position 2^31 (float32 would be off by
    up to ~100 rad there); the reduction keeps cos/sin's argument small.
    """
    angles = positions.to(torch.float64).unsqueeze(-1) * inv_freq.to(torch.float64)
    return torch.remainder(angles, 2 * math.pi)


def rope_cos_sin(inv_freq: torch.Tensor, positions: torch.Tensor, attention_factor: float = 1.0,
                 dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of the rotation angles, times ``attention_factor``, converted to ``dtype`` once.

    Shapes: inv_freq ``(R/2,)``, positions ``(T,)`` or ``(B, T)`` -> cos, sin each
    ``positions.shape + (R/2,)`` (half-size tables, no duplication).
    """
    check_positions(positions)
    if inv_freq.dim() != 1:
        raise ValueError(f"inv_freq must have shape (R/2,), got {tuple(inv_freq.shape)}")
    angles = rotation_angles(inv_freq.to(positions.device), positions)
    cos = (torch.cos(angles) * attention_factor).to(dtype)
    sin = (torch.sin(angles) * attention_factor).to(dtype)
    return cos, sin
