"""ropekit: rotary position embeddings for LLaMA-family models, exact, fast, and measured."""

from ropekit.loading import load_model
from ropekit.model.generate import generate
from ropekit.rope import (
    METHODS,
    RopeConfig,
    RotaryEmbedding,
    apply_rotary,
    apply_rotary_qk,
    compute_inv_freq,
    parse_spec,
    rope_cos_sin,
)

__version__ = "0.1.0"

__all__ = [
    "METHODS", "RopeConfig", "RotaryEmbedding", "apply_rotary", "apply_rotary_qk", "compute_inv_freq",
    "generate", "load_model", "parse_spec", "rope_cos_sin",
]
