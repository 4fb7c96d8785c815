"""Fused rotary kernels behind one dispatch point (``dispatch.rotary_dispatch``)."""

from ropekit.kernels.dispatch import (
    ENV_VAR,
    available_backends,
    register_backend,
    rotary_dispatch,
    select_backend,
)


def apply_rotary_positions(*args, **kwargs):
    """``apply_rotary`` with the position gather fused in; see ``registry.apply_rotary_positions``."""
    from ropekit.kernels.registry import apply_rotary_positions as fused

    return fused(*args, **kwargs)


__all__ = ["ENV_VAR", "apply_rotary_positions", "available_backends", "register_backend", "rotary_dispatch",
           "select_backend"]
