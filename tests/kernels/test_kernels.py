"""A/B tests: every fused rotary backend against the pure-torch reference ``rotate_reference``.

Backends run here: "cpp" (the C++ CPU kernel, when it builds) and "triton" under Triton's CPU
interpreter (when triton is installed; small shapes only, the interpreter is slow). Each test
forces its backend by ``backend=`` (and one by the environment variable) and prints the max
and mean absolute difference when it fails. Tolerances: float32 1e-6; bfloat16/float16 within
one unit in the last place of the reference, which rounds the float32 result once.
"""

from __future__ import annotations

import pytest
import torch

from ropekit.kernels import ENV_VAR, apply_rotary_positions, build, cpu, select_backend, triton_installed
from ropekit.rope.apply import apply_rotary, rotate_reference

CPP = pytest.param("cpp", marks=pytest.mark.skipif(not cpu.supports(torch.zeros(1)),
                                                   reason="the C++ CPU kernel did not build here"))
TRITON = pytest.param("triton", marks=pytest.mark.skipif(not triton_installed(), reason="triton not installed"))
BACKENDS = [CPP, TRITON]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
MANTISSA_BITS = {torch.bfloat16: 7, torch.float16: 10}


@pytest.fixture(autouse=True)
def triton_interpreter(monkeypatch):
    """Run Triton kernels in its CPU interpreter (read at launch, so this scope is enough)."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.delenv(ENV_VAR, raising=False)


def assert_matches(got: torch.Tensor, want: torch.Tensor, what: str) -> None:
    """float32: 1e-6; bf16/f16: at most one ulp of the reference. The message has max and mean |diff|."""
    assert (got.shape, got.dtype) == (want.shape, want.dtype), f"{what}: {got.shape} {got.dtype}"
    if got.numel() == 0:
        return
    diff = (got.double() - want.double()).abs()
    msg = f"{what}: max abs diff {diff.max().item():.3g}, mean {diff.mean().item():.3g}"
    if want.dtype in MANTISSA_BITS:
        # One ulp of w is at most |w| * 2^-mantissa, or the subnormal spacing near zero.
        step = 2.0 ** -MANTISSA_BITS[want.dtype]
        ulp = (want.double().abs() * step).clamp(min=torch.finfo(want.dtype).smallest_normal * step)
        assert bool((diff <= ulp).all()), msg + f", {(diff > ulp).sum().item()} elements over 1 ulp"
    else:
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6, msg=msg)


def tables(T: int, rot_half: int, batch: int | None = None, seed: int = 0):
    """Random-angle float32 cos/sin, (T, R/2) or (batch, T, R/2)."""
    g = torch.Generator().manual_seed(seed)
    shape = (T, rot_half) if batch is None else (batch, T, rot_half)
    angle = torch.rand(shape, generator=g, dtype=torch.float64) * 100
    return angle.cos().float(), angle.sin().float()


def make_x(B, H, T, D, dtype, heads_first, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, H, T, D, generator=g).to(dtype)  # [B, H, T, D]
    return x if heads_first else x.transpose(1, 2).contiguous()  # [B, T, H, D]


# (B, H, T, D, R): odd T, head_dim 64/80/96/128, partial rotary, a decode step.
SHAPES = [(2, 3, 7, 64, 64), (1, 4, 5, 80, 80), (2, 2, 9, 96, 64), (1, 2, 33, 128, 128), (1, 3, 1, 128, 32)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("layout", ["half", "interleaved"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("heads_first", [True, False])
def test_backend_matches_reference(backend, shape, layout, dtype, heads_first):
    B, H, T, D, R = shape
    x = make_x(B, H, T, D, dtype, heads_first)
    cos, sin = tables(T, R // 2)
    want = rotate_reference(x, cos, sin, layout=layout, heads_first=heads_first)
    x_before = x.clone()
    got = apply_rotary(x, cos, sin, layout=layout, heads_first=heads_first, backend=backend)
    assert_matches(got, want, f"{backend} {shape} {layout} {dtype} heads_first={heads_first}")
    assert torch.equal(x, x_before), "allocating call changed its input"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("layout", ["half", "interleaved"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_in_place_and_into_out_keep_the_pass_through_channels(backend, layout, dtype):
    """Partial rotary: channels from R on must survive in place and be copied into a given out."""
    x = make_x(2, 3, 5, 96, dtype, True)
    cos, sin = tables(5, 16)
    want = rotate_reference(x, cos, sin, layout=layout)
    out = torch.full_like(x, float("nan"))
    assert apply_rotary(x, cos, sin, layout=layout, out=out, backend=backend) is out
    assert_matches(out, want, f"{backend} out=")
    inplace = x.clone()
    assert apply_rotary(inplace, cos, sin, layout=layout, out=inplace, backend=backend) is inplace
    assert_matches(inplace, want, f"{backend} out=x")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_q_and_k_views_of_a_fused_qkv_projection(backend, dtype):
    """Strided inputs: q/k sliced out of one qkv tensor, as [B,T,H,D] and transposed to [B,H,T,D]."""
    B, T, H, D = 2, 7, 4, 64
    qkv = torch.randn(B, T, 3 * H * D).to(dtype)  # a fused projection's output
    q = qkv.view(B, T, 3, H, D)[:, :, 0]  # [B, T, H, D], non-contiguous
    cos, sin = tables(T, D // 2)
    for heads_first, view in ((False, q), (True, q.transpose(1, 2))):  # [B,T,H,D] / [B,H,T,D]
        assert not view.is_contiguous()
        want = rotate_reference(view, cos, sin, heads_first=heads_first)
        got = apply_rotary(view, cos, sin, heads_first=heads_first, backend=backend)
        assert_matches(got, want, f"{backend} qkv view heads_first={heads_first}")
    # In place through the view: q's slice turns, k and v stay untouched.
    before = qkv.clone()
    want = rotate_reference(q, cos, sin, heads_first=False)
    apply_rotary(q, cos, sin, heads_first=False, out=q, backend=backend)
    assert_matches(q, want, f"{backend} in place through a qkv view")
    kv = lambda t: t.view(B, T, 3, H, D)[:, :, 1:]  # noqa: E731
    assert torch.equal(kv(qkv), kv(before)), "rotating q in place wrote into k or v"


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous_last_dim_is_copied_first(backend):
    base = torch.randn(1, 2, 5, 128)
    x = base[..., ::2]  # [1, 2, 5, 64] with last stride 2
    cos, sin = tables(5, 32)
    want = rotate_reference(x, cos, sin)
    assert_matches(apply_rotary(x, cos, sin, backend=backend), want, f"{backend} strided last dim")
    out = torch.zeros(1, 2, 5, 128)[..., 1::2]
    apply_rotary(x, cos, sin, out=out, backend=backend)
    assert_matches(out, want, f"{backend} into an out with a strided last dim")
    apply_rotary(x, cos, sin, out=x, backend=backend)
    assert_matches(x, want, f"{backend} in place with a strided last dim")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", [(0, 2, 3, 64), (2, 0, 3, 64), (2, 2, 0, 64)], ids=str)
def test_empty_tensors(backend, shape):
    x = torch.randn(shape)
    cos, sin = tables(shape[2], 32)
    got = apply_rotary(x, cos, sin, backend=backend)
    assert got.shape == x.shape
    assert apply_rotary(x, cos, sin, out=x, backend=backend) is x


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("layout", ["half", "interleaved"])
@pytest.mark.parametrize("heads_first", [True, False])
@pytest.mark.parametrize("table_batch", [1, 3])
def test_per_batch_tables(backend, layout, heads_first, table_batch):
    """(B, T, R/2) tables: each sequence of the batch has its own positions (left padding, packing)."""
    x = make_x(3, 2, 6, 80, torch.float32, heads_first)
    cos, sin = tables(6, 40, batch=table_batch)
    want = rotate_reference(x, cos, sin, layout=layout, heads_first=heads_first)
    got = apply_rotary(x, cos, sin, layout=layout, heads_first=heads_first, backend=backend)
    assert_matches(got, want, f"{backend} per-batch tables ({table_batch})")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("layout", ["half", "interleaved"])
def test_gradient_through_forced_backend(backend, layout):
    """apply_rotary's backward (inverse rotation, dispatched again) against autograd of the reference."""
    x = torch.randn(2, 3, 5, 96, dtype=torch.float32, requires_grad=True)
    cos, sin = tables(5, 32)
    grad = torch.randn(2, 3, 5, 96)
    apply_rotary(x, cos, sin, layout=layout, backend=backend).backward(grad)
    got, x.grad = x.grad, None
    rotate_reference(x, cos, sin, layout=layout).backward(grad)
    assert_matches(got, x.grad, f"{backend} gradient")


