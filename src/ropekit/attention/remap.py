"""Variants made of parts (``ropekit.attention.engine``): the base class, and the two-part variants with
remapped relative positions, Self-Extend and (Leaky) ReRoPE.

A two-part variant gives each query-key pair one of two rotations:
- *near* pairs (relative position ``pos_q - pos_k < window``) use the normal RoPE rotation;
- *far* pairs use a second rotation of q and k at remapped positions (Self-Extend: grouped
  ``floor(p/G)`` positions; ReRoPE: q at ``w`` and k at 0, so the relative distance is ``w``).
Both score sets go into ONE softmax, merged by the engine.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ropekit.attention.base import AttentionVariant, current_length
from ropekit.attention.engine import (
    DEFAULT_BLOCK,
    Band,
    Part,
    RowGroup,
    consecutive_rows,
    fused_parts_attention,
    reference_parts_attention,
)
from ropekit.rope import RotaryEmbedding, apply_rotary, rope_cos_sin

DEFAULT_CHUNK = DEFAULT_BLOCK
BACKENDS = ("reference", "torch", "cpu-flash", "cuda-varlen", "emulated-varlen")


@dataclass
class PartsTables:
    """Per-forward tables of a variant made of parts: positions, the parts (rotation tables and the pairs
    each covers), an optional query scale, and the rows' layout for the fused path (None: reference)."""

    q_pos: torch.Tensor  # [B, T], -1 = padding
    k_pos: torch.Tensor  # [B, S], -1 = padding
    parts: list[Part]
    q_scale: torch.Tensor | None  # [B, T] multiplier on the queries, or None
    groups: list[RowGroup] | None


class PartsVariant(AttentionVariant):
    """Base class of the variants the merge engine runs: subclasses implement ``parts(rope, q_pos, k_pos,
    inv_freq, factor) -> list[Part]`` and may implement ``query_scale``; ``block`` is the engine's query
    block (windows on the fused path, score blocks on the reference path)."""

    block: int = DEFAULT_BLOCK
    padding_from_positions = True

    def parts(self, rope: RotaryEmbedding, q_pos: torch.Tensor, k_pos: torch.Tensor, inv_freq: torch.Tensor,
              factor: float) -> list[Part]:
        raise NotImplementedError

    def query_scale(self, q_pos: torch.Tensor, rope: RotaryEmbedding) -> torch.Tensor | None:
        """Optional ``[B, T]`` multiplier on the queries (ReRoPE's log-n scaling); None = none."""
        return None

    def tables(self, rope: RotaryEmbedding, q_pos: torch.Tensor, k_pos: torch.Tensor) -> PartsTables:
        """The parts' rotation tables at the current length's frequencies, and the rows' layout."""
        inv_freq, factor = rope.frequencies(current_length(q_pos, k_pos, rope))
        return PartsTables(q_pos=q_pos, k_pos=k_pos, parts=self.parts(rope, q_pos, k_pos, inv_freq, factor),
                           q_scale=self.query_scale(q_pos, rope), groups=consecutive_rows(q_pos, k_pos))

    @staticmethod
    def key_tables(tables: PartsTables) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """The distinct key rotations of the parts, in order (parts may share one: DCA's three do)."""
        distinct: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        for part in tables.parts:
            distinct.setdefault(id(part.k_table[0]), part.k_table)
        return list(distinct.values())

    def rotate_keys(self, k: torch.Tensor, tables: PartsTables, layout: str = "half", dtype: torch.dtype | None = None,
                    start: int = 0) -> list[torch.Tensor]:
        """k ``[B, Hkv, n, D]`` (unrotated, the keys of slots ``start..start+n-1``) rotated by each of
        ``key_tables(tables)``, rounded once to ``dtype`` (default k's)."""
        end = start + k.shape[2]
        return [apply_rotary(k, cos[:, start:end], sin[:, start:end], layout=layout).to(dtype or k.dtype)
                for cos, sin in self.key_tables(tables)]

    def attend(self, q: torch.Tensor, k: torch.Tensor | None, v: torch.Tensor, tables: PartsTables,
               mask: torch.Tensor | None = None, scale: float | None = None, softcap: float | None = None,
               layout: str = "half", backend: str | None = None,
               rotated_keys: list[torch.Tensor] | None = None) -> torch.Tensor:
        """q ``[B, H, T, D]``, k/v ``[B, Hkv, S, D]`` unrotated -> ``[B, H, T, D]``.

        ``backend``: None picks the fused engine where it applies (no mask, no softcap, rows of
        consecutive slots) and the reference path elsewhere; "reference" forces the reference path; an
        ``attention_lse`` backend name ("cpu-flash", "cuda-varlen", "emulated-varlen", "torch") forces
        the fused engine with that op (ValueError where the rows do not allow it). ``rotated_keys``: the
        keys already rotated (``rotate_keys`` of all S of them, e.g. kept in a KV cache); then k is unused.
        """
        if backend is not None and backend not in BACKENDS:
            raise ValueError(f"attention backend {backend!r} is not one of {', '.join(BACKENDS)}")
        if tables.q_scale is not None:
            q = q * tables.q_scale[:, None, :, None].to(q.dtype)
        if rotated_keys is None:
            rotated_keys = self.rotate_keys(k, tables, layout, v.dtype)
        by_table = {id(table[0]): keys for table, keys in zip(self.key_tables(tables), rotated_keys, strict=True)}
        queries: dict[int, torch.Tensor] = {}
        qs = []
        for part in tables.parts:  # float32 angles; rounded once, to the cache's dtype (q may come in float32)
            if id(part.q_table[0]) not in queries:
                queries[id(part.q_table[0])] = apply_rotary(q, *part.q_table, layout=layout).to(v.dtype)
            qs.append(queries[id(part.q_table[0])])
        ks = [by_table[id(part.k_table[0])] for part in tables.parts]
        coverages = [part.coverage for part in tables.parts]
        fusable = mask is None and not softcap and tables.groups is not None
        if backend == "reference" or (backend is None and not fusable):
            return reference_parts_attention(qs, ks, v, coverages, tables.q_pos, tables.k_pos, mask, self.block,
                                             scale, softcap)
        if not fusable:
            raise ValueError(f"attention backend {backend!r}: the fused engine needs no mask, no softcap and rows "
                             "of consecutive slots; use backend=None or 'reference'")
        return fused_parts_attention(qs, ks, v, coverages, tables.groups, scale, self.block, backend)


class RemappedVariant(PartsVariant):
    """Two parts: near pairs at their true relative positions, far pairs at ``far_positions``.

    Subclasses set ``window`` and ``block`` and implement ``far_positions(q_pos, k_pos) -> (q_far, k_far)``
    (float or long tensors of the same shapes).
    """

    window: int

    def far_positions(self, q_pos: torch.Tensor, k_pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def parts(self, rope: RotaryEmbedding, q_pos: torch.Tensor, k_pos: torch.Tensor, inv_freq: torch.Tensor,
              factor: float) -> list[Part]:
        """near ``Band(None, window - 1)`` at the true positions, far ``Band(window, None)`` remapped."""
        q_safe, k_safe = q_pos.clamp(min=0), k_pos.clamp(min=0)  # padding is masked; any rotation will do
        q_far, k_far = self.far_positions(q_safe, k_safe)
        return [Part(rope_cos_sin(inv_freq, q_safe, factor), rope_cos_sin(inv_freq, k_safe, factor),
                     Band(None, self.window - 1)),
                Part(rope_cos_sin(inv_freq, q_far, factor), rope_cos_sin(inv_freq, k_far, factor),
                     Band(self.window, None))]
