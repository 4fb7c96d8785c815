"""OpenMP wait policies, on a quiet machine and with another process keeping a core busy: decode speed and one op.

    python benchmarks/bench_omp_policy.py [--policies default,passive,bind] [--loads quiet,busy]
                                          [--engines ropekit] [--prompt-tokens 200] [--new-tokens 32]
                                          [--repeats 3] [--threads 2] [--out benchmarks/results/bench_omp_policy.json]

torch's CPU ops run on an OpenMP thread pool. GNU libgomp (the runtime in torch's Linux wheels) reads
its environment once, when ``import torch`` loads it, so each policy runs in its own subprocess with
the variables set before the interpreter starts:

- ``default``: none set (libgomp spins a long while at every barrier before it sleeps);
- ``passive``: ``OMP_WAIT_POLICY=PASSIVE`` (idle threads sleep at once);
- ``bind``: ``OMP_PROC_BIND=true`` (one thread per core; libgomp pins the main thread to the first
  core when it loads, and every thread started later inherits that one core);
- ``spin``: ``GOMP_SPINCOUNT=10000`` (libgomp only: a short spin, then sleep);
- or any ``VAR=VALUE[+VAR=VALUE...]``.

Loads: ``quiet`` (nothing else started; the script warns when the load average says otherwise) and
``busy`` (``--spinners`` processes running ``while True: pass`` for the duration of each row, then
killed). Each (load, policy) cell runs two children:

- ``F.linear ms``: the median time of one-token ``F.linear`` ([1, 576] x [1536, 576]: a SmolLM2 MLP
  projection), one OpenMP region per call; "CPUs" is the main thread's affinity after ``import torch``;
- ``benchmarks/bench_generate.py --engines ...``: prefill and decode tokens/s (its own medians).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
POLICIES = {"default": {}, "passive": {"OMP_WAIT_POLICY": "PASSIVE"}, "bind": {"OMP_PROC_BIND": "true"},
            "spin": {"GOMP_SPINCOUNT": "10000"}}
# cleared from every child's environment before its policy is set, so no inherited setting leaks in
OPENMP_VARS = ("OMP_WAIT_POLICY", "OMP_PROC_BIND", "OMP_PLACES", "OMP_NUM_THREADS", "GOMP_SPINCOUNT",
               "KMP_BLOCKTIME", "KMP_AFFINITY")
DEFAULTS = dict(policies="default,passive,bind", loads="quiet,busy", engines="ropekit", prompt_tokens=200,
                new_tokens=32, repeats=3, threads=2, spinners=1)


def parse_policy(text: str) -> tuple[str, dict[str, str]]:
    """A policy name from POLICIES, or ``VAR=VALUE[+VAR=VALUE...]`` -> (label, environment)."""
    if text in POLICIES:
        return text, POLICIES[text]
    pairs = [item.split("=", 1) for item in text.split("+")]
    if not all(len(p) == 2 and p[0] for p in pairs):
        raise SystemExit(f"unknown policy {text!r}: one of {', '.join(POLICIES)} or VAR=VALUE[+VAR=VALUE]")
    return text, dict(pairs)


def child_env(policy: dict[str, str]) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in OPENMP_VARS}
    return {**env, **policy}


@contextlib.contextmanager
def spinning(count: int):
    """``count`` processes that keep one core each busy until the block ends (then killed and reaped)."""
    procs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(count)]
    try:
        time.sleep(0.2)  # let them start spinning
        yield [p.pid for p in procs]
    finally:
        for p in procs:
            p.kill()
        for p in procs:
            p.wait()


def linear_child(threads: int, calls: int = 200) -> dict:
    """(in a child) median ms of one-token F.linear after warm-up, and the main thread's CPUs."""
    import torch
    import torch.nn.functional as F

    cpus = sorted(os.sched_getaffinity(0))  # after import torch: libgomp has read its environment
    torch.set_num_threads(threads)
    x, w = torch.randn(1, 576), torch.randn(1536, 576)
    for _ in range(20):
        F.linear(x, w)
    times = []
    for _ in range(calls):
        start = time.perf_counter()
        F.linear(x, w)
        times.append(time.perf_counter() - start)
    return {"linear_ms": 1e3 * statistics.median(times), "cpus": cpus}


