"""cos/sin tables from inverse frequencies and positions, exact at huge positions."""

from __future__ import annotations

import math

import torch

MAX_POSITION = 2**31  # positions must lie in [0, MAX_POSITION)


def check_positions(positions: torch.Tensor, end: int = MAX_POSITION) -> None:
    """Raise ValueError unless ``positions`` is a real tensor of shape (T,) or (B, T) in [0, end).

    Integer positions are the usual case; floating ones (finite) serve methods that place tokens
    between integer positions (Leaky ReRoPE's far pairs). ``end`` defaults to 2^31.

    No host synchronisation: the value check is one ``torch._assert_async`` on the positions' device.
    On the CPU it fails at once and the ValueError below names the range; on an accelerator a bad
    position stops the device at its next synchronisation (as an out-of-range index does).
    """
    if not isinstance(positions, torch.Tensor) or positions.is_complex() or positions.dtype == torch.bool:
        raise ValueError(f"positions must be an integer or float tensor, got "
                         f"{getattr(positions, 'dtype', type(positions).__name__)}")
    if positions.dim() not in (1, 2):
        raise ValueError(f"positions must have shape (T,) or (B, T), got {tuple(positions.shape)}")
    if positions.numel() == 0:
        return
    in_range = (positions >= 0) & (positions < end)  # False for NaN
    try:
        torch._assert_async(in_range.all(), "positions out of range")
    except RuntimeError:  # raised here only where the check ran at once (the CPU)
        raise ValueError(_range_message(positions, end)) from None


def _range_message(positions: torch.Tensor, end: int) -> str:
    """What is wrong with positions that failed ``check_positions`` (reads them: the error path only)."""
    if positions.dtype.is_floating_point and not bool(torch.isfinite(positions).all()):
        return "positions must be finite"
    bound = "2**31" if end == MAX_POSITION else str(end)
    return (f"positions must lie in [0, {bound}), got min {float(positions.min()):g}, "
            f"max {float(positions.max()):g}")


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

    Shapes: inv_freq ``(R/2,)``, positions ``(T,)`` or ``(B, T)`` (integer, or float for positions
    between tokens) -> cos, sin each ``positions.shape + (R/2,)`` (half-size tables, no duplication).
    ``dtype`` must be a floating dtype (float32 by default: the apply step rotates in float32).
    """
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(f"rope_cos_sin dtype must be a floating dtype (float32, float64, ...), got {dtype}")
    check_positions(positions)
    if inv_freq.dim() != 1:
        raise ValueError(f"inv_freq must have shape (R/2,), got {tuple(inv_freq.shape)}")
    angles = rotation_angles(inv_freq.to(positions.device), positions)
    cos = (torch.cos(angles) * attention_factor).to(dtype)
    sin = (torch.sin(angles) * attention_factor).to(dtype)
    return cos, sin
