"""Self-Extend (Jin et al. 2024, "LLM Maybe LongLM", arXiv 2401.01325; repo datamllab/LongLM), and
graded Self-Extend, whose group grows with distance.

**Self-Extend**: group size G, neighbour window W. For query position i and key position j:
relative position ``i - j`` when ``i - j < W`` (neighbour attention), else
``floor(i/G) + W - floor(W/G) - floor(j/G)`` (grouped attention: keys at ``floor(j/G)``,
queries at ``floor(i/G) + W - floor(W/G)``, LongLM's ``group_query_position``); both score sets
merged into one softmax. Reach about ``(L - W) * G + W`` for a model trained on L tokens.

**Graded Self-Extend** (``graded-self-extend:windows=[W_0,...,W_{K-1}],groups=[G_0,...,G_{K-1}]``):
distances below ``W_0`` are exact; a pair at distance ``i - j`` in ``[W_k, W_{k+1})`` (the last band
unbounded) is grouped by ``G_k``: key at ``floor(j/G_k)``, query at ``floor(i/G_k) + c_k``, with
``c_0 = W_0 - floor(W_0/G_0)`` (Self-Extend's shift) and
``c_k = c_{k-1} + floor(W_k/G_{k-1}) - floor(W_k/G_k)``, so that each band starts where the previous
one ends (the grouped distance is continuous at every ``W_k``, up to the floors). A small group keeps
nearby text in order and a large one reaches far: the grouped distance of ``N`` tokens is about
``N / G_{K-1} + c_{K-1}``, which must stay below the trained length. One band is Self-Extend itself.
K + 1 parts, one softmax, merged by the engine.
"""

from __future__ import annotations

import torch

from ropekit.attention.engine import Band, Part
from ropekit.attention.remap import DEFAULT_CHUNK, PartsVariant, RemappedVariant
from ropekit.rope import RotaryEmbedding, rope_cos_sin


class SelfExtend(RemappedVariant):
    name = "self-extend"

    def __init__(self, group: int = 4, window: int = 1024, chunk_size: int = DEFAULT_CHUNK):
        self.group, self.window, self.block = int(group), int(window), int(chunk_size)

    def far_positions(self, q_pos: torch.Tensor, k_pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        G, W = self.group, self.window
        return q_pos.clamp(min=0) // G + W - W // G, k_pos // G

    def __repr__(self) -> str:
        return f"SelfExtend(group={self.group}, window={self.window})"


def graded_shifts(windows: tuple[int, ...], groups: tuple[int, ...]) -> tuple[int, ...]:
    """The query shift ``c_k`` of each band (see the module docstring); one per window."""
    shifts = [windows[0] - windows[0] // groups[0]]
    for k in range(1, len(windows)):
        shifts.append(shifts[-1] + windows[k] // groups[k - 1] - windows[k] // groups[k])
    return tuple(shifts)


def graded_distance(distance: int, query: int, windows: tuple[int, ...], groups: tuple[int, ...]) -> int:
    """The relative position graded Self-Extend gives a query at position ``query`` and a key ``distance``
    before it (``0 <= distance <= query``); for reading and planning, the engine uses ``parts``."""
    if distance < windows[0]:
        return distance
    band = max(k for k, start in enumerate(windows) if start <= distance)
    G = groups[band]
    return query // G + graded_shifts(windows, groups)[band] - (query - distance) // G


def check_graded(windows: tuple[int, ...], groups: tuple[int, ...]) -> None:
    """ValueError naming the keys unless there is one group per window (the lists' own rules are the
    registry's: integers >= 1, windows strictly increasing)."""
    if len(windows) != len(groups):
        raise ValueError(f"graded-self-extend keys 'windows' and 'groups' must have the same length (one group per "
                         f"band), got {len(windows)} windows and {len(groups)} groups")


class GradedSelfExtend(PartsVariant):
    """Self-Extend with one group per band of distances: ``windows`` the bands' starts, ``groups`` their
    group sizes; ``block``: queries per block."""

    name = "graded-self-extend"

    def __init__(self, windows: tuple[int, ...] = (1024, 4096), groups: tuple[int, ...] = (4, 16),
                 chunk_size: int = DEFAULT_CHUNK):
        self.windows, self.groups = tuple(int(w) for w in windows), tuple(int(g) for g in groups)
        check_graded(self.windows, self.groups)
        self.shifts = graded_shifts(self.windows, self.groups)  # the query shift of each band, fixed
        self.block = int(chunk_size)

    def parts(self, rope: RotaryEmbedding, q_pos: torch.Tensor, k_pos: torch.Tensor, inv_freq: torch.Tensor,
              factor: float) -> list[Part]:
        """The exact band ``Band(None, W_0 - 1)``, then band k ``Band(W_k, W_{k+1} - 1)`` (the last
        unbounded) at the grouped positions of ``G_k``."""
        q_safe, k_safe = q_pos.clamp(min=0), k_pos.clamp(min=0)  # padding is masked; any rotation will do
        out = [Part(rope_cos_sin(inv_freq, q_safe, factor), rope_cos_sin(inv_freq, k_safe, factor),
                    Band(None, self.windows[0] - 1))]
        for k, (start, G, shift) in enumerate(zip(self.windows, self.groups, self.shifts, strict=True)):
            end = self.windows[k + 1] - 1 if k + 1 < len(self.windows) else None
            out.append(Part(rope_cos_sin(inv_freq, q_safe // G + shift, factor), rope_cos_sin(inv_freq, k_safe // G,
                                                                                                factor),
                            Band(start, end)))
        return out

    def __repr__(self) -> str:
        return f"GradedSelfExtend(windows={list(self.windows)}, groups={list(self.groups)})"
