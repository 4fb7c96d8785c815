"""Register the fused rotary backends with the dispatch point (imported once by ``dispatch``).

Priorities (higher wins when several support x): "cpp" 10 for CPU float32/bfloat16/float16;
"triton" 5 for CUDA tensors (cpp never takes those, so triton wins them); the pure-torch
reference "torch" 0 for everything else. Under ``TRITON_INTERPRET=1`` the Triton kernel also
accepts CPU tensors (for tests); there "cpp" still outranks it unless it is forced by name.
"""

from __future__ import annotations

import torch

from ropekit.kernels import cpu
from ropekit.kernels.dispatch import register_backend, select_backend

# The C++ kernel is compiled lazily on the first CPU tensor it is asked about (supports()),
# not at import, so importing ropekit never starts a compiler.
register_backend("cpp", cpu.rotate_cpp, supports=cpu.supports, priority=10)

try:
    from ropekit.kernels import triton_rope
except ImportError:  # triton not installed: no GPU backend
    triton_rope = None

if triton_rope is not None and triton_rope.HAVE_TRITON:
    register_backend("triton", triton_rope.rotate_triton, supports=triton_rope.supports, priority=5)


def _gather_reference(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, *, layout: str,
                      heads_first: bool, out: torch.Tensor | None, positions: torch.Tensor) -> torch.Tensor:
    """Unfused fallback: gather the rows (B, T, R/2), then the reference rotation."""
    from ropekit.rope.apply import rotate_reference

    if cos.dim() == 2:
        rows_cos, rows_sin = cos[positions], sin[positions]  # (T, R/2) or (B, T, R/2)
    else:
        index = positions.expand(x.shape[0], -1)  # (B, T)
        rows_cos = torch.gather(cos, 1, index.unsqueeze(-1).expand(-1, -1, cos.shape[-1]))
        rows_sin = torch.gather(sin, 1, index.unsqueeze(-1).expand(-1, -1, sin.shape[-1]))
    return rotate_reference(x, rows_cos, rows_sin, layout=layout, heads_first=heads_first, out=out)


_GATHER_BACKENDS = {"cpp": cpu.rotate_cpp, "torch": _gather_reference}
if triton_rope is not None and triton_rope.HAVE_TRITON:
    _GATHER_BACKENDS["triton"] = triton_rope.rotate_triton


def apply_rotary_positions(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, positions: torch.Tensor, *,
                           layout: str = "half", heads_first: bool = True, out: torch.Tensor | None = None,
                           backend: str | None = None) -> torch.Tensor:
    """``apply_rotary`` with the position gather fused in (inference: no autograd).

    x ``[B, H, T, D]`` (heads_first) or ``[B, T, H, D]``; cos/sin whole tables ``(N, R/2)`` or
    ``(B, N, R/2)``; positions int ``(T,)`` or ``(B, T)`` in ``[0, N)``: token t of batch b turns by
    table row ``positions[b, t]`` (prefill, decode, left padding and packed sequences alike).
    """
    from ropekit.rope.apply import check_apply_args

    batch, seq = (x.shape[0], x.shape[2]) if heads_first else (x.shape[0], x.shape[1])
    if positions.dtype.is_floating_point or positions.dim() not in (1, 2) or positions.shape[-1] != seq or (
            positions.dim() == 2 and positions.shape[0] not in (1, batch)):
        raise ValueError(f"positions must be integer (T,) or (B, T) with T={seq}, B={batch}; "
                         f"got {positions.dtype} {tuple(positions.shape)}")
    rows = cos.shape[-2]
    if positions.numel() and (int(positions.min()) < 0 or int(positions.max()) >= rows):
        raise ValueError(f"positions must lie in [0, {rows}) (the table's rows), got "
                         f"[{int(positions.min())}, {int(positions.max())}]")
    # Check the rest (layout, table batch, rotary dim, out) on the gathered shape: row 0 broadcast to T rows.
    probe = cos[..., :1, :].expand(*cos.shape[:-2], seq, cos.shape[-1])  # (T, R/2) or (B, T, R/2)
    check_apply_args(x, probe, probe if cos.shape == sin.shape else sin, layout, heads_first, out)
    name = select_backend(x, backend)
    fn = _GATHER_BACKENDS.get(name, _gather_reference)
    return fn(x, cos, sin, layout=layout, heads_first=heads_first, out=out, positions=positions)
