"""The attention variants against plain rope on SmolLM2 (ropekit engine, CPU): prefill time, cached decode
time per token and peak memory, each as a ratio to plain rope at the same length.

    python benchmarks/bench_variants.py [--lengths 16384,32768] [--methods "none;self-extend:group=16,window=1024;..."]
                                        [--new-tokens 16] [--dtype float32] [--threads 2]
                                        [--out benchmarks/results/bench_variants.json]

Each (method, length) cell runs in its own process, so its peak resident memory (``ru_maxrss``) is its
own: the model is loaded, one warm-up generation of 4 tokens after a 1024-token prompt runs, then one
generation of ``--new-tokens`` tokens after the first T tokens of the packaged text. "prefill" is the
time to the first new token (the prompt's forward pass and one logit row), "decode" the median time of
the following one-token steps (each attends to the T cached keys), "peak" the process's peak RSS and
"added" its rise over the RSS after the warm-up (what the long prompt costs). "x none" divides by the
plain-rope cell of the same length. Cells run one after another; methods are ``;``-separated SPECs.
A cell whose record already exists in ``--out`` (same method, length, dtype, threads) is kept, so a
run that stops can be resumed with the same command.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from bench_generate import cpu_model  # same folder: shared helpers
from bench_prefill import busy_warning, window_tokens

DEFAULT_METHODS = ("none;self-extend:group=16,window=1024;rerope:window=1024;leaky-rerope:window=1024,k=16;"
                   "dca")
GOALS = {"prefill": 1.15, "decode": 1.3, "peak": 1.5}


def rss_mib() -> float:
    """This process's resident memory now, MiB (Linux /proc)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def run_cell(model: str, method: str, tokens: int, new_tokens: int, dtype: str, threads: int) -> dict:
    """One cell, in this process: see the module docstring."""
    from ropekit.eval.runners import load_runner
    from ropekit.model.generate import generate_ids

    torch.set_num_threads(threads)
    runner = load_runner(model, backend="ropekit", dtype=dtype)
    runner.use(method)
    ids = window_tokens(runner.tokenizer, [tokens])[:tokens].tolist()
    for _ in generate_ids(runner.model, [ids[:1024]], max_new_tokens=4):  # warm-up: kernels, tables, caches
        pass
    settled = rss_mib()
    stamps = [time.perf_counter()]
    for _ in generate_ids(runner.model, [ids], max_new_tokens=new_tokens + 1):
        stamps.append(time.perf_counter())
    steps = [b - a for a, b in zip(stamps[1:], stamps[2:], strict=False)]
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    return {"method": method, "tokens": tokens, "prefill_s": stamps[1] - stamps[0],
            "decode_ms": 1000 * statistics.median(steps), "decode_steps": len(steps),
            "peak_mib": peak, "added_mib": peak - settled}


def same_cell(row: dict, method: str, tokens: int, args) -> bool:
    return (row.get("method"), row.get("tokens"), row.get("dtype"), row.get("threads")) == \
        (method, tokens, args.dtype, args.threads)


def ratios(rows: list[dict]) -> None:
    """Each row's "x none" ratios (prefill, decode, peak) against the plain cell of its length."""
    plain = {(r["tokens"], r["dtype"], r["threads"]): r for r in rows if r["method"] == "none"}
    for r in rows:
        base = plain.get((r["tokens"], r["dtype"], r["threads"]))
        r["x_none"] = None if base is None else {
            "prefill": r["prefill_s"] / base["prefill_s"], "decode": r["decode_ms"] / base["decode_ms"],
            "peak": r["peak_mib"] / base["peak_mib"]}


def print_table(report: dict) -> None:
    print(f"{report['cpu']}; torch {report['torch']}; model {report['model']}")
    print(f"{'method':<40}{'T':>7}{'dtype':>10}{'thr':>4}{'prefill s':>11}{'x none':>8}{'decode ms':>11}"
          f"{'x none':>8}{'peak MiB':>10}{'x none':>8}{'added MiB':>10}")
    for r in report["rows"]:
        x = r.get("x_none") or {}

        def ratio(key, x=x):
            return f"{x[key]:.2f}" if key in x else "-"

        print(f"{r['method']:<40}{r['tokens']:>7}{r['dtype']:>10}{r['threads']:>4}{r['prefill_s']:>11.2f}"
              f"{ratio('prefill'):>8}{r['decode_ms']:>11.1f}{ratio('decode'):>8}{r['peak_mib']:>10.0f}"
              f"{ratio('peak'):>8}{r['added_mib']:>10.0f}")
    print("goals: " + ", ".join(f"{k} x none <= {v}" for k, v in GOALS.items()))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--lengths", default="16384,32768")
    parser.add_argument("--methods", default=DEFAULT_METHODS, help="';'-separated SPECs")
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/bench_variants.json"))
    parser.add_argument("--cell", nargs=2, metavar=("METHOD", "TOKENS"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.cell:
        print(json.dumps(run_cell(args.model, args.cell[0], int(args.cell[1]), args.new_tokens, args.dtype,
                                  args.threads)))
        return 0
    report = json.loads(args.out.read_text()) if args.out.exists() else {"rows": []}
    report.update({"model": args.model, "cpu": cpu_model(), "torch": torch.__version__,
                   "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY")})
    methods = [m.strip() for m in args.methods.split(";") if m.strip()]
    for tokens in sorted(int(n) for n in args.lengths.split(",")):
        for method in methods:
            if any(same_cell(r, method, tokens, args) for r in report["rows"]):
                continue
            warning = busy_warning(args.threads)
            command = [sys.executable, __file__, "--cell", method, str(tokens), "--model", args.model,
                       "--new-tokens", str(args.new_tokens), "--dtype", args.dtype, "--threads", str(args.threads)]
            done = subprocess.run(command, capture_output=True, text=True, check=False)
            if done.returncode != 0:
                print(f"{method} T={tokens}: failed: {done.stderr.strip().splitlines()[-1:]}", file=sys.stderr)
                continue
            row = json.loads(done.stdout.strip().splitlines()[-1])
            row.update({"dtype": args.dtype, "threads": args.threads, "busy_warning": warning})
            report["rows"].append(row)
            print(f"  {method} T={tokens}: prefill {row['prefill_s']:.1f} s, decode {row['decode_ms']:.1f} ms, "
                  f"peak {row['peak_mib']:.0f} MiB", file=sys.stderr)
            ratios(report["rows"])
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(report, indent=1) + "\n")  # after every cell: resumable
    ratios(report["rows"])
    print_table(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
