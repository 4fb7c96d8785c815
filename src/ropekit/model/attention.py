"""How an attention layer turns q, k, v into its output: the engine's one extension point.

The model builds an ``AttentionContext`` once per forward pass (positions, the cache, the
mask) and hands it to every layer. ``context.attention.prepare(context)`` runs once per forward
(rope tables), then each layer projects q, k, v and calls
``context.attention.attend(layer_idx, q, k, v, context)``.

- ``RopeAttention`` (the default): plain RoPE on q and k, keys cached rotated, scaled dot-product
  attention; a one-token step of one sequence goes through the ``decode_attention`` kernel.
- ``VariantHook(variant)``: the engine-side hook that runs one attention variant of
  ``ropekit.attention`` (an ``AttentionVariant``: Self-Extend, ReRoPE, cache-consistent dynamic
  scaling, ...): keys cached unrotated, the variant's tables computed once per forward from every
  key's position, its ``attend`` called per layer.

Install one with ``model.set_attention(...)``, or from a spec with ``patch``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from ropekit.attention import AttentionVariant, PartsVariant, sdpa
from ropekit.dispatch import Recording
from ropekit.method import Method, parse_method
from ropekit.model.kv_cache import KVCache
from ropekit.rope import RopeConfig, RotaryEmbedding, apply_rotary


@dataclass
class AttentionContext:
    """Everything attention needs for one forward pass, built once and shared by all layers.

    positions: ``[B, T]`` or ``[T]`` long, the rope position of each new token.
    key_positions: ``[B, T]`` long, the same with ``-1`` at padding (what the cache records).
    cache: the ``KVCache`` or None; ``past``: slots already filled before this pass.
    mask: ``[B, 1, T, S]`` bool (True = may attend), or None for causality by slot (query t in
    slot ``past + t`` sees every slot up to its own; no padding anywhere).
    position_end: a host-side int greater than every position (counted by the engine from the cache
    and the number of new tokens), or None when the caller chose the positions; it lets the rope gather
    its cached table without reading the positions (no host synchronisation). position_start: the host
    int p when every row's positions are ``p .. p + T - 1`` (the engine's own positions, no padding), so
    the cache's bookkeeping reads nothing back either; else None.
    cos, sin: the rope table at ``positions`` (``positions.shape + (R/2,)``, float32), set by
    ``RopeAttention.prepare``. ``extra``: room for an attention's own per-forward tables.
    recording: when set, every fused op of this pass runs through its planner and keeps its replay
    call there (``ropekit.model.decode_graph``); None for an ordinary pass.
    """

    positions: torch.Tensor
    key_positions: torch.Tensor
    rope: RotaryEmbedding
    attention: EngineAttention
    cache: KVCache | None = None
    past: int = 0
    position_end: int | None = None
    position_start: int | None = None
    mask: torch.Tensor | None = None
    cos: torch.Tensor | None = None
    sin: torch.Tensor | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    recording: Recording | None = None

    def all_key_positions(self) -> torch.Tensor:
        """``[B, S]`` long: the positions of every key this pass attends to (cached + new; -1 = padding)."""
        B = self.key_positions.shape[0]
        new = self.key_positions.expand(B, -1)
        if self.cache is None or self.past == 0:
            return new
        return torch.cat([self.cache.key_positions[:, : self.past], new], dim=1)


class EngineAttention:
    """The interface: ``prepare(context)`` once per forward, ``attend(layer_idx, q, k, v, context)`` per layer.

    q ``[B, H, T, D]``, k/v ``[B, Hkv, T, D]`` (this pass's tokens, unrotated) -> ``[B, H, T, D]``.
    """

    name = "attention"

    def prepare(self, context: AttentionContext) -> None:
        pass

    def attend(self, layer_idx: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               context: AttentionContext) -> torch.Tensor:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class RopeAttention(EngineAttention):
    """Plain RoPE attention (the LLaMA default): rotate q, k; cache k (rotated), v; SDPA with GQA."""

    name = "rope"

    def prepare(self, context: AttentionContext) -> None:
        """Once per forward: the cos/sin rows at the query positions, gathered from the rope's table (built
        once) for a fixed-length rope type: no host synchronisation; a length-dependent type reads its
        current length from the positions (one synchronisation) and computes them."""
        context.cos, context.sin = context.rope(context.positions, position_end=context.position_end)

    def attend(self, layer_idx: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               context: AttentionContext) -> torch.Tensor:
        cache = context.cache
        if cache is not None and context.mask is None and q.shape[0] == 1 and q.shape[2] == 1:
            recording = context.recording
            joint = adjacent_heads(q, k)
            if joint is not None:  # q and k are neighbours in one buffer (a fused decode step): one call
                apply_rotary(joint, context.cos, context.sin, out=joint, recording=recording)
            else:
                q = apply_rotary(q, context.cos, context.sin, recording=recording)
                k = apply_rotary(k, context.cos, context.sin, recording=recording)
            # one token: the decode kernel
            position = context.key_positions if context.position_start is None else context.position_start
            return cache.attend_one(layer_idx, q, k, v, position, recording=recording)
        q = apply_rotary(q, context.cos, context.sin)
        k = apply_rotary(k, context.cos, context.sin)
        if cache is None:
            return sdpa(q, k, v, context.mask)
        k, v = cache.update(layer_idx, k, v, context.key_positions, context.position_start)  # [B, Hkv, S, D]
        return sdpa(q, k, v, context.mask)


def adjacent_heads(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor | None:
    """``[1, H + Hkv, 1, D]``: one view of q ``[1, H, 1, D]`` and k ``[1, Hkv, 1, D]`` when k's heads follow
    q's in memory with the same layout (the fused q|k|v buffer of a decode step), else None."""
    D = q.shape[-1]
    if (q.dtype != k.dtype or q.stride(-1) != 1 or k.stride(-1) != 1 or q.stride(1) != D or k.stride(1) != D
            or k.shape[-1] != D or q.requires_grad or k.requires_grad
            or k.data_ptr() != q.data_ptr() + q.shape[1] * D * q.element_size()):
        return None
    return q.as_strided((1, q.shape[1] + k.shape[1], 1, D), (q.stride(0), D, q.stride(2), 1))