def run_child(command: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    result = subprocess.run(command, env=env, capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed ({result.returncode}):\n{result.stderr[-2000:]}")
    return result


def measure_cell(policy: dict[str, str], args) -> dict:
    """The F.linear child and the bench_generate child under one policy."""
    env = child_env(policy)
    linear = json.loads(run_child([sys.executable, __file__, "--child-linear", "--threads", str(args.threads)],
                                  env).stdout.strip().splitlines()[-1])
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "generate.json"
        run_child([sys.executable, str(HERE / "bench_generate.py"), "--model", args.model, "--engines", args.engines,
                   "--prompt-tokens", str(args.prompt_tokens), "--new-tokens", str(args.new_tokens),
                   "--repeats", str(args.repeats), "--threads", str(args.threads), "--out", str(out)], env)
        generate = json.loads(out.read_text())
    engines = {name: {"prefill_tok_s": r["prefill_tok_s"], "decode_tok_s": r["decode_tok_s"]}
               for name, r in generate["results"].items()}
    return {**linear, "engines": engines, "cpu": generate["cpu"]}


def quiet_warning(threads: int) -> str | None:
    load = os.getloadavg()[0]
    if load > 0.5:
        return (f"the 'quiet' rows ran with a 1-minute load average of {load:.2f}: the machine was not quiet, "
                "so they measure a busy machine too")
    return None


def print_table(report: dict) -> None:
    engines = report["engines"].split(",")
    print(f"{report['cpu']}; {report['threads']} threads; prompt {report['prompt_tokens']} tokens, "
          f"{report['new_tokens']} new tokens, median of {report['repeats']}; busy = {report['spinners']} spinning "
          "process(es)")
    width = {e: len(e) + 10 for e in engines}  # room for "<engine> prefill" and a gap
    header = f"{'load':<7}{'policy':<28}{'CPUs':>8}{'F.linear ms':>13}" + "".join(
        f"{e + ' prefill':>{width[e]}}{e + ' decode':>{width[e]}}" for e in engines)
    print(header)
    print("-" * len(header))
    for row in report["rows"]:
        cells = "".join(f"{row['engines'][e]['prefill_tok_s']:>{width[e]}.0f}"
                        f"{row['engines'][e]['decode_tok_s']:>{width[e]}.1f}" for e in engines)
        cpus = ",".join(str(c) for c in row["cpus"])
        print(f"{row['load']:<7}{row['policy']:<28}{cpus:>8}{row['linear_ms']:>13.3f}{cells}")
    print("(prefill, decode: tokens/s)")
    for line in report["warnings"]:
        print(f"warning: {line}")


def run(args) -> dict:
    policies = [parse_policy(p) for p in args.policies.split(",")]
    loads = args.loads.split(",")
    if set(loads) - {"quiet", "busy"}:
        raise SystemExit(f"--loads: quiet and/or busy, got {args.loads!r}")
    rows, warnings = [], []
    for load in loads:
        if load == "quiet" and (line := quiet_warning(args.threads)):
            warnings.append(line)
            print(f"warning: {line}", file=sys.stderr)
        for label, policy in policies:
            with spinning(args.spinners if load == "busy" else 0):
                cell = measure_cell(policy, args)
            rows.append({"load": load, "policy": label, "env": policy, **cell})
            decode = ", ".join(f"{e} {r['decode_tok_s']:.1f}" for e, r in cell["engines"].items())
            print(f"  {load} {label}: F.linear {cell['linear_ms']:.3f} ms, decode tok/s {decode}", file=sys.stderr)
    return {"threads": args.threads, "engines": args.engines, "prompt_tokens": args.prompt_tokens,
            "new_tokens": args.new_tokens, "repeats": args.repeats, "spinners": args.spinners,
            "cpu": rows[0]["cpu"] if rows else platform.processor(), "cores": len(os.sched_getaffinity(0)),
            "warnings": warnings, "rows": rows}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--policies", default=DEFAULTS["policies"],
                        help=f"comma-separated: {', '.join(POLICIES)}, or VAR=VALUE[+VAR=VALUE]")
    parser.add_argument("--loads", default=DEFAULTS["loads"], help="quiet and/or busy")
    parser.add_argument("--engines", default=DEFAULTS["engines"], help="bench_generate.py engines")
    parser.add_argument("--prompt-tokens", type=int, default=DEFAULTS["prompt_tokens"])
    parser.add_argument("--new-tokens", type=int, default=DEFAULTS["new_tokens"])
    parser.add_argument("--repeats", type=int, default=DEFAULTS["repeats"])
    parser.add_argument("--threads", type=int, default=DEFAULTS["threads"])
    parser.add_argument("--spinners", type=int, default=DEFAULTS["spinners"], help="busy: how many spinning processes")
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    parser.add_argument("--child-linear", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child_linear:
        print(json.dumps(linear_child(args.threads)))
        return 0
    report = run(args)
    print_table(report)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
