"""Attention variants: training-free context extension as functions over q, k, v and positions.

- ``self_extend``: Self-Extend (Jin et al. 2024); ``rerope``: ReRoPE / Leaky ReRoPE (Su 2023);
- ``dca``: Dual Chunk Attention (An et al. 2024);
- ``consistent_dynamic``: dynamic NTK / YaRN with every cached key at the current frequencies;
- ``engine``: the merge engine: a variant's parts (rotations and the pairs each covers) run through a
  fused attention op with its log-sum-exp and merged exactly (``fused``: that op's backends), or
  through the reference path;
- ``remap``: ``PartsVariant``, the base of the variants the engine runs, and the two-part near/far
  variants Self-Extend and ReRoPE share;
- ``registry``: ``ATTENTION_VARIANTS``, each with typed parameters.
The contract (``base.py``): ``tables(rope, q_pos, k_pos)`` once per forward, ``attend(q, k, v,
tables, mask, scale)`` per layer, on unrotated q and k. ropekit's engine and the transformers
adapter both call exactly these functions. Imports the rope core only.
"""

from ropekit.attention.base import AttentionVariant, causal_by_slot, current_length, sdpa
from ropekit.attention.consistent_dynamic import ConsistentDynamic
from ropekit.attention.dca import DualChunk
from ropekit.attention.engine import Band, ChunkApart, Part, fused_parts_attention, reference_parts_attention
from ropekit.attention.registry import ATTENTION_VARIANTS, AttentionVariantType, build_variant
from ropekit.attention.remap import PartsVariant, RemappedVariant
from ropekit.attention.rerope import ReRope
from ropekit.attention.self_extend import GradedSelfExtend, SelfExtend

__all__ = [
    "ATTENTION_VARIANTS", "AttentionVariant", "AttentionVariantType", "Band", "ChunkApart", "ConsistentDynamic",
    "DualChunk", "GradedSelfExtend", "Part", "PartsVariant", "ReRope", "RemappedVariant", "SelfExtend", "build_variant",
    "causal_by_slot", "current_length", "fused_parts_attention", "reference_parts_attention", "sdpa",
]
