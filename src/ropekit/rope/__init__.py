"""The rope core: frequencies for every rope type, typed configs, cos/sin, apply. Imports torch only."""

from ropekit.rope.apply import LAYOUTS, apply_rotary, apply_rotary_qk, rotate_reference
from ropekit.rope.config import METHODS, RopeConfig, canonical_rope_type, compute_inv_freq, parse_spec
from ropekit.rope.cos_sin import rope_cos_sin, rotation_angles
from ropekit.rope.module import RotaryEmbedding

__all__ = [
    "LAYOUTS", "METHODS", "RopeConfig", "RotaryEmbedding", "apply_rotary", "apply_rotary_qk",
    "canonical_rope_type", "compute_inv_freq", "parse_spec", "rope_cos_sin", "rotate_reference",
    "rotation_angles",
]
