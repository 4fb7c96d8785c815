"""Triton rotary kernel ("triton" backend) for CUDA tensors, plus packed variable-length sequences.

One program rotates BLOCK_T tokens of HEAD_GROUP heads: it loads their cos/sin rows once,
reads each head's pairs once and writes them once. Features: both layouts, partial rotary
(channels from R on are copied when out is not x), any strides on the batch/token/head dims
(last dim contiguous), (T, R/2) or (B, T, R/2) tables, a fused position gather (``positions``),
packed sequences (``cu_seqlens``: each sequence counts positions from ``seqlen_offset``),
64-bit offsets (every index is widened before it meets a stride), and a backward that is the
inverse rotation (``conjugate``: sin -> -sin inside the kernel, no negated table).

Correctness is checked on CPU with Triton's interpreter (``TRITON_INTERPRET=1``). The flag is
read when a function is wrapped by ``triton.jit``, so the wrapping happens at first launch.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def interpreting() -> bool:
    """True when Triton runs kernels in its CPU interpreter (tests without a GPU)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def supports(x: torch.Tensor) -> bool:
    """CUDA float tensors; CPU tensors too under the interpreter."""
    return x.dtype in DTYPES and (x.is_cuda or (interpreting() and x.device.type == "cpu"))


def _rope_kernel(
    X, OUT, COS, SIN, POS, CU,
    n_tokens, n_heads, rot_half, head_dim,
    sx_b, sx_t, sx_h, so_b, so_t, so_h, sc_b, sc_t, sp_b, seqlen_offset,
    INTERLEAVED: tl.constexpr, CONJUGATE: tl.constexpr, HAS_POS: tl.constexpr, VARLEN: tl.constexpr,
    COPY_TAIL: tl.constexpr, HEAD_GROUP: tl.constexpr, BLOCK_T: tl.constexpr,
    BLOCK_HALF: tl.constexpr, BLOCK_TAIL: tl.constexpr,
):
    pid_t, pid_b, pid_h = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)  # token index within the sequence
    if VARLEN:  # packed [total, H, D]: sequence pid_b holds rows cu[b] .. cu[b+1]
        start = tl.load(CU + pid_b).to(tl.int64)
        length = tl.load(CU + pid_b + 1).to(tl.int64) - start
        row = start + t.to(tl.int64)
        batch = pid_b.to(tl.int64) * 0
        pos = t.to(tl.int64) + seqlen_offset
    else:
        length = n_tokens
        row = t.to(tl.int64)
        batch = pid_b.to(tl.int64)
        if HAS_POS:
            pos = tl.load(POS + batch * sp_b + row, mask=t < length, other=0).to(tl.int64)
        else:
            pos = row
    mask_t = t < length
    i = tl.arange(0, BLOCK_HALF)
    mask = mask_t[:, None] & (i < rot_half)[None, :]
    table = batch * sc_b + pos[:, None] * sc_t + i[None, :]  # [BLOCK_T, BLOCK_HALF]
    c = tl.load(COS + table, mask=mask, other=0.0).to(tl.float32)
    s = tl.load(SIN + table, mask=mask, other=0.0).to(tl.float32)
    if CONJUGATE:
        s = -s
    if INTERLEAVED:
        first, second = 2 * i, 2 * i + 1
    else:
        first, second = i, i + rot_half
    x_row = batch * sx_b + row * sx_t  # [BLOCK_T] int64
    o_row = batch * so_b + row * so_t
    j = 2 * rot_half + tl.arange(0, BLOCK_TAIL)
    mask_tail = mask_t[:, None] & (j < head_dim)[None, :]
    for g in tl.static_range(HEAD_GROUP):
        h = (pid_h * HEAD_GROUP + g).to(tl.int64)
        if h < n_heads:
            xp = X + (x_row + h * sx_h)[:, None]
            op = OUT + (o_row + h * so_h)[:, None]
            a = tl.load(xp + first[None, :], mask=mask, other=0.0).to(tl.float32)
            b = tl.load(xp + second[None, :], mask=mask, other=0.0).to(tl.float32)
            tl.store(op + first[None, :], (a * c - b * s).to(OUT.dtype.element_ty), mask=mask)
            tl.store(op + second[None, :], (b * c + a * s).to(OUT.dtype.element_ty), mask=mask)
            if COPY_TAIL:
                tl.store(op + j[None, :], tl.load(xp + j[None, :], mask=mask_tail), mask=mask_tail)