@pytest.mark.parametrize("backend", BACKENDS)
def test_environment_variable_forces_the_backend(backend, monkeypatch):
    x = make_x(1, 2, 5, 64, torch.bfloat16, True)
    cos, sin = tables(5, 32)
    monkeypatch.setenv(ENV_VAR, backend)
    assert select_backend(x) == backend
    assert_matches(apply_rotary(x, cos, sin), rotate_reference(x, cos, sin), f"{backend} via {ENV_VAR}")


@pytest.mark.skipif(not cpu.supports(torch.zeros(1)), reason="the C++ CPU kernel did not build here")
def test_dispatch_prefers_cpp_on_cpu_and_the_reference_for_float64():
    assert select_backend(torch.zeros(1, 1, 1, 4)) == "cpp"
    assert select_backend(torch.zeros(1, 1, 1, 4, dtype=torch.bfloat16)) == "cpp"
    assert select_backend(torch.zeros(1, 1, 1, 4, dtype=torch.float64)) == "torch"


@pytest.mark.skipif(not cpu.supports(torch.zeros(1)), reason="the C++ CPU kernel did not build here")
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", ["half", "interleaved"])
def test_cpp_matches_reference_bit_for_bit(dtype, layout):
    """Built without FMA contraction, the C++ kernel rounds exactly as the eager reference."""
    x = make_x(2, 3, 17, 128, dtype, False)
    cos, sin = tables(17, 48, batch=2)
    want = rotate_reference(x, cos, sin, layout=layout, heads_first=False)
    got = apply_rotary(x, cos, sin, layout=layout, heads_first=False, backend="cpp")
    assert torch.equal(got, want), f"max abs diff {(got.double() - want.double()).abs().max().item():.3g}"


