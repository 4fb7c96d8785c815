"""Fused rotary kernels behind one dispatch point (``dispatch.rotary_dispatch``)."""

from ropekit.kernels.dispatch import ENV_VAR, available_backends, register_backend, rotary_dispatch, select_backend

__all__ = ["ENV_VAR", "available_backends", "register_backend", "rotary_dispatch", "select_backend"]