_compiled: dict[bool, object] = {}


def _kernel():
    """``triton.jit(_rope_kernel)``, wrapped under the interpreter setting in force now."""
    mode = interpreting()
    if mode not in _compiled:
        _compiled[mode] = triton.jit(_rope_kernel)
    return _compiled[mode]


def _table(table: torch.Tensor) -> torch.Tensor:
    """(N, R/2) or (B, N, R/2) -> float32 (Bc, N, R/2) with a contiguous last dim."""
    table = table.to(torch.float32)
    table = table.unsqueeze(0) if table.dim() == 2 else table
    return table if table.stride(-1) == 1 else table.contiguous()


def _launch(x, out, cos, sin, *, layout, x_strides, o_strides, n_batch, n_tokens, n_heads, positions=None,
            cu_seqlens=None, max_seqlen=0, seqlen_offset=0, conjugate=False) -> None:
    """Launch over (token blocks, batch or sequence, head groups). Strides are (batch, token, head)."""
    cos, sin = _table(cos), _table(sin)
    rot_half, head_dim = cos.shape[-1], x.shape[-1]
    if x.numel() == 0 or n_tokens == 0 or n_heads == 0:
        return
    pos = positions if positions is not None else cos  # any pointer when unused
    cu = cu_seqlens if cu_seqlens is not None else cos
    sp_b = positions.stride(0) if positions is not None and positions.shape[0] > 1 else 0
    copy_tail = out.data_ptr() != x.data_ptr() and 2 * rot_half < head_dim
    block_half = triton.next_power_of_2(max(rot_half, 1))
    block_tail = triton.next_power_of_2(max(head_dim - 2 * rot_half, 1))
    block_t = max(1, min(16, 2048 // block_half))
    head_group = 4
    tokens = max_seqlen if cu_seqlens is not None else n_tokens
    grid = (triton.cdiv(tokens, block_t), n_batch, triton.cdiv(n_heads, head_group))
    _kernel()[grid](
        x, out, cos, sin, pos, cu,
        n_tokens, n_heads, rot_half, head_dim,
        *x_strides, *o_strides, cos.stride(0) if cos.shape[0] > 1 else 0, cos.stride(1), sp_b, seqlen_offset,
        INTERLEAVED=layout == "interleaved", CONJUGATE=conjugate, HAS_POS=positions is not None,
        VARLEN=cu_seqlens is not None, COPY_TAIL=copy_tail, HEAD_GROUP=head_group, BLOCK_T=block_t,
        BLOCK_HALF=block_half, BLOCK_TAIL=block_tail,
    )


def _bth(t: torch.Tensor, heads_first: bool) -> tuple[int, int, int]:
    """(batch, token, head) strides of a [B,H,T,D] or [B,T,H,D] tensor."""
    return (t.stride(0), t.stride(2), t.stride(1)) if heads_first else (t.stride(0), t.stride(1), t.stride(2))


def rotate_triton(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, *, layout: str = "half",
                  heads_first: bool = True, out: torch.Tensor | None = None,
                  positions: torch.Tensor | None = None, conjugate: bool = False) -> torch.Tensor:
    """Backend function (contract of ``ropekit.apply_rotary``). With ``positions`` ((T,) or (B, T)),
    cos/sin are whole tables and row ``positions[b, t]`` turns token t; ``conjugate`` turns by -angle.
    """
    src = x if x.shape[-1] <= 1 or x.stride(-1) == 1 else x.contiguous()
    dst = out if out is not None else torch.empty_like(src)
    target = dst if dst.shape[-1] <= 1 or dst.stride(-1) == 1 else torch.empty_like(src)
    B = x.shape[0]
    T, H = (x.shape[2], x.shape[1]) if heads_first else (x.shape[1], x.shape[2])
    if positions is not None:
        positions = positions.unsqueeze(0) if positions.dim() == 1 else positions  # (Bp, T)
        positions = positions.to(torch.int64).contiguous()
    _launch(src, target, cos, sin, layout=layout, x_strides=_bth(src, heads_first),
            o_strides=_bth(target, heads_first), n_batch=B, n_tokens=T, n_heads=H, positions=positions,
            conjugate=conjugate)
    if target is not dst:
        dst.copy_(target)
    return dst


def rotate_varlen(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cu_seqlens: torch.Tensor,
                  max_seqlen: int, *, layout: str = "half", seqlen_offset: int = 0,
                  out: torch.Tensor | None = None, conjugate: bool = False) -> torch.Tensor:
    """Rotate packed sequences without autograd: x ``[total, H, D]``, cu_seqlens ``(n_seqs + 1,)`` int32/64
    cumulative lengths; token j of a sequence takes table row ``seqlen_offset + j`` of cos/sin ``(N, R/2)``.
    """
    if x.dim() != 3 or cos.dim() != 2 or cos.shape != sin.shape:
        raise ValueError(f"rotate_varlen wants x [total, H, D] and cos/sin (N, R/2), got {tuple(x.shape)}, "
                         f"{tuple(cos.shape)}, {tuple(sin.shape)}")
    if seqlen_offset + max_seqlen > cos.shape[0]:
        last = seqlen_offset + max_seqlen - 1
        raise ValueError(f"positions up to {last} pass the table's {cos.shape[0]} rows")
    src = x if x.shape[-1] <= 1 or x.stride(-1) == 1 else x.contiguous()
    dst = out if out is not None else torch.empty_like(src)
    _launch(src, dst, cos, sin, layout=layout, x_strides=(0, src.stride(0), src.stride(1)),
            o_strides=(0, dst.stride(0), dst.stride(1)), n_batch=cu_seqlens.numel() - 1, n_tokens=x.shape[0],
            n_heads=x.shape[1], cu_seqlens=cu_seqlens.contiguous(), max_seqlen=max_seqlen,
            seqlen_offset=seqlen_offset, conjugate=conjugate)
    return dst


class _RotateVarlen(torch.autograd.Function):
    """Packed rotation whose backward is the inverse rotation of the gradient."""

    @staticmethod
    def forward(ctx, x, cos, sin, cu_seqlens, max_seqlen, layout, seqlen_offset):  # noqa: D102
        ctx.save_for_backward(cos, sin, cu_seqlens)
        ctx.max_seqlen, ctx.layout, ctx.seqlen_offset = max_seqlen, layout, seqlen_offset
        return rotate_varlen(x, cos, sin, cu_seqlens, max_seqlen, layout=layout, seqlen_offset=seqlen_offset)

    @staticmethod
    def backward(ctx, grad):  # noqa: D102
        cos, sin, cu_seqlens = ctx.saved_tensors
        grad_x = rotate_varlen(grad, cos, sin, cu_seqlens, ctx.max_seqlen, layout=ctx.layout,
                               seqlen_offset=ctx.seqlen_offset, conjugate=True)
        return grad_x, None, None, None, None, None, None


def apply_rotary_varlen(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cu_seqlens: torch.Tensor,
                        max_seqlen: int, *, layout: str = "half", seqlen_offset: int = 0) -> torch.Tensor:
    """Differentiable ``rotate_varlen`` (gradient in x): the flash-attn style packed entry."""
    return _RotateVarlen.apply(x, cos, sin, cu_seqlens, max_seqlen, layout, seqlen_offset)
