"""ropekit: rotary position embeddings for LLaMA-family models, exact, fast, and measured past the trained length.

``import ropekit`` loads the rope core and registers the fused kernels (torch and numpy only);
everything else is imported on first use of its name: the subpackages (``ropekit.hf``,
``ropekit.eval``, ``ropekit.model``, ...) and the lazy top-level names (``load_model``,
``generate``, ``parse_method``, ...).
"""

from __future__ import annotations

import importlib
import pkgutil
from typing import Any

import ropekit.kernels  # noqa: F401  (registers the fused kernels with the core's dispatch point)
from ropekit.rope import (
    ROPE_TYPES,
    RopeConfig,
    RotaryEmbedding,
    apply_rotary,
    apply_rotary_qk,
    compute_inv_freq,
    parse_part,
    rope_cos_sin,
)

__version__ = "0.2.0"

# every subpackage and module in this folder, reachable as ``ropekit.<name>``, imported on first access (PEP 562)
_SUBMODULES = frozenset(info.name for info in pkgutil.iter_modules(__path__) if not info.name.startswith("_"))

# name -> module that defines it, imported on first access (PEP 562)
_LAZY = {
    "load_model": "ropekit.loading",
    "generate": "ropekit.model.generate",
    "parse_method": "ropekit.method",
    "Method": "ropekit.method",
    "ATTENTION_VARIANTS": "ropekit.attention",
}

__all__ = [
    "ATTENTION_VARIANTS", "Method", "ROPE_TYPES", "RopeConfig", "RotaryEmbedding", "apply_rotary",
    "apply_rotary_qk", "compute_inv_freq", "generate", "load_model", "parse_method", "parse_part", "rope_cos_sin",
]


def __getattr__(name: str) -> Any:
    """``ropekit.<subpackage>`` and the lazy top-level names, imported on first access."""
    if name in _SUBMODULES:
        return importlib.import_module(f"{__name__}.{name}")
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'ropekit' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY) | set(_SUBMODULES))
