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

import torch

from ropekit.model.attention import AttentionContext, AttentionMethod, sdpa
from ropekit.model.extend.remap import all_key_positions
from ropekit.rope import apply_rotary, rope_cos_sin


class ConsistentDynamicAttention(AttentionMethod):
    name = "consistent"
    stores_rotated_keys = False

    def prepare(self, context: AttentionContext) -> None:
        B = context.key_positions.shape[0]
        k_pos = all_key_positions(context)  # [B, S]
        seq_len = max(int(k_pos.max()), int(context.positions.max())) + 1
        inv_freq, factor = context.rope.frequencies(seq_len)
        context.cos, context.sin = rope_cos_sin(inv_freq, context.positions.expand(B, -1), factor)
        context.extra["k_table"] = rope_cos_sin(inv_freq, k_pos.clamp(min=0), factor)

    def attend(self, layer_idx: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               context: AttentionContext) -> torch.Tensor:
        if context.cache is not None:
            k, v = context.cache.update(layer_idx, k, v, context.key_positions)  # unrotated keys
        q = apply_rotary(q, context.cos, context.sin)
        k = apply_rotary(k, *context.extra["k_table"])
        return sdpa(q, k, v, context.mask, context.is_causal)
