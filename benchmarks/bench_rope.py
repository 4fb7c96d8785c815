"""Rotary apply benchmark: ropekit's dispatched kernel vs a copy, transformers and torch.compile.

Shapes: q [B, 32, T, 128] and k [B, 8, T, 128] (Llama GQA), prefill T = 4096 and 16384 with
B = 1 and 8, and decode (one token, q [1, 32, 1, 128]); float32 and bfloat16; both layouts.
Each row is one rotation of q and k. GB/s counts the bytes of q and k read once and written
once; ``copy`` is ``out.copy_(x)`` of the same bytes into preallocated buffers (the bandwidth
limit). transformers' ``apply_rotary_pos_emb`` (half layout only; it has no interleaved form,
so its time is the baseline for both layouts) gets full-size duplicated cos/sin in x's dtype,
as LlamaRotaryEmbedding hands it. Configs whose buffers would pass ``--max-gib`` skip the
methods that would not fit.

Run (glibc's malloc otherwise returns big blocks to the OS and page-faults them back in
on every allocating call, which times the kernel, not the rotation)::

    MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=100000000000 \\
        python benchmarks/bench_rope.py --out bench_rope.json
    python benchmarks/bench_rope.py --quick        # one prefill shape and decode, float32 and bfloat16
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from functools import partial

import torch

from ropekit.kernels import select_backend
from ropekit.rope.apply import apply_rotary

Q_HEADS, KV_HEADS, HEAD_DIM = 32, 8, 128
GIB = 1024**3


@dataclass(frozen=True)
class Shape:
    """One benchmark shape: batch, tokens."""

    name: str
    batch: int
    tokens: int


PREFILL = [Shape(f"prefill B={b} T={t}", b, t) for t in (4096, 16384) for b in (1, 8)]
DECODE = Shape("decode B=1 T=1", 1, 1)
QUICK = [Shape("prefill B=1 T=4096", 1, 4096), DECODE]


@dataclass
class Row:
    """One timed method on one shape, dtype and layout."""

    shape: str
    dtype: str
    layout: str
    method: str
    ms: float
    gbps: float
    copy_ratio: float | None = None  # copy's time / this time: 1.0 is the bandwidth limit
    speedup_vs_transformers: float | None = None
    speedup_vs_compile: float | None = None


def median_ms(fn: Callable[[], object], warmup: int, repeats: int) -> float:
    """Median wall time of ``fn`` in ms after warm-up; tiny calls are looped to beat timer resolution."""
    for _ in range(warmup):
        fn()
    start = time.perf_counter()
    fn()
    inner = max(1, int(2e-3 / max(time.perf_counter() - start, 1e-9)))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(inner):
            fn()
        times.append((time.perf_counter() - start) / inner)
    return 1e3 * statistics.median(times)


def rotate_qk(q, k, cos, sin, layout: str, outs: tuple, backend: str | None) -> None:
    """One ropekit rotation of q and k (outs: (q, k) in place, buffers, or (None, None) to allocate)."""
    apply_rotary(q, cos, sin, layout=layout, out=outs[0], backend=backend)
    apply_rotary(k, cos, sin, layout=layout, out=outs[1], backend=backend)


def transformers_rope() -> Callable | None:
    """transformers' Llama ``apply_rotary_pos_emb``, or None when transformers is absent."""
    try:
        from transformers.models.llama.modeling_llama import apply_rotary_pos_emb
    except ImportError:
        return None
    return apply_rotary_pos_emb


