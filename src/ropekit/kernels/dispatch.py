"""The one dispatch point for rotary-apply kernels.

A backend is a function ``(x, cos, sin, layout, heads_first, out) -> Tensor`` with the
contract of ``ropekit.apply_rotary`` (no autograd). The core registers the pure-torch
reference as ``"torch"``; fused kernels register themselves with an availability check.
Override the choice with ``backend=`` or the environment variable ``ROPEKIT_ROPE_BACKEND``.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass

import torch

ENV_VAR = "ROPEKIT_ROPE_BACKEND"

Backend = Callable[..., torch.Tensor]


@dataclass(frozen=True)
class BackendEntry:
    """A kernel: the function, whether it can run on ``x`` now, and its preference (higher first)."""

    fn: Backend
    supports: Callable[[torch.Tensor], bool]
    priority: int = 0


_BACKENDS: dict[str, BackendEntry] = {}
# (name, entry) best first, kept sorted at registration: selection runs on every call (decode
# steps included), so it walks this list and stops at the first backend that supports x.
_ORDER: list[tuple[str, BackendEntry]] = []


def register_backend(name: str, fn: Backend, supports: Callable[[torch.Tensor], bool] = lambda x: True,
                     priority: int = 0) -> None:
    """Add (or replace) a backend."""
    _BACKENDS[name] = BackendEntry(fn, supports, priority)
    _ORDER[:] = sorted(_BACKENDS.items(), key=lambda item: -item[1].priority)


def available_backends(x: torch.Tensor | None = None) -> list[str]:
    """Registered backends, best first; only those that support ``x`` when given."""
    return [n for n, entry in _ORDER if x is None or entry.supports(x)]


def select_backend(x: torch.Tensor, backend: str | None = None) -> str:
    """The backend to use for ``x``: the override if given (argument, then env var), else the best."""
    if not _loaded:
        _load_optional_kernels()
    wanted = backend or os.environ.get(ENV_VAR) or None
    if wanted is not None:
        if wanted not in _BACKENDS:
            raise ValueError(f"unknown rope backend {wanted!r} (from {'argument' if backend else ENV_VAR}); "
                             f"registered: {sorted(_BACKENDS)}")
        if not _BACKENDS[wanted].supports(x):
            raise ValueError(f"rope backend {wanted!r} does not support a {x.dtype} tensor on {x.device}")
        return wanted
    for name, entry in _ORDER:
        if entry.supports(x):
            return name
    raise RuntimeError(f"no rope backend supports a {x.dtype} tensor on {x.device}; registered: {sorted(_BACKENDS)}")


def rotary_dispatch(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, *, layout: str, heads_first: bool,
                    out: torch.Tensor | None, backend: str | None = None) -> torch.Tensor:
    """Run the selected backend."""
    name = select_backend(x, backend)
    return _BACKENDS[name].fn(x, cos, sin, layout=layout, heads_first=heads_first, out=out)


_loaded = False


def _load_optional_kernels() -> None:
    """Import fused-kernel modules once; each registers itself if it can run here."""
    global _loaded
    if _loaded:
        return
    _loaded = True
    try:
        from ropekit.kernels import registry  # noqa: F401  (registers fused backends)
    except ImportError:
        pass