CPP_ONLY = pytest.mark.skipif(not cpu.supports(torch.zeros(1)), reason="the C++ CPU kernel did not build here")


@pytest.fixture
def stream_everything():
    """Lower the C++ kernel's streaming-store threshold to 0 bytes: every out-of-place call streams."""
    ext = build.cpu_extension()
    old = ext.set_stream_threshold(0)
    yield
    ext.set_stream_threshold(old)


def strided_out(x: torch.Tensor, offset: int, pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A NaN buffer and an out view into it: each row starts ``offset`` elements in and rows are
    ``D + pad`` apart, so rows land on every alignment (not only the 64-byte one of fresh tensors)."""
    *lead, D = x.shape
    buf = torch.full((*lead, D + pad), float("nan"), dtype=x.dtype)
    return buf, buf[..., offset:offset + D]


# (B, H, T, D, R): full and partial rotary, rows that are not a whole number of cache lines.
STREAM_SHAPES = [(2, 3, 7, 128, 128), (1, 4, 5, 80, 80), (2, 2, 9, 96, 32), (1, 3, 4, 40, 24)]


@CPP_ONLY
@pytest.mark.parametrize("shape", STREAM_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("layout", ["half", "interleaved"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("heads_first", [True, False])
@pytest.mark.parametrize("offset,pad", [(0, 0), (1, 3), (3, 19)])
def test_cpp_streaming_stores_match_reference_bit_for_bit(stream_everything, shape, layout, dtype, heads_first,
                                                          offset, pad):
    """Out of place (alloc and out= views at any alignment) through the streaming path: bit-identical,
    nothing written outside the view; in place (never streamed) stays exact too."""
    B, H, T, D, R = shape
    x = make_x(B, H, T, D, dtype, heads_first)
    cos, sin = tables(T, R // 2)
    want = rotate_reference(x, cos, sin, layout=layout, heads_first=heads_first)
    got = apply_rotary(x, cos, sin, layout=layout, heads_first=heads_first, backend="cpp")
    assert torch.equal(got, want), "alloc"
    buf, out = strided_out(x, offset, pad)
    assert apply_rotary(x, cos, sin, layout=layout, heads_first=heads_first, out=out, backend="cpp") is out
    assert torch.equal(out, want), f"out= view offset {offset} pad {pad}"
    outside = torch.ones_like(buf, dtype=torch.bool)
    outside[..., offset:offset + D] = False
    assert bool(buf[outside].isnan().all()), "wrote outside the out view"
    inplace = x.clone()
    apply_rotary(inplace, cos, sin, layout=layout, heads_first=heads_first, out=inplace, backend="cpp")
    assert torch.equal(inplace, want), "in place"


@CPP_ONLY
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", ["half", "interleaved"])
@pytest.mark.parametrize("heads_first", [True, False])
def test_cpp_large_outputs_stream_at_the_default_threshold(dtype, layout, heads_first):
    """Outputs past the default 4 MiB threshold (partial rotary, a misaligned out view, fused positions)."""
    T, D, R = 1024, 128, 96
    H = (5 << 20) // (T * D * dtype.itemsize) + 1  # > 5 MiB of output
    x = make_x(1, H, T, D, dtype, heads_first)
    cos, sin = tables(T, R // 2)
    want = rotate_reference(x, cos, sin, layout=layout, heads_first=heads_first)
    assert torch.equal(apply_rotary(x, cos, sin, layout=layout, heads_first=heads_first, backend="cpp"), want)
    buf, out = strided_out(x, 1, 1)
    apply_rotary(x, cos, sin, layout=layout, heads_first=heads_first, out=out, backend="cpp")
    assert torch.equal(out, want), "misaligned out view"
    assert bool(buf[..., 0].isnan().all()), "wrote outside the out view"
    positions = torch.arange(T).flip(0)
    got = apply_rotary_positions(x, cos.flip(0), sin.flip(0), positions, layout=layout, heads_first=heads_first,
                                 backend="cpp")
    assert torch.equal(got, want), "fused positions"


def test_failed_build_warns_and_falls_back_to_torch(monkeypatch):
    def broken(verbose=False):
        raise RuntimeError("no compiler")

    monkeypatch.delenv("TRITON_INTERPRET")  # else the interpreted Triton kernel would take CPU tensors
    extension = build.JitExtension("ropekit_rope_cpu", build.SOURCE, "C++ rotary kernel")
    monkeypatch.setattr(extension, "build", broken)
    monkeypatch.setattr(build, "ROPE_EXTENSION", extension)
    with pytest.warns(RuntimeWarning, match="could not be built"):
        assert not cpu.supports(torch.zeros(1))
    assert select_backend(torch.zeros(1, 1, 1, 4)) == "torch"


@pytest.mark.parametrize("backend", ["torch", *BACKENDS])
@pytest.mark.parametrize("layout", ["half", "interleaved"])
@pytest.mark.parametrize("positions_shape", ["T", "BT"])
@pytest.mark.parametrize("table_batch", [None, 2])
def test_fused_position_gather(backend, layout, positions_shape, table_batch):
    """apply_rotary_positions == gathering the table rows first, then the reference rotation."""
    B, H, T, D = 2, 3, 6, 96
    x = make_x(B, H, T, D, torch.bfloat16, True)
    cos, sin = tables(50, 40, batch=table_batch)  # whole tables: (N, R/2) or (B, N, R/2)
    positions = torch.randint(0, 50, (T,) if positions_shape == "T" else (B, T))
    index = positions.expand(B, T)  # (B, T)
    rows = lambda t: t[index] if t.dim() == 2 else torch.stack([t[b, index[b]] for b in range(B)])  # noqa: E731
    want = rotate_reference(x, rows(cos), rows(sin), layout=layout)
    got = apply_rotary_positions(x, cos, sin, positions, layout=layout, backend=backend)
    assert_matches(got, want, f"{backend} fused gather")


def test_fused_position_gather_rejects_positions_past_the_table():
    x = torch.randn(1, 2, 3, 64)
    cos, sin = tables(10, 32)
    with pytest.raises(ValueError, match=r"\[0, 10\)"):
        apply_rotary_positions(x, cos, sin, torch.tensor([0, 5, 10]))


@pytest.mark.skipif(not triton_installed(), reason="triton not installed")
@pytest.mark.parametrize("layout", ["half", "interleaved"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_triton_varlen_packed_sequences_and_backward(layout, dtype):
    """Packed [total, H, D] with cu_seqlens: each sequence counts positions from seqlen_offset."""
    from ropekit.kernels import triton_rope

    lengths, H, D, R, offset = [3, 1, 7], 2, 80, 64, 2
    cu = torch.tensor([0, 3, 4, 11], dtype=torch.int32)
    x = torch.randn(sum(lengths), H, D).to(dtype).requires_grad_()
    cos, sin = tables(16, R // 2)
    got = triton_rope.apply_rotary_varlen(x, cos, sin, cu, max(lengths), layout=layout, seqlen_offset=offset)
    pieces = []
    for start, n in zip(cu[:-1].tolist(), lengths, strict=True):
        seq = x[start:start + n].unsqueeze(0)  # [1, n, H, D]
        c, s = cos[offset:offset + n], sin[offset:offset + n]
        pieces.append(rotate_reference(seq, c, s, layout=layout, heads_first=False)[0])
    want = torch.cat(pieces)
    assert_matches(got, want, f"varlen {layout} {dtype}")
    grad = torch.randn_like(got)
    (gx,) = torch.autograd.grad(got, x, grad)
    (gw,) = torch.autograd.grad(want, x, grad)
    assert_matches(gx, gw, f"varlen gradient {layout} {dtype}")