def bench_shape(shape: Shape, dtype: torch.dtype, layouts: list[str], args, hf: Callable | None,
                hf_compiled: Callable | None) -> list[Row]:
    """Time every method on one shape and dtype."""
    B, T = shape.batch, shape.tokens
    q = torch.randn(B, Q_HEADS, T, HEAD_DIM, dtype=dtype)  # [B, H, T, D]
    k = torch.randn(B, KV_HEADS, T, HEAD_DIM, dtype=dtype)
    qk_bytes = (q.numel() + k.numel()) * q.element_size()
    moved = 2 * qk_bytes  # read once + written once
    angle = torch.rand(T, HEAD_DIM // 2, dtype=torch.float64) * T
    cos, sin = angle.cos().float(), angle.sin().float()  # (T, D/2) ropekit tables
    budget = args.max_gib * GIB
    fits = lambda extra: qk_bytes * (1 + extra) <= budget  # noqa: E731  (inputs + extra copies)
    ms: dict[tuple[str, str], float] = {}
    time_it = lambda fn: median_ms(fn, args.warmup, args.repeats)  # noqa: E731

    if fits(1):
        q_out, k_out = torch.empty_like(q), torch.empty_like(k)
        ms["copy", ""] = time_it(lambda: (q_out.copy_(q), k_out.copy_(k)))
        for layout in layouts:
            for method, outs in (("ropekit in-place", (q, k)), ("ropekit out=", (q_out, k_out)),
                                 ("ropekit alloc", (None, None))):
                ms[method, layout] = time_it(partial(rotate_qk, q, k, cos, sin, layout, outs, args.backend))
        del q_out, k_out
    # transformers' path: full-size cos/sin [B, T, D] in x's dtype plus ~4 temporaries per tensor.
    if hf is not None and fits(5):
        cos_full = torch.cat([cos, cos], dim=-1).to(dtype).expand(B, T, HEAD_DIM)  # [B, T, D]
        sin_full = torch.cat([sin, sin], dim=-1).to(dtype).expand(B, T, HEAD_DIM)
        ms["transformers", ""] = time_it(lambda: hf(q, k, cos_full, sin_full))
        if hf_compiled is not None:
            try:
                ms["torch.compile(transformers)", ""] = time_it(lambda: hf_compiled(q, k, cos_full, sin_full))
            except Exception as exc:  # an inductor/compiler failure: report and go on
                print(f"  torch.compile skipped: {type(exc).__name__}: {str(exc)[:200]}")
    copy_ms, hf_ms = ms.get(("copy", "")), ms.get(("transformers", ""))
    compile_ms = ms.get(("torch.compile(transformers)", ""))
    rows = []
    for (method, layout), t in ms.items():
        ours = method.startswith("ropekit")
        rows.append(Row(shape.name, str(dtype).removeprefix("torch."), layout or "-", method, round(t, 4),
                        round(moved / (t * 1e-3) / 1e9, 2),
                        copy_ratio=round(copy_ms / t, 3) if copy_ms else None,
                        speedup_vs_transformers=round(hf_ms / t, 2) if ours and hf_ms else None,
                        speedup_vs_compile=round(compile_ms / t, 2) if ours and compile_ms else None))
    return rows


def fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def main(argv: list[str] | None = None) -> list[Row]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="one prefill shape and decode, fewer repeats")
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument("--layouts", default="half,interleaved")
    parser.add_argument("--backend", default=None, help="force a ropekit backend (default: dispatch's pick)")
    parser.add_argument("--no-compile", action="store_true", help="skip torch.compile of transformers")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--max-gib", type=float, default=6.0, help="skip methods whose buffers pass this")
    parser.add_argument("--out", default=None, help="write the rows as JSON here")
    args = parser.parse_args(argv)
    if args.quick:
        args.repeats = min(args.repeats, 5)
    shapes = QUICK if args.quick else [*PREFILL, DECODE]
    dtypes = [getattr(torch, name) for name in args.dtypes.split(",")]
    layouts = args.layouts.split(",")

    hf = transformers_rope()
    hf_compiled = None
    if hf is not None and not args.no_compile:
        try:
            hf_compiled = torch.compile(hf)
        except Exception as exc:
            print(f"torch.compile unavailable: {exc}")
    backend = select_backend(torch.empty(1, 1, 1, HEAD_DIM), args.backend)
    print(f"ropekit backend: {backend} | torch {torch.__version__} | threads {torch.get_num_threads()} | "
          f"{platform.processor() or platform.machine()}")
    rows: list[Row] = []
    header = (f"{'shape':<20} {'dtype':<9} {'layout':<11} {'method':<28} {'ms':>9} {'GB/s':>7} "
              f"{'copy/x':>7} {'x HF':>7} {'x comp':>7}")
    print(header)
    print("-" * len(header))
    for shape in shapes:
        for dtype in dtypes:
            for row in bench_shape(shape, dtype, layouts, args, hf, hf_compiled):
                rows.append(row)
                print(f"{row.shape:<20} {row.dtype:<9} {row.layout:<11} {row.method:<28} {row.ms:>9.3f} "
                      f"{row.gbps:>7.1f} {fmt(row.copy_ratio, '.2f'):>7} "
                      f"{fmt(row.speedup_vs_transformers, '.1f'):>7} {fmt(row.speedup_vs_compile, '.1f'):>7}")
    if args.out:
        meta = {"torch": torch.__version__, "threads": torch.get_num_threads(), "backend": backend,
                "machine": platform.machine(), "processor": platform.processor()}
        with open(args.out, "w") as f:
            json.dump({"meta": meta, "rows": [asdict(r) for r in rows]}, f, indent=1)
        print(f"wrote {args.out}")
    return rows


if __name__ == "__main__":
    main()
