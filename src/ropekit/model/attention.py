"""How an attention layer turns q, k, v into its output: the one extension point of the model.

The model builds an ``AttentionContext`` once per forward pass (positions, the cos/sin table
computed once, the cache, the mask) and hands it to every layer. Each layer projects q, k, v
and calls ``context.method.attend(layer_idx, q, k, v, context)``.

``AttentionMethod`` is the default: plain RoPE on q and k, keys stored rotated in the cache,
scaled dot-product attention with a causal + padding mask. Alternative methods (Self-Extend,
ReRoPE, dynamic scaling that re-rotates cached keys, ...) subclass it and override ``prepare``
(extra tables, once per forward) and/or ``attend`` (per layer); install one with
``model.set_attention(method)``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from ropekit.model.kv_cache import KVCache
from ropekit.rope import RotaryEmbedding, apply_rotary


@dataclass
class AttentionContext:
    """Everything attention needs for one forward pass, built once and shared by all layers.

    positions: ``[B, T]`` or ``[T]`` long, the rope position of each new token.
    key_positions: ``[B, T]`` long, the same with ``-1`` at padding (what the cache records).
    cache: the ``KVCache`` or None; ``past``: slots already filled before this pass.
    mask: ``[B, 1, T, S]`` bool (True = may attend) or None when ``is_causal``/no mask is needed.
    cos, sin: the rope table at ``positions`` (``positions.shape + (R/2,)``, float32), set by
    ``method.prepare``. ``extra``: room for a method's own per-forward tables.
    """

    positions: torch.Tensor
    key_positions: torch.Tensor
    rope: RotaryEmbedding
    method: AttentionMethod
    cache: KVCache | None = None
    past: int = 0
    mask: torch.Tensor | None = None
    is_causal: bool = False
    cos: torch.Tensor | None = None
    sin: torch.Tensor | None = None
    extra: dict[str, Any] = field(default_factory=dict)


class AttentionMethod:
    """Plain RoPE attention (the LLaMA default): rotate q, k; cache k, v; SDPA with GQA."""

    name = "rope"

    def prepare(self, context: AttentionContext) -> None:
        """Once per forward: compute the cos/sin table at the query positions."""
        context.cos, context.sin = context.rope(context.positions)

    def attend(self, layer_idx: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               context: AttentionContext) -> torch.Tensor:
        """q ``[B, H, T, D]``, k/v ``[B, Hkv, T, D]`` (not rotated) -> output ``[B, H, T, D]``."""
        q = apply_rotary(q, context.cos, context.sin)
        k = apply_rotary(k, context.cos, context.sin)
        if context.cache is not None:
            k, v = context.cache.update(layer_idx, k, v, context.key_positions)  # [B, Hkv, S, D]
        return sdpa(q, k, v, context.mask, context.is_causal)

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


def sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
         is_causal: bool) -> torch.Tensor:
    """Scaled dot-product attention with grouped-query heads.

    q ``[B, H, T, D]``, k/v ``[B, Hkv, S, D]`` with H a multiple of Hkv; mask ``[B, 1, T, S]`` bool.
    """
    groups = q.shape[1] // k.shape[1]
    if groups > 1 and mask is None and not is_causal:
        # Every query sees every key (decoding): fold each group's queries into one KV head's rows
        # instead of copying K and V `groups` times (that copy grows with the cache, every step).
        B, H, T, D = q.shape
        grouped = q.reshape(B, k.shape[1], groups * T, D)  # [B, H, T, D] -> [B, Hkv, G*T, D]
        return F.scaled_dot_product_attention(grouped, k, v).view(B, H, T, D)
    if groups > 1:
        k = k.repeat_interleave(groups, dim=1)  # [B, Hkv, S, D] -> [B, H, S, D]
        v = v.repeat_interleave(groups, dim=1)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal and mask is None)


def build_mask(valid_new: torch.Tensor | None, cache: KVCache | None, past: int,
               num_new: int) -> tuple[torch.Tensor | None, bool]:
    """The attention mask for ``num_new`` queries after ``past`` cached slots: ``(mask, is_causal)``.

    Causality is by slot (query t sits in slot past + t), never by position, so any position
    pattern (repeats, offsets) stays causal. Padding keys (cache position -1 or ``valid_new``
    False) are masked; a padding query may attend everywhere, so its row never is all -inf
    (its output is discarded: no real token attends to it).
    """
    cached_pad = cache is not None and past > 0 and bool((cache.key_positions[:, :past] < 0).any())
    new_pad = valid_new is not None and not bool(valid_new.all())
    if not cached_pad and not new_pad:
        if num_new == 1:
            return None, False  # one query sees every cached key
        if past == 0:
            return None, True
    device = valid_new.device if valid_new is not None else None
    slots = torch.arange(past + num_new, device=device)
    allowed = slots[None, :] <= (past + torch.arange(num_new, device=device))[:, None]  # [T, S]
    key_valid = _key_valid(valid_new, cache, past, num_new)  # [B, S]
    mask = allowed[None] & key_valid[:, None, :]  # [B, T, S]
    if valid_new is not None:
        mask = mask | ~valid_new[:, :, None]  # padding queries attend everywhere
    return mask[:, None], False  # [B, 1, T, S]


def _key_valid(valid_new: torch.Tensor | None, cache: KVCache | None, past: int,
               num_new: int) -> torch.Tensor:
    """``[B, S]`` bool: which of the past + new key slots hold real tokens."""
    parts = []
    if past:
        parts.append(cache.key_positions[:, :past] >= 0)
    if valid_new is None:
        batch = cache.batch_size if cache is not None else 1
        device = cache.key_positions.device if cache is not None else None
        valid_new = torch.ones(batch, num_new, dtype=torch.bool, device=device)
    parts.append(valid_new)
    return torch.cat(parts, dim=1)
