"""What every attention variant shares: the two-step contract, causality by slot, grouped-query SDPA.

A variant is the maths of one training-free context-extension method as functions over q, k, v
and their positions, called in two steps so that a forward pass computes its rotation tables
once and every layer reuses them:

- ``tables = variant.tables(rope, q_pos, k_pos)``: ``rope`` is a ``RotaryEmbedding`` (its
  frequencies at the current length ``current_length(q_pos, k_pos, rope)``: read from the positions,
  one host synchronisation, only for a length-dependent rope type), ``q_pos`` ``[B, T]`` and ``k_pos``
  ``[B, S]`` long positions of the queries and of every key attended to (``-1`` marks a padding key);
- ``out = variant.attend(q, k, v, tables, mask=None, scale=None, softcap=None, layout="half")``:
  q ``[B, H, T, D]``, k/v ``[B, Hkv, S, D]`` **unrotated**, H a multiple of Hkv; ``mask``
  ``[B, 1, T, S]`` bool (True = may attend) or None for causality by slot (query t sits in slot
  ``S - T + t`` and sees slots up to it); ``scale`` the softmax scale (default ``1/sqrt(D)``);
  ``softcap`` caps the scores as ``c * tanh(s / c)`` before the softmax (Gemma 2); ``layout`` the
  rotary pair layout of q and k ("half" or "interleaved"). Returns ``[B, H, T, D]``.

Callers (ropekit's engine, the transformers adapter) cache keys unrotated and pass all of them:
each is rotated on use, so prefill and cached decode agree exactly and length-dependent rope
types use the current frequencies for every cached key.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F

from ropekit.attention.engine import merge_into
from ropekit.attention.fused import ATTENTION_LSE, attention_lse
from ropekit.rope import RotaryEmbedding


class AttentionVariant:
    """Base class of the attention variants (see the module docstring for the contract)."""

    name = "variant"
    # True when ``attend`` with mask None also masks padding read from the positions (keys at -1 never
    # attended, queries at -1 give zeros), so a caller whose mask is exactly that may pass None
    padding_from_positions = False

    def tables(self, rope: RotaryEmbedding, q_pos: torch.Tensor, k_pos: torch.Tensor) -> Any:
        raise NotImplementedError

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, tables: Any,
               mask: torch.Tensor | None = None, scale: float | None = None, softcap: float | None = None,
               layout: str = "half") -> torch.Tensor:
        raise NotImplementedError

    def with_model_config(self, config: Any) -> AttentionVariant:
        """The variant with the settings a model's config declares for it (an HF config object); self
        when the config declares none (the default)."""
        return self

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


def current_length(q_pos: torch.Tensor, k_pos: torch.Tensor, rope: RotaryEmbedding | None = None) -> int | None:
    """The sequence length the frequencies are computed for: the largest position + 1.

    Reading it from the tensors is a host synchronisation, made only where it matters: with ``rope``
    given and a rope type whose frequencies do not depend on the length, None is returned without
    reading anything (``rope.frequencies(None)`` is then the one set of frequencies). Length-dependent
    types (and calls without ``rope``) read it: one synchronisation.
    """
    if rope is not None and not rope.config.is_dynamic:
        return None
    largest = q_pos.max() if q_pos.numel() else None
    if k_pos.numel():
        largest = k_pos.max() if largest is None else torch.maximum(largest, k_pos.max())
    return 1 if largest is None else max(int(largest), 0) + 1


def causal_by_slot(num_queries: int, num_keys: int, device: torch.device | str | None = None) -> torch.Tensor:
    """``[T, S]`` bool: query t (in slot ``S - T + t``) may attend to key slots ``<=`` its own."""
    past = num_keys - num_queries
    slots = torch.arange(num_keys, device=device)
    return slots[None, :] <= (past + torch.arange(num_queries, device=device))[:, None]


def softcapped_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
                         scale: float | None, softcap: float, chunk_size: int = 512) -> torch.Tensor:
    """Attention whose scores are capped as ``c * tanh(s / c)`` before the softmax (Gemma 2), queries in
    chunks (no ``T x S`` score matrix at once). Shapes as ``sdpa``; the softmax runs in float32."""
    B, H, T, D = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    g = H // Hkv
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    out = q.new_empty(B, H, T, v.shape[-1])
    for a in range(0, T, chunk_size):
        b = min(a + chunk_size, T)
        C = b - a
        scores = (q[:, :, a:b].reshape(B, Hkv, g * C, D) @ k.transpose(-1, -2)).view(B, Hkv, g, C, S).float()
        scores = torch.tanh(scores * (scale / softcap)) * softcap
        allowed = causal_by_slot(T, S, q.device)[a:b][None] if mask is None else mask[:, 0, a:b]  # [B|1, C, S]
        scores = scores.masked_fill(~allowed[:, None, None], float("-inf"))
        probs = torch.softmax(scores, dim=-1).nan_to_num_(0.0).to(v.dtype)  # all-masked rows -> zeros
        out[:, :, a:b] = (probs.view(B, Hkv, g * C, S) @ v).view(B, H, C, -1)
    return out


def sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None,
         scale: float | None = None, softcap: float | None = None) -> torch.Tensor:
    """Scaled dot-product attention with grouped-query heads and causality by slot.

    q ``[B, H, T, D]``, k/v ``[B, Hkv, S, D]`` with H a multiple of Hkv; mask ``[B, 1, T, S]`` bool or
    None (causal by slot: one query sees every key; T == S is the usual causal prefill);
    ``softcap``: scores capped as ``c * tanh(s / c)`` (then the capped path runs instead of SDPA).
    Several new queries on a cache (``1 < T < S``, mask None) run as ``cached_causal_attention`` where a
    fused ``attention_lse`` backend applies: no ``[T, S]`` mask and no copy of the keys per query head.
    """
    B, H, T, D = q.shape
    S, groups = k.shape[2], H // k.shape[1]
    if k.dtype != q.dtype:
        k, v = k.to(q.dtype), v.to(q.dtype)
    if softcap:
        return softcapped_attention(q, k, v, mask, scale, softcap)
    if mask is None and T == 1 and groups > 1:
        # One query sees every key (decoding): fold each group's queries into one KV head's rows
        # instead of copying K and V `groups` times (that copy grows with the cache, every step).
        grouped = q.reshape(B, k.shape[1], groups * T, D)  # [B, H, 1, D] -> [B, Hkv, G, D]
        return F.scaled_dot_product_attention(grouped, k, v, scale=scale).view(B, H, T, -1)
    if mask is None and 1 < T < S and ATTENTION_LSE.select(q, k, v, window=(-1, 0), scale=scale) != "torch":
        return cached_causal_attention(q, k, v, scale)
    if groups > 1:
        k = k.repeat_interleave(groups, dim=1)  # [B, Hkv, S, D] -> [B, H, S, D]
        v = v.repeat_interleave(groups, dim=1)
    if mask is None and T == S:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)
    if mask is None and T > 1:
        mask = causal_by_slot(T, S, q.device)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)


def cached_causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                            scale: float | None = None) -> torch.Tensor:
    """T new queries on a cache, causal by slot, as two fused rectangles merged by log-sum-exp.

    q ``[B, H, T, D]``, k/v ``[B, Hkv, S, D]`` with ``1 <= T <= S`` (query t in slot ``S - T + t``), H a
    multiple of Hkv -> ``[B, H, T, Dv]`` in q's dtype. Every query sees all ``S - T`` cached keys (a full
    rectangle) and the new keys up to its own (a causal square); both run through the ``attention_lse``
    op (``ropekit.attention.fused``) and merge exactly, so no ``[T, S]`` mask is built and the keys are
    not copied per query head. This is the chunked-prefill and shared-prefix shape of a passkey trial,
    where SDPA with an explicit mask computes the masked half of the scores as well.
    """
    T, S = q.shape[2], k.shape[2]
    past = S - T
    parts = [attention_lse(q, k[:, :, past:], v[:, :, past:], window=(-1, 0), scale=scale)]
    if past > 0:
        parts.append(attention_lse(q, k[:, :, :past], v[:, :, :past], window=(-1, -1), scale=scale))
    out = torch.empty(*q.shape[:3], v.shape[-1], dtype=torch.float32, device=q.device)
    lse = torch.empty(q.shape[:3], dtype=torch.float32, device=q.device)
    merge_into(out, lse, parts, fresh=True)
    return out.to(q.dtype)
