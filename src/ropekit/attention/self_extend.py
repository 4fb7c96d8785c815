"""Self-Extend (Jin et al. 2024, "LLM Maybe LongLM", arXiv 2401.01325; repo datamllab/LongLM).

Group size G, neighbour window W. For query position i and key position j:
relative position ``i - j`` when ``i - j < W`` (neighbour attention), else
``floor(i/G) + W - floor(W/G) - floor(j/G)`` (grouped attention: keys at ``floor(j/G)``,
queries at ``floor(i/G) + W - floor(W/G)``, LongLM's ``group_query_position``); both score sets
merged into one softmax. Reach about ``(L - W) * G + W`` for a model trained on L tokens.
"""

from __future__ import annotations

import torch

from ropekit.attention.remap import DEFAULT_CHUNK, RemappedVariant


class SelfExtend(RemappedVariant):
    name = "self-extend"

    def __init__(self, group: int = 4, window: int = 1024, chunk_size: int = DEFAULT_CHUNK):
        self.group, self.window, self.block = int(group), int(window), int(chunk_size)

    def far_positions(self, q_pos: torch.Tensor, k_pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        G, W = self.group, self.window
        return q_pos.clamp(min=0) // G + W - W // G, k_pos // G

    def __repr__(self) -> str:
        return f"SelfExtend(group={self.group}, window={self.window})"
