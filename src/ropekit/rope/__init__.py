"""The rope core: frequencies for every rope type, typed configs, cos/sin, apply, the kernel dispatch point.

Imports torch only. Fused kernels register themselves with ``ropekit.dispatch`` from the
layer above (``ropekit.kernels``); the core never imports them.
"""

from ropekit.rope.apply import LAYOUTS, apply_rotary, apply_rotary_positions, apply_rotary_qk, rotate_reference
from ropekit.rope.config import ROPE_TYPES, RopeConfig, RopeType, canonical_rope_type, compute_inv_freq, parse_part
from ropekit.rope.cos_sin import rope_cos_sin, rotation_angles
from ropekit.rope.module import RotaryEmbedding

__all__ = [
    "LAYOUTS", "ROPE_TYPES", "RopeConfig", "RopeType", "RotaryEmbedding", "apply_rotary", "apply_rotary_positions",
    "apply_rotary_qk", "canonical_rope_type", "compute_inv_freq", "parse_part", "rope_cos_sin", "rotate_reference",
    "rotation_angles",
]

