"""The C++ CPU backend ("cpp"): argument plumbing around ``csrc/rope_cpu.cpp``.

The kernel reads x once and writes once. It needs a contiguous last dim (other strides are
free: q/k views of a fused qkv projection or transposed views go straight in); anything
else is copied to a contiguous tensor first.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ropekit.kernels.build import cpu_extension

DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def supports(x: torch.Tensor) -> bool:
    """CPU float32/bfloat16/float16 tensors, when the extension builds here (the first call builds it)."""
    return x.device.type == "cpu" and x.dtype in DTYPES and cpu_extension() is not None


def _table(table: torch.Tensor) -> torch.Tensor:
    """(N, R/2) or (B, N, R/2) -> contiguous float32 of the same shape (the kernel takes both); no copy
    (and no extra torch op: each costs ~1 us on a decode step) when it already is."""
    if table.dtype != torch.float32:
        table = table.to(torch.float32)
    return table if table.is_contiguous() else table.contiguous()


def _last_dim_contiguous(t: torch.Tensor) -> bool:
    return t.shape[-1] <= 1 or t.stride(-1) == 1


def plan_rotate_cpp(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, *, layout: str = "half",
                    heads_first: bool = True, out: torch.Tensor | None = None,
                    positions: torch.Tensor | None = None) -> tuple[torch.Tensor, Callable[[], None]]:
    """``(result, run)``: the buffers of one rotation and the call that fills them (see ``rotate_cpp``)."""
    ext = cpu_extension()
    if ext is None:
        raise RuntimeError("the ropekit C++ CPU kernel is not available (see the build warning)")
    src = x if _last_dim_contiguous(x) else x.contiguous()
    dst = out if out is not None else torch.empty_like(src)
    target = dst if _last_dim_contiguous(dst) else torch.empty_like(src)
    if positions is not None:
        positions = positions.unsqueeze(0) if positions.dim() == 1 else positions  # (Bp, T)
        positions = positions.to(torch.int64).contiguous()
    cos_t, sin_t, interleaved = _table(cos), _table(sin), layout == "interleaved"
    copy_back = target is not dst
    if src is x and cos_t is cos and sin_t is sin and not copy_back:
        def run() -> None:
            ext.rope_apply(src, target, cos_t, sin_t, positions, interleaved, heads_first)
    else:  # inputs copied or converted above: refresh the copies from the originals on every run
        def run() -> None:
            source = x if src is x else src.copy_(x)
            ext.rope_apply(source, target, cos_t if cos_t is cos else cos_t.copy_(cos),
                           sin_t if sin_t is sin else sin_t.copy_(sin), positions, interleaved, heads_first)
            if copy_back:
                dst.copy_(target)
    return dst, run


def rotate_cpp(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, *, layout: str = "half",
               heads_first: bool = True, out: torch.Tensor | None = None,
               positions: torch.Tensor | None = None) -> torch.Tensor:
    """Backend function (contract of ``ropekit.apply_rotary``). With ``positions`` ((T,) or (B, T)
    int64), cos/sin are whole tables (N, R/2) or (B, N, R/2) and row ``positions[b, t]`` turns token t.
    """
    result, run = plan_rotate_cpp(x, cos, sin, layout=layout, heads_first=heads_first, out=out, positions=positions)
    run()
    return result
