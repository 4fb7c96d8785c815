"""Cache-consistent dynamic scaling: every cached key is used with the CURRENT frequencies.

transformers' dynamic NTK / dynamic YaRN recompute the base for the current length but keep
cached keys with the rotation they got when they were written (transformers issue #25104), so
one softmax mixes keys rotated under different bases. Here keys are cached unrotated and all
of them (and the queries) are rotated at each forward with the frequencies of the current
length ``n = max position + 1``. Within one layer this equals recomputing the attention from
scratch at length n; hidden states of earlier tokens (the inputs of deeper layers' keys) were
still computed at their own time, as in any causal cache. Attention itself is SDPA.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ropekit.attention.base import AttentionVariant, current_length, sdpa
from ropekit.rope import RotaryEmbedding, apply_rotary, rope_cos_sin


@dataclass
class ConsistentTables:
    q: tuple[torch.Tensor, torch.Tensor]  # cos/sin at the query positions, current frequencies
    k: tuple[torch.Tensor, torch.Tensor]  # cos/sin at every key position, the same frequencies


class ConsistentDynamic(AttentionVariant):
    name = "consistent"

    def tables(self, rope: RotaryEmbedding, q_pos: torch.Tensor, k_pos: torch.Tensor) -> ConsistentTables:
        inv_freq, factor = rope.frequencies(current_length(q_pos, k_pos, rope))
        return ConsistentTables(q=rope_cos_sin(inv_freq, q_pos, factor),
                                k=rope_cos_sin(inv_freq, k_pos.clamp(min=0), factor))

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, tables: ConsistentTables,
               mask: torch.Tensor | None = None, scale: float | None = None, softcap: float | None = None,
               layout: str = "half") -> torch.Tensor:
        # rounded once, to the cache's dtype (q may come in float32 from the decode kernels)
        q, k = apply_rotary(q, *tables.q, layout=layout).to(v.dtype), apply_rotary(k, *tables.k, layout=layout)
        return sdpa(q, k, v, mask, scale, softcap)
