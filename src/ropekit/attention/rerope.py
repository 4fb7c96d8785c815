"""ReRoPE and Leaky ReRoPE (Su 2023, kexue.fm/archives/9708; repo bojone/rerope).

Relative distance ``r`` is used as is below the window ``w``; beyond it, ReRoPE clips it to
``w`` (``r' = min(r, w)``) and Leaky ReRoPE lets it grow slowly (``r' = w + (r - w) / k``).
Far pairs are rotated with q at ``w`` and k at 0 (ReRoPE), or q at ``i/k + w(1 - 1/k)`` and k at
``j/k`` (Leaky), whose difference is exactly ``r'``. Optional ``logn=true``: queries scaled by
``max(1, ln(pos + 1) / ln(L))`` as in Su's reference patch (off by default: SmolLM2 was not
trained with it).
"""

from __future__ import annotations

import math

import torch

from ropekit.attention.remap import DEFAULT_CHUNK, RemappedVariant
from ropekit.rope import RotaryEmbedding

DEFAULT_TRAINED = 2048  # L for log-n scaling when the rope does not say


class ReRope(RemappedVariant):
    """``leak=None``: ReRoPE; ``leak=k > 1``: Leaky ReRoPE."""

    def __init__(self, window: int = 512, leak: float | None = None, logn: bool = False,
                 chunk_size: int = DEFAULT_CHUNK):
        self.window, self.leak, self.logn, self.block = int(window), leak, bool(logn), int(chunk_size)
        self.name = "rerope" if leak is None else "leaky-rerope"

    def far_positions(self, q_pos: torch.Tensor, k_pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        w = self.window
        if self.leak is None:
            return torch.full_like(q_pos, w), torch.zeros_like(k_pos)
        k = float(self.leak)
        return q_pos.to(torch.float64) / k + w * (1 - 1 / k), k_pos.to(torch.float64) / k

    def query_scale(self, q_pos: torch.Tensor, rope: RotaryEmbedding) -> torch.Tensor | None:
        if not self.logn:
            return None
        trained = rope.config.original_max_position_embeddings or DEFAULT_TRAINED
        return (torch.log(q_pos.clamp(min=0).to(torch.float64) + 1) / math.log(trained)).clamp(min=1).float()

    def __repr__(self) -> str:
        leak = "" if self.leak is None else f", k={self.leak}"
        return f"ReRope(window={self.window}{leak}, logn={self.logn})"
