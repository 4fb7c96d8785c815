"""The one dispatch point for kernels: every fused operation ropekit runs is chosen here.

An *op* (``"rotary"``, and the decode ops ``"norm_linear"``, ``"norm_swiglu"``,
``"linear_residual"``, ``"decode_attention"`` that ``ropekit.kernels`` defines) has *backends*:
a function with the op's contract, a ``supports(...)`` check that receives the arguments the op
is selected with (the rotary op is selected on ``x`` alone) and a priority. Every op has a
pure-torch backend ``"torch"`` that always works; the rope core registers the rotary one
(``ropekit.rope.apply``), and ``ropekit.kernels`` registers the fused ones (C++ for CPU, Triton
for CUDA) when ropekit is imported. This module sits in the lowest layer, so the rope core and the
kernels above it both reach it; it holds no state but the registered backends and the overrides. Selection
walks the backends best first and takes the first that supports the arguments; ``backend=``,
``use_backend(...)`` or the op's environment variable (``ROPEKIT_ROPE_BACKEND`` for rotary,
``ROPEKIT_GEMV_BACKEND`` for the decode ops) forces one by name.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch

Backend = Callable[..., torch.Tensor]


def _always(*args, **kwargs) -> bool:
    return True


@dataclass(frozen=True)
class Kernel:
    """One backend of an op: the function, whether it can run on ``x`` now, its preference, and optionally
    its planner: ``plan(*args) -> (result, run)`` where ``run()`` computes ``result`` in place (its buffers
    fixed), so a recorded sequence of ops can be run again on new input values (``Recording``)."""

    fn: Backend
    supports: Callable[..., bool]
    priority: int = 0
    plan: Callable[..., tuple] | None = None


class NotRecordable(RuntimeError):
    """An op whose selected backend has no planner was run with a ``Recording``."""


class Recording:
    """The replay calls of the ops run with ``recording=`` this object, in order (``steps``), and the
    named input buffers of the recorded computation (``inputs``). Running the steps again recomputes
    every result in its same buffer from the current values of the inputs. It is an explicit argument:
    an op records only when it is handed one (``ropekit.model.decode_graph`` is the one user)."""

    def __init__(self):
        self.steps: list[Callable[[], None]] = []
        self.inputs: dict[str, object] = {}

    def planned(self, kernel: Kernel, name: str, args: tuple, kwargs: dict):
        """Run ``kernel`` through its planner and keep its ``run`` for replay."""
        if kernel.plan is None:
            raise NotRecordable(f"the {name} backend has no planner")
        result, run = kernel.plan(*args, **kwargs)
        run()
        self.steps.append(run)
        return result

    def replay(self) -> None:
        """Run every recorded step again, in order."""
        for run in self.steps:
            run()


class KernelOp:
    """An operation and its backends, best first (selection runs on every call, decode steps included)."""

    def __init__(self, name: str, env_var: str, doc: str = ""):
        self.name, self.env_var, self.doc = name, env_var, doc
        self._backends: dict[str, Kernel] = {}
        self._order: list[tuple[str, Kernel]] = []
        self.forced: str | None = None  # set by ``use_backend``: wins over the environment variable

    def register(self, backend: str, fn: Backend, supports: Callable[..., bool] = _always,
                 priority: int = 0, plan: Callable[..., tuple] | None = None) -> None:
        """Add (or replace) a backend (``plan``: see ``Kernel``)."""
        self._backends[backend] = Kernel(fn, supports, priority, plan)
        self._order = sorted(self._backends.items(), key=lambda item: -item[1].priority)

    @property
    def backends(self) -> list[str]:
        """Registered backend names, best first."""
        return [name for name, _ in self._order]

    def available(self, *args, **kwargs) -> list[str]:
        """Backends best first; only those that support the arguments when given."""
        return [name for name, kernel in self._order if not (args or kwargs) or kernel.supports(*args, **kwargs)]

    def select(self, x: torch.Tensor, *args, backend: str | None = None, **kwargs) -> str:
        """The backend for these arguments: the override if given (argument, then env var), else the best
        backend whose ``supports`` accepts them."""
        wanted = backend or self.forced or os.environ.get(self.env_var) or None
        if wanted is not None:
            kernel = self._backends.get(wanted)
            if kernel is None:
                source = "argument" if backend else "use_backend" if self.forced else self.env_var
                raise ValueError(f"unknown {self.name} backend {wanted!r} (from {source}); "
                                 f"registered: {sorted(self._backends)}")
            if not kernel.supports(x, *args, **kwargs):
                raise ValueError(f"{self.name} backend {wanted!r} does not support a {x.dtype} tensor on {x.device}")
            return wanted
        for name, kernel in self._order:
            if kernel.supports(x, *args, **kwargs):
                return name
        raise RuntimeError(f"no {self.name} backend supports a {x.dtype} tensor on {x.device}; "
                           f"registered: {sorted(self._backends)}")

    def function(self, backend: str) -> Backend:
        """The function registered under ``backend``."""
        return self._backends[backend].fn

    def __call__(self, x: torch.Tensor, *args, backend: str | None = None, recording: Recording | None = None,
                 **kwargs):
        """Run the selected backend; with ``recording``, through its planner, keeping the replay call."""
        kernel = self._backends[self.select(x, *args, backend=backend, **kwargs)]
        if recording is not None:
            return recording.planned(kernel, self.name, (x, *args), kwargs)
        return kernel.fn(x, *args, **kwargs)

    def __repr__(self) -> str:
        return f"KernelOp({self.name!r}: {', '.join(self.backends)})"


OPS: dict[str, KernelOp] = {}


@contextmanager
def use_backend(backend: str | None, *ops: str) -> Iterator[None]:
    """Force ``backend`` for the named ops (all ops when none are named) inside the block; None forces nothing."""
    chosen = [OPS[name] for name in ops] if ops else list(OPS.values())
    previous = [op.forced for op in chosen]
    for op in chosen:
        op.forced = backend or op.forced
    try:
        yield
    finally:
        for op, old in zip(chosen, previous, strict=True):
            op.forced = old


def define_op(name: str, env_var: str, doc: str = "") -> KernelOp:
    """The op called ``name``, created on first use."""
    if name not in OPS:
        OPS[name] = KernelOp(name, env_var, doc)
    return OPS[name]


ROTARY = define_op("rotary", "ROPEKIT_ROPE_BACKEND",
                   "(x, cos, sin, *, layout, heads_first, out, positions=None) -> Tensor; contract of apply_rotary")
ENV_VAR = ROTARY.env_var


def register_backend(name: str, fn: Backend, supports: Callable[..., bool] = _always,
                     priority: int = 0, plan: Callable[..., tuple] | None = None) -> None:
    """Add (or replace) a rotary backend."""
    ROTARY.register(name, fn, supports, priority, plan)


def available_backends(x: torch.Tensor | None = None) -> list[str]:
    """Rotary backends, best first; only those that support ``x`` when given."""
    return ROTARY.available() if x is None else ROTARY.available(x)


def select_backend(x: torch.Tensor, backend: str | None = None) -> str:
    """The rotary backend to use for ``x``."""
    return ROTARY.select(x, backend=backend)


def rotary_dispatch(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, *, layout: str, heads_first: bool,
                    out: torch.Tensor | None, backend: str | None = None,
                    positions: torch.Tensor | None = None, recording: Recording | None = None) -> torch.Tensor:
    """Run the selected rotary backend (``positions``: rows of whole cos/sin tables, see ``apply_rotary_positions``;
    ``recording``: see ``Recording``)."""
    kernel = ROTARY._backends[ROTARY.select(x, backend=backend)]
    kwargs = {"layout": layout, "heads_first": heads_first, "out": out}
    if positions is not None:
        kwargs["positions"] = positions
    if recording is not None:
        return recording.planned(kernel, ROTARY.name, (x, cos, sin), kwargs)
    return kernel.fn(x, cos, sin, **kwargs)