class VariantHook(EngineAttention):
    """The engine's attention hook for one ``AttentionVariant``; not itself a variant, it runs one in the model.

    ``variant`` (from ``ropekit.attention``) holds the maths; this hook adapts it to ``EngineAttention``:
    keys are cached unrotated, ``prepare`` computes the variant's tables once per forward from the query
    positions ``[B, T]`` and every key's position ``[B, S]``, and ``attend`` takes q ``[B, H, T, D]``, this
    pass's k/v ``[B, Hkv, T, D]`` (appended to the cache) and returns ``[B, H, T, D]``.
    """

    def __init__(self, variant: AttentionVariant):
        self.variant = variant
        self.name = variant.name

    def prepare(self, context: AttentionContext) -> None:
        # the queries' positions with -1 at padding, like the keys': a variant made of parts reads the
        # padding from them (then the mask is not needed: build_mask is causality by slot and padding)
        context.extra["tables"] = self.variant.tables(context.rope, context.key_positions,
                                                      context.all_key_positions())

    def attend(self, layer_idx: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               context: AttentionContext) -> torch.Tensor:
        cache, tables = context.cache, context.extra["tables"]
        if cache is not None:
            k, v = cache.update(layer_idx, k, v, context.key_positions, context.position_start)  # unrotated keys
        mask = None if self.variant.padding_from_positions else context.mask
        if cache is not None and isinstance(self.variant, PartsVariant) and not context.rope.config.is_dynamic:
            # a fixed-length rope turns each key the same way at every pass: keep the rotated keys in the
            # cache and rotate only the new ones (each part's key position depends on the key's own alone)
            return self.variant.attend(q, None, v, tables, mask, rotated_keys=self._rotated_keys(layer_idx, k, v,
                                                                                                 context))
        return self.variant.attend(q, k, v, tables, mask)

    def _rotated_keys(self, layer_idx: int, k: torch.Tensor, v: torch.Tensor,
                      context: AttentionContext) -> list[torch.Tensor]:
        """Every cached key rotated by each of the variant's key rotations ``[B, Hkv, S, D]``, from the cache's
        store of them (named by the variant and the rope, so a patch starts a new one); new slots rotated now."""
        tables, S = context.extra["tables"], k.shape[2]
        names = self.variant.key_tables(tables)
        name = f"{self.variant!r}|{context.rope.config!r}"
        buffers, filled = context.cache.derived_keys(name, len(names), layer_idx)
        if filled < S:
            fresh = self.variant.rotate_keys(k[:, :, filled:S], tables, dtype=v.dtype, start=filled)
            for buffer, rotated in zip(buffers, fresh, strict=True):
                buffer[:, :, filled:S] = rotated
            context.cache.set_derived_fill(name, layer_idx, S)
        return [buffer[:, :, :S] for buffer in buffers]

    def __repr__(self) -> str:
        return f"VariantHook({self.variant!r})"


def attention_for(method: Method) -> EngineAttention:
    """The engine attention a method asks for: its variant, or plain rope attention."""
    variant = method.variant()
    return RopeAttention() if variant is None else VariantHook(variant)


def patch(model, method: str | Method, base_rope: RopeConfig | None = None):
    """Configure ``model`` (a ``LlamaModel``) for ``method`` (a method string such as ``"yarn:factor=2"``
    or a parsed ``Method``): set its rope and its attention; returns the model, as ``ropekit.hf.patch``
    does for a transformers model.

    ``base_rope`` is the model's own rope (used when the method has no rope part, and whose geometry
    the method's rope part is validated against); default: the model's current rope, so pass the
    loaded one when switching between several methods.
    """
    method = parse_method(method)
    base = base_rope if base_rope is not None else model.config.rope
    model.set_rope(method.rope_config(base))
    model.set_attention(attention_for(method))
    return model


def build_mask(valid_new: torch.Tensor | None, cache: KVCache | None, past: int,
               num_new: int) -> torch.Tensor | None:
    """The attention mask for ``num_new`` queries after ``past`` cached slots, or None (causal by slot).

    Causality is by slot (query t sits in slot past + t), never by position, so any position
    pattern (repeats, offsets) stays causal. Padding keys (cache position -1 or ``valid_new``
    False) are masked; a padding query may attend everywhere, so its row never is all -inf
    (its output is discarded: no real token attends to it).
    """
    cached_pad = (cache is not None and past > 0 and cache.padded  # a host flag: nothing read for a cache never padded
                  and bool((cache.key_positions[:, :past] < 0).any()))
    new_pad = valid_new is not None and not bool(valid_new.all())
    if not cached_pad and not new_pad:
        return None
    device = valid_new.device if valid_new is not None else None
    slots = torch.arange(past + num_new, device=device)
    allowed = slots[None, :] <= (past + torch.arange(num_new, device=device))[:, None]  # [T, S]
    key_valid = _key_valid(valid_new, cache, past, num_new)  # [B, S]
    mask = allowed[None] & key_valid[:, None, :]  # [B, T, S]
    if valid_new is not None:
        mask = mask | ~valid_new[:, :, None]  # padding queries attend everywhere
    return mask[:, None]  # [B, 1, T, S]


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


__all__ = ["AttentionContext", "EngineAttention", "RopeAttention", "VariantHook", "patch",
           "attention_for", "build_mask"]

