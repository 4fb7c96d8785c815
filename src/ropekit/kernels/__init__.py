"""Fused kernels, registered with the core's one dispatch point (``ropekit.dispatch``).

Importing this package (``import ropekit`` does) registers:

- rotary ``"cpp"`` (priority 10): the C++ CPU kernel for float32/bfloat16/float16, compiled on
  first use (``cpu.py``, ``csrc/rope_cpu.cpp``);
- rotary ``"triton"`` (priority 5): the Triton kernel for CUDA tensors (``triton_rope.py``),
  imported on the first CUDA tensor when triton is installed (under ``TRITON_INTERPRET=1`` it
  also takes CPU tensors, for tests; ``"cpp"`` still outranks it there unless it is forced);
- the decode ops ``norm_linear``, ``norm_swiglu``, ``linear_residual``, ``decode_attention``
  (``decode.py``, ``csrc/gemv_cpu.cpp``): C++ for one float32 row on the CPU, torch otherwise.

Nothing is compiled at import. The core's pure-torch rotary reference ``"torch"`` (priority 0)
handles everything else.
"""

from __future__ import annotations

import importlib.util
import os
from functools import cache

import torch

from ropekit.dispatch import (
    ENV_VAR,
    OPS,
    ROTARY,
    available_backends,
    register_backend,
    rotary_dispatch,
    select_backend,
)
from ropekit.kernels import cpu, decode
from ropekit.rope.apply import apply_rotary_positions

TRITON_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@cache
def triton_installed() -> bool:
    """Whether the ``triton`` package can be imported here (it is an optional dependency)."""
    return importlib.util.find_spec("triton") is not None


def _triton_supports(x: torch.Tensor) -> bool:
    interpreting = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
    return (x.dtype in TRITON_DTYPES and (x.is_cuda or (interpreting and x.device.type == "cpu"))
            and triton_installed())


def _rotate_triton(*args, **kwargs) -> torch.Tensor:
    from ropekit.kernels.triton_rope import rotate_triton

    return rotate_triton(*args, **kwargs)


register_backend("cpp", cpu.rotate_cpp, supports=cpu.supports, priority=10, plan=cpu.plan_rotate_cpp)
register_backend("triton", _rotate_triton, supports=_triton_supports, priority=5)

__all__ = ["ENV_VAR", "OPS", "ROTARY", "apply_rotary_positions", "available_backends", "decode", "register_backend",
           "rotary_dispatch", "select_backend", "triton_installed"]
