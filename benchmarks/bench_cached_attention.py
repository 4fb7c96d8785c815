"""Plain rope attention of T new queries on a cache of S keys (``sdpa`` with ``1 < T < S``, no mask).

    python benchmarks/bench_cached_attention.py [--shapes 2048x8192,6144x8192,12288x16384] [--repeats 5]
                                                [--threads 2] [--out benchmarks/results/bench_cached_attention.json]
    python benchmarks/bench_cached_attention.py --shapes 256x512 --repeats 1      # smoke check

This is the shape of chunked prefill and of a passkey trial continuing a shared prefix. One row per
(T, S), SmolLM2's attention shape (9 query heads on 3 KV heads, head dim 64), float32 and bfloat16,
random q/k/v, times of one ``sdpa`` call (median of ``--repeats`` after one warm-up):

- ``fused``: the default, ``cached_causal_attention`` (a full ``attention_lse`` rectangle over the
  ``S - T`` cached keys and a causal square over the new ones, merged by log-sum-exp);
- ``masked``: the same call with the ``torch`` backend forced, which keeps SDPA with a ``[T, S]``
  causal mask and the keys copied per query head (the path ``fused`` replaced).

Columns: milliseconds; "x masked" (masked / fused); GFLOP/s over the pairs causality allows
(``4 * H * D * pairs``: QK^T and PV, the masked half not counted) and "% peak" against a large
square matmul in the row's dtype timed in the same run; peak RSS growth of each path is not
separable in one process and is not reported. Warns when the machine is busy.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
from bench_generate import cpu_model, write_json  # same folder: shared helpers
from bench_prefill import busy_warning, matmul_gflops

from ropekit.attention import sdpa
from ropekit.dispatch import use_backend

HEADS, KV_HEADS, HEAD_DIM = 9, 3, 64
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def parse_shapes(text: str) -> list[tuple[int, int]]:
    """"TxS,TxS" -> [(T, S), ...] with 1 < T < S."""
    shapes = []
    for item in text.split(","):
        try:
            T, S = (int(x) for x in item.lower().split("x"))
        except ValueError:
            raise SystemExit(f"--shapes: {item!r} is not TxS (two integers)") from None
        if not 1 < T < S:
            raise SystemExit(f"--shapes: {item!r} needs 1 < T < S")
        shapes.append((T, S))
    return shapes


def median_ms(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, repeats: int) -> float:
    """Median milliseconds of ``sdpa(q, k, v)`` over ``repeats`` calls after one warm-up call."""
    sdpa(q, k, v)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        sdpa(q, k, v)
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def causal_pairs(T: int, S: int) -> int:
    """Query-key pairs causality allows: every query sees the S - T cached keys and its own prefix."""
    return T * (S - T) + T * (T + 1) // 2


def run(shapes: list[tuple[int, int]], repeats: int, threads: int) -> dict:
    torch.manual_seed(0)
    torch.set_num_threads(threads)
    warning = busy_warning(threads)
    rows = []
    peaks = {name: matmul_gflops(dtype, 2048, 3) for name, dtype in DTYPES.items()}
    for name, dtype in DTYPES.items():
        for T, S in shapes:
            q = torch.randn(1, HEADS, T, HEAD_DIM).to(dtype)
            k, v = torch.randn(1, KV_HEADS, S, HEAD_DIM).to(dtype), torch.randn(1, KV_HEADS, S, HEAD_DIM).to(dtype)
            fused = median_ms(q, k, v, repeats)
            with use_backend("torch", "attention_lse"):
                masked = median_ms(q, k, v, repeats)
            gflops = 4 * HEADS * HEAD_DIM * causal_pairs(T, S) / 1e9
            rows.append({"dtype": name, "T": T, "S": S, "fused_ms": fused, "masked_ms": masked,
                         "x_masked": masked / fused, "fused_gflops": gflops / fused * 1e3,
                         "masked_gflops": gflops / masked * 1e3,
                         "fused_pct_peak": 100 * gflops / fused * 1e3 / peaks[name]})
    return {"cpu": cpu_model(), "machine": platform.machine(), "torch": torch.__version__, "threads": threads,
            "matmul_peak_gflops": peaks, "repeats": repeats, "busy_warning": warning or busy_warning(threads),
            "rows": rows}


def print_table(report: dict) -> None:
    print(f"{report['cpu']}, torch {report['torch']}, {report['threads']} threads; matmul peak GFLOP/s "
          + ", ".join(f"{k} {v:.0f}" for k, v in report["matmul_peak_gflops"].items()))
    if report["busy_warning"]:
        print("warning:", report["busy_warning"])
    print(f"{'dtype':5} {'T':>6} {'S':>6} {'fused ms':>10} {'masked ms':>10} {'x masked':>9} "
          f"{'GFLOP/s':>8} {'% peak':>7}")
    for r in report["rows"]:
        print(f"{r['dtype']:5} {r['T']:>6} {r['S']:>6} {r['fused_ms']:>10.1f} {r['masked_ms']:>10.1f} "
              f"{r['x_masked']:>9.2f} {r['fused_gflops']:>8.1f} {r['fused_pct_peak']:>6.0f}%")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shapes", default="2048x8192,6144x8192,12288x16384")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    report = run(parse_shapes(args.shapes), args.repeats, args.threads)
    print_table(report)
    write_json(report, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
