"""Decode and prefill speed: ropekit (fused decode kernels; fp32 and bf16 weights), its torch ops, transformers.

    python benchmarks/bench_decode.py [--model smollm2] [--prompt-tokens 1000] [--decode-prompt-tokens 32]
                                      [--new-tokens 128] [--repeats 3] [--threads 2]
                                      [--engines fused,torch-ops,bf16,transformers]
                                      [--no-kernels]
                                      [--out results/bench_decode.json]

All engines run on the same GGUF weights in one process (transformers loads the file with
``gguf_file=``), float32 unless the row says bfloat16. "fused" is the model's own decode path
(the C++ kernels on its weights, in one huge-page buffer since ``load_model``); "torch ops" the
same model with its decode steps as torch ops; "bf16" the model loaded in bfloat16.
Repeats are interleaved (engine A, B, C, A, B, C, ...) after one warm-up each, so a change in
machine load hits every engine alike; the table shows medians.

- prefill: one forward pass over ``--prompt-tokens`` tokens of the shipped evaluation text into
  a fresh cache, logits for the last position only (what generation does).
- decode: greedy generation of ``--new-tokens`` after a ``--decode-prompt-tokens`` prompt, timed
  from the first new token to the last (excludes the prefill), through each engine's own loop.
- weights GB/s: the weight bytes one decoded token reads, times tokens/s (a lower bound on the
  memory traffic; the copy row of the kernel table is the machine's practical ceiling).

The kernel table streams one token's worth of the real weight matrices through ``F.linear``,
ropekit's GEMV (float32, bfloat16; on its own thread pool, and on OpenMP threads for comparison),
a copy of the same bytes into preallocated buffers, and a read-only pass (the GEMV's own loop
against a vector of ones).

Page faults from fresh large allocations make timings swing; the script re-executes itself once
with glibc's ``MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=...`` set (so freed memory is reused)
unless they are already set.
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from bench_generate import _Timestamps, load_transformers, prompt_ids, write_json  # same folder: shared helpers

DEFAULTS = dict(model="smollm2", prompt_tokens=1000, decode_prompt_tokens=32, new_tokens=128, repeats=3,
                threads=2, engines="fused,torch-ops,bf16,transformers")
MALLOC_ENV = {"MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": "100000000000"}
ENGINE_LABELS = {"fused": "ropekit (fp32, fused decode)", "torch-ops": "ropekit (fp32, torch ops)",
                 "bf16": "ropekit (bf16 weights, fused)", "transformers": "transformers (fp32)"}


# ---- one timed run per engine: (prefill seconds, decode seconds for new_tokens - 1 steps) -------


def run_ropekit(model, prefill_ids: list[int], decode_ids: list[int], new_tokens: int,
                fast: bool = True) -> tuple[float, float]:
    from ropekit.model.generate import generate_ids

    with torch.inference_mode():
        cache = model.new_cache(1, len(prefill_ids))
        start = time.perf_counter()
        model(torch.tensor([prefill_ids]), cache=cache, logits_to_keep=1)
        prefill = time.perf_counter() - start
    stamps = [time.perf_counter() for _ in generate_ids(model, [decode_ids], max_new_tokens=new_tokens, fast=fast)]
    return prefill, stamps[-1] - stamps[0]


def run_torch_ops(model, prefill_ids: list[int], decode_ids: list[int], new_tokens: int) -> tuple[float, float]:
    return run_ropekit(model, prefill_ids, decode_ids, new_tokens, fast=False)


def run_transformers(hf, prefill_ids: list[int], decode_ids: list[int],
                     new_tokens: int) -> tuple[float, float]:
    from transformers import DynamicCache

    with torch.inference_mode():
        x = torch.tensor([prefill_ids])
        start = time.perf_counter()
        hf(x, past_key_values=DynamicCache(config=hf.config), use_cache=True, logits_to_keep=1)
        prefill = time.perf_counter() - start
        x = torch.tensor([decode_ids])
        streamer = _Timestamps()
        hf.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=new_tokens,
                    min_new_tokens=new_tokens, do_sample=False, streamer=streamer)
    stamps = streamer.times[1:]  # drop the prompt's put
    return prefill, stamps[-1] - stamps[0]


# ---- the kernel table: one token's matrices through each matvec, and a copy of the same bytes --


def _median_seconds(fn: Callable[[], object], repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def bench_kernels(model, repeats: int) -> dict:
    """ms and GB/s for streaming every decode matrix of ``model`` once, five ways."""
    from ropekit.kernels.decode import extension

    ext = extension()
    # Every matrix a decode step multiplies with: the embedding is only a row lookup, but the output
    # head (tied to the embedding in SmolLM2) is read whole.
    mats = [p.detach() for name, p in model.named_parameters() if p.dim() == 2 and "embed" not in name]
    mats = list({t.data_ptr(): t for t in [*mats, model.lm_head.weight.detach()]}.values())
    nbytes = sum(t.numel() * t.element_size() for t in mats)
    xs = {k: torch.randn(k) for k in {t.shape[1] for t in mats}}
    ys = {n: torch.empty(n) for n in {t.shape[0] for t in mats}}
    dst = [torch.empty_like(t) for t in mats]
    def gemv_all(weights):
        for w in weights:
            ext.gemv([w], xs[w.shape[1]], ys[w.shape[0]], False, None, 1e-5)

    def copy_all():
        for source, target in zip(mats, dst, strict=True):
            target.copy_(source)

    rows = {"F.linear (fp32)": (lambda: [F.linear(xs[w.shape[1]], w) for w in mats], nbytes),
            "copy of the same bytes (fp32)": (copy_all, nbytes)}
    if ext is not None:
        bf16 = [t.bfloat16() for t in mats]
        rows["ropekit gemv (fp32)"] = (lambda: gemv_all(mats), nbytes)
        rows["ropekit gemv (fp32, OpenMP)"] = (lambda: gemv_all(mats), nbytes)  # the A/B for the pool
        rows["ropekit gemv (bf16)"] = (lambda: gemv_all(bf16), nbytes // 2)
        rows["read only (fp32)"] = (lambda: [ext.stream_sum(w) for w in mats], nbytes)
    out = {}
    for name, (fn, size) in rows.items():
        if ext is not None:
            ext.set_threading("openmp" if "OpenMP" in name else "pool")
        seconds = _median_seconds(fn, repeats)
        out[name] = {"ms": seconds * 1e3, "bytes": size, "gb_s": size / seconds / 1e9}
        print(f"  kernel {name}: {seconds * 1e3:.1f} ms, {size / seconds / 1e9:.1f} GB/s", file=sys.stderr)
    return out


# ---- the run ---------------------------------------------------------------------------------


def run(model: str, prompt_tokens: int, decode_prompt_tokens: int, new_tokens: int, repeats: int,
        threads: int, engines: tuple[str, ...], kernels: bool = True) -> dict:
    from ropekit.kernels.decode import extension
    from ropekit.loading import load_model, resolve_source

    unknown = set(engines) - set(ENGINE_LABELS)
    if unknown:
        raise ValueError(f"unknown engines {sorted(unknown)}; known: {list(ENGINE_LABELS)}")
    torch.set_num_threads(threads)
    path = resolve_source(model)
    ours, tokenizer = load_model(path, dtype=torch.float32)
    ids = prompt_ids(tokenizer, max(prompt_tokens, decode_prompt_tokens))
    prefill_ids, decode_ids = ids[:prompt_tokens], ids[:decode_prompt_tokens]
    fp32_bytes = sum(p.numel() * p.element_size() for p in ours.parameters())  # tied weights counted once

    runners: dict[str, tuple[Callable, object, int]] = {}
    if "fused" in engines:
        runners["fused"] = (run_ropekit, ours, fp32_bytes)
    if "torch-ops" in engines:
        runners["torch-ops"] = (run_torch_ops, ours, fp32_bytes)
    if "bf16" in engines:
        runners["bf16"] = (run_ropekit, load_model(path, dtype=torch.bfloat16)[0], fp32_bytes // 2)
    if "transformers" in engines:
        runners["transformers"] = (run_transformers, load_transformers(path), fp32_bytes)

    kernel_table = bench_kernels(ours, max(repeats, 5)) if kernels else {}
    for fn, engine, _ in runners.values():
        fn(engine, prefill_ids[:64], decode_ids[:16], 8)  # warm-up: thread pools, allocator, first calls
    runs: dict[str, list[tuple[float, float]]] = {name: [] for name in runners}
    for _ in range(repeats):
        for name, (fn, engine, _) in runners.items():
            runs[name].append(fn(engine, prefill_ids, decode_ids, new_tokens))
            prefill_s, decode_s = runs[name][-1]
            print(f"  {name}: prefill {len(prefill_ids) / prefill_s:.0f} tok/s, "
                  f"decode {(new_tokens - 1) / decode_s:.1f} tok/s", file=sys.stderr)
    results = {}
    for name, (_, _, weight_bytes) in runners.items():
        prefill = statistics.median(r[0] for r in runs[name])
        decode = statistics.median(r[1] for r in runs[name])
        decode_tok_s = (new_tokens - 1) / decode
        results[name] = {"label": ENGINE_LABELS[name], "prefill_s": prefill,
                         "prefill_tok_s": len(prefill_ids) / prefill, "decode_s": decode,
                         "decode_tok_s": decode_tok_s, "weight_bytes_per_token": weight_bytes,
                         "weights_gb_s": weight_bytes * decode_tok_s / 1e9,
                         "runs": [{"prefill_s": p, "decode_s": d} for p, d in runs[name]]}
    if "transformers" in results:
        base = results["transformers"]["decode_tok_s"]
        for r in results.values():
            r["decode_vs_transformers"] = r["decode_tok_s"] / base
    return {"model": str(path), "threads": threads, "prompt_tokens": len(prefill_ids),
            "decode_prompt_tokens": len(decode_ids), "new_tokens": new_tokens, "repeats": repeats,
            "torch": torch.__version__, "gemv_backend": "cpp" if extension() is not None else "torch",
            "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, {_cpu_name()}",
            "load_average": os.getloadavg(), "malloc_env": {k: os.environ.get(k) for k in MALLOC_ENV},
            "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "kernels": kernel_table, "results": results}


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def print_table(report: dict) -> None:
    print(f"{report['machine']}; {report['threads']} threads; torch {report['torch']}; "
          f"load average {report['load_average'][0]:.1f}; median of {report['repeats']}; "
          f"peak RSS {report['peak_rss_mib']:.0f} MiB")
    if report["kernels"]:
        print("\none token's weight matrices, streamed once")
        header = f"{'kernel':<32}{'ms':>9}{'GB/s':>8}"
        print(header + "\n" + "-" * len(header))
        for name, r in report["kernels"].items():
            print(f"{name:<32}{r['ms']:>9.1f}{r['gb_s']:>8.1f}")
    print(f"\nprefill {report['prompt_tokens']} tokens; decode {report['new_tokens']} new tokens after "
          f"{report['decode_prompt_tokens']} (greedy)")
    header = (f"{'engine':<30}{'prefill tok/s':>14}{'decode tok/s':>14}{'vs transformers':>17}"
              f"{'weights GB/s':>14}")
    print(header + "\n" + "-" * len(header))
    for r in report["results"].values():
        ratio = f"{r['decode_vs_transformers']:.2f}x" if "decode_vs_transformers" in r else "-"
        print(f"{r['label']:<30}{r['prefill_tok_s']:>14.0f}{r['decode_tok_s']:>14.1f}{ratio:>17}"
              f"{r['weights_gb_s']:>14.1f}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=DEFAULTS["model"])
    parser.add_argument("--prompt-tokens", type=int, default=DEFAULTS["prompt_tokens"],
                        help="prefill prompt length")
    parser.add_argument("--decode-prompt-tokens", type=int, default=DEFAULTS["decode_prompt_tokens"],
                        help="prompt length before the timed decode")
    parser.add_argument("--new-tokens", type=int, default=DEFAULTS["new_tokens"])
    parser.add_argument("--repeats", type=int, default=DEFAULTS["repeats"])
    parser.add_argument("--threads", type=int, default=DEFAULTS["threads"])
    parser.add_argument("--engines", default=DEFAULTS["engines"], help="comma-separated subset")
    parser.add_argument("--no-kernels", action="store_true", help="skip the kernel table")
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    args = parser.parse_args(argv)
    if args.new_tokens < 2:
        parser.error("--new-tokens must be >= 2 (decode is timed from the first new token to the last)")
    report = run(args.model, args.prompt_tokens, args.decode_prompt_tokens, args.new_tokens, args.repeats,
                 args.threads, tuple(args.engines.split(",")), kernels=not args.no_kernels)
    print_table(report)
    write_json(report, args.out)
    return 0


if __name__ == "__main__":
    if argv_env_missing := [k for k, v in MALLOC_ENV.items() if os.environ.get(k) != v]:
        print(f"re-running with {' '.join(f'{k}={MALLOC_ENV[k]}' for k in argv_env_missing)} "
              "(reuse freed memory: no page-fault noise)", file=sys.stderr)
        os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, **MALLOC_ENV})
    sys.exit(main())
