"""Apply the rotation: the validated public entry, the pure-torch reference, and autograd.

Layouts (which channels form a rotated pair, for a rotary dim R):
- ``"half"`` (GPT-NeoX / Hugging Face): pair i is channels (i, i + R/2);
- ``"interleaved"`` (GPT-J / Meta / the RoFormer paper): pair i is channels (2i, 2i + 1).
Pair i turns by angle[i]: (a, b) -> (a cos - b sin, b cos + a sin). Channels from R on pass
through. The maths runs in float32 (or float64 for float64 input) and is rounded once.
"""

from __future__ import annotations

import torch

from ropekit.dispatch import Recording, register_backend, rotary_dispatch

LAYOUTS = ("half", "interleaved")


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 stays float64; every other dtype rotates in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def broadcast_table(table: torch.Tensor, heads_first: bool) -> torch.Tensor:
    """(T, R/2) or (B, T, R/2) -> a view that broadcasts against x [B,H,T,R/2] or [B,T,H,R/2]."""
    if table.dim() == 2:
        table = table.unsqueeze(0)  # (1, T, R/2)
    return table.unsqueeze(1) if heads_first else table.unsqueeze(2)  # (B,1,T,R/2) or (B,T,1,R/2)


def split_pairs(x: torch.Tensor, layout: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The two members of each pair: [..., R] -> two [..., R/2] views."""
    if layout == "half":
        half = x.shape[-1] // 2
        return x[..., :half], x[..., half:]
    return x[..., 0::2], x[..., 1::2]


def merge_pairs(first: torch.Tensor, second: torch.Tensor, layout: str) -> torch.Tensor:
    """Inverse of ``split_pairs``: two [..., R/2] -> [..., R]."""
    if layout == "half":
        return torch.cat([first, second], dim=-1)
    return torch.stack([first, second], dim=-1).flatten(-2)  # [..., R/2, 2] -> [..., R]


def gather_rows(cos: torch.Tensor, sin: torch.Tensor, positions: torch.Tensor, batch: int
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows ``positions`` of whole tables: cos/sin ``(N, R/2)`` or ``(B, N, R/2)``, positions ``(T,)`` or
    ``(B, T)`` -> ``(T, R/2)`` or ``(B, T, R/2)`` each."""
    if cos.dim() == 2:
        return cos[positions], sin[positions]
    index = positions.expand(batch, -1).unsqueeze(-1).expand(-1, -1, cos.shape[-1])  # (B, T, R/2)
    return torch.gather(cos, 1, index), torch.gather(sin, 1, index)


def rotate_reference(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, *, layout: str = "half",
                     heads_first: bool = True, out: torch.Tensor | None = None,
                     positions: torch.Tensor | None = None) -> torch.Tensor:
    """Pure-torch rotation (the reference every kernel is tested against). Differentiable.

    x ``[B,H,T,D]`` (heads_first) or ``[B,T,H,D]``; cos/sin ``(T, R/2)`` or ``(B, T, R/2)``, or with
    ``positions`` (``(T,)`` or ``(B, T)``) whole tables whose rows ``positions`` turn the tokens.
    """
    if positions is not None:
        cos, sin = gather_rows(cos, sin, positions, x.shape[0])
    rotary_dim = 2 * cos.shape[-1]
    work = compute_dtype(x.dtype)
    c, s = broadcast_table(cos.to(work), heads_first), broadcast_table(sin.to(work), heads_first)
    a, b = split_pairs(x[..., :rotary_dim].to(work), layout)
    rotated = merge_pairs(a * c - b * s, b * c + a * s, layout).to(x.dtype)
    if out is None:
        if rotary_dim == x.shape[-1]:
            return rotated
        return torch.cat([rotated, x[..., rotary_dim:]], dim=-1)
    out[..., :rotary_dim] = rotated
    if out is not x and rotary_dim < x.shape[-1]:
        out[..., rotary_dim:] = x[..., rotary_dim:]
    return out


register_backend("torch", rotate_reference, priority=0)


class _Rotate(torch.autograd.Function):
    """Rotation with a memory-light backward: the gradient is the inverse rotation (angle -> -angle)."""

    @staticmethod
    def forward(ctx, x, cos, sin, layout, heads_first, backend):  # noqa: D102
        ctx.save_for_backward(cos, sin)
        ctx.layout, ctx.heads_first, ctx.backend = layout, heads_first, backend
        return rotary_dispatch(x, cos, sin, layout=layout, heads_first=heads_first, out=None, backend=backend)

    @staticmethod
    def backward(ctx, grad):  # noqa: D102
        cos, sin = ctx.saved_tensors
        grad_x = rotary_dispatch(grad.contiguous(), cos, -sin, layout=ctx.layout, heads_first=ctx.heads_first,
                                 out=None, backend=ctx.backend)
        return grad_x, None, None, None, None, None


def check_apply_args(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, layout: str, heads_first: bool,
                     out: torch.Tensor | None) -> None:
    """Raise ValueError for any input ``apply_rotary`` cannot rotate correctly."""
    # Runs on every call (decode steps included): each shape is read once (a torch.Size each time).
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    x_shape, cos_shape = x.shape, cos.shape
    if len(x_shape) != 4:
        raise ValueError(f"x must be 4-D [B,H,T,D] or [B,T,H,D], got shape {tuple(x_shape)}")
    x_dtype = x.dtype
    if not x_dtype.is_floating_point:
        raise ValueError(f"x must be a floating tensor, got {x_dtype}")
    if cos_shape != sin.shape or len(cos_shape) not in (2, 3):
        raise ValueError(f"cos and sin must share a shape (T, R/2) or (B, T, R/2), got {tuple(cos_shape)} "
                         f"and {tuple(sin.shape)}")
    batch, seq = x_shape[0], (x_shape[2] if heads_first else x_shape[1])
    if cos_shape[-2] != seq or (len(cos_shape) == 3 and cos_shape[0] not in (1, batch)):
        raise ValueError(f"cos/sin of shape {tuple(cos_shape)} do not match x of shape {tuple(x_shape)} "
                         f"(heads_first={heads_first}: T={seq}, B={batch})")
    if 2 * cos_shape[-1] > x_shape[-1]:
        raise ValueError(f"rotary dim 2*{cos_shape[-1]} exceeds the head dim {x_shape[-1]}")
    if out is not None and (out.shape != x_shape or out.dtype != x_dtype):
        raise ValueError(f"out must match x's shape and dtype, got {tuple(out.shape)} {out.dtype}")


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, *, layout: str = "half",
                 heads_first: bool = True, out: torch.Tensor | None = None,
                 backend: str | None = None, recording: Recording | None = None) -> torch.Tensor:
    """Rotate the first R = 2 * cos.shape[-1] channels of each head of ``x``.

    Shapes: x ``[B, H, T, D]`` (heads_first) or ``[B, T, H, D]``; cos/sin ``(T, R/2)`` or
    ``(B, T, R/2)``, broadcast over heads. Returns a tensor shaped and typed like x
    (``out`` if given; ``out=x`` rotates in place). Differentiable in x; with gradients needed
    for cos/sin as well it runs the plain-op reference. ``recording``: keep this call for replay
    (``ropekit.dispatch.Recording``; inference only).
    """
    check_apply_args(x, cos, sin, layout, heads_first, out)
    needs_grad = torch.is_grad_enabled() and (x.requires_grad or cos.requires_grad or sin.requires_grad)
    if not needs_grad:
        return rotary_dispatch(x, cos, sin, layout=layout, heads_first=heads_first, out=out, backend=backend,
                               recording=recording)
    if recording is not None:
        raise ValueError("a recorded rotation cannot take part in autograd")
    if out is not None:
        raise ValueError("out= cannot be used while autograd records x, cos or sin")
    if cos.requires_grad or sin.requires_grad:
        return rotate_reference(x, cos, sin, layout=layout, heads_first=heads_first)
    return _Rotate.apply(x, cos, sin, layout, heads_first, backend)


def apply_rotary_qk(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, *,
                    layout: str = "half", heads_first: bool = True, inplace: bool = False,
                    backend: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate queries and keys with the same table (q and k may have different head counts)."""
    rotate = lambda t: apply_rotary(t, cos, sin, layout=layout, heads_first=heads_first,  # noqa: E731
                                    out=t if inplace else None, backend=backend)
    return rotate(q), rotate(k)


def apply_rotary_positions(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, positions: torch.Tensor, *,
                           layout: str = "half", heads_first: bool = True, out: torch.Tensor | None = None,
                           backend: str | None = None) -> torch.Tensor:
    """``apply_rotary`` with the position gather fused in (inference: no autograd).

    x ``[B, H, T, D]`` (heads_first) or ``[B, T, H, D]``; cos/sin whole tables ``(N, R/2)`` or
    ``(B, N, R/2)``; positions int ``(T,)`` or ``(B, T)`` in ``[0, N)``: token t of batch b turns by
    table row ``positions[b, t]`` (prefill, decode, left padding and packed sequences alike).
    """
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
    return rotary_dispatch(x, cos, sin, layout=layout, heads_first=heads_first, out=out, backend=backend,
                           positions=positions)
