"""Prefill over long windows, logits of every position: ropekit and transformers (float32, bfloat16) and llama.cpp.

    python benchmarks/bench_prefill.py [--model smollm2] [--lengths 4096,16384,32768] [--repeats 3]
                                       [--single-above 4096] [--threads 2] [--peak-size 4096]
                                       [--engines ropekit-fp32,ropekit-bf16,transformers-fp32,...]
                                       [--out benchmarks/results/bench_prefill.json]
    python benchmarks/bench_prefill.py --lengths 512 --repeats 1        # smoke check

What one row times is what the perplexity eval runs per window: one forward pass over the first T
tokens of the packaged text and the NLL of every token, through the runners' ``window_nll``
(ropekit: ``EngineRunner``; transformers: ``TransformersRunner`` on the same GGUF; both compute the
logits from the final hidden states in chunks, never a ``T x V`` matrix). llama.cpp
(llama-cpp-python on the same GGUF, the same thread count) decodes the window in batches of
``--llama-batch`` tokens with logits for every token, scored with the same cross-entropy. It
computes on the file's quantised weights directly (Q4_1 x 8-bit activations, f16 KV cache), so its
perplexity differs slightly from the others', which dequantise the weights once.

Timing: per engine, one warm-up window at the smallest length, then ``--repeats`` runs per length
(the median is reported) for lengths up to ``--single-above``, one run per longer length (a 32K
window of SmolLM2 is 46 TFLOP, 81% of it attention, quadratic in T).

Columns: seconds; tokens/s (T / seconds); GFLOP/s from ``prefill_flops`` (the matmuls and the causal
attention, nothing else); "% peak" against a large square matmul in the row's dtype measured in
the same run (best of ``--peak-tries``: AMX clocks swing); the window's perplexity and its relative
difference from the same backend's float32 row ("vs fp32") and from transformers in the same dtype
("vs HF"); a warning when ropekit and transformers in float32, or a bfloat16 row and its float32
row, disagree by more than 0.1%; "x HF" = the transformers row's seconds in the same dtype / this
row's (llama.cpp: against transformers float32 for both comparisons).

The script warns when the machine is busy: a 1-minute load average that leaves fewer free cores than
``--threads`` at the start, or a short matmul whose time changed between the start and the end.
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import resource
import statistics
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from bench_generate import cpu_model, write_json  # same folder: shared helpers

ENGINES = ("ropekit-fp32", "ropekit-bf16", "transformers-fp32", "transformers-bf16", "llama.cpp")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
DEFAULTS = dict(model="smollm2", lengths="4096,16384,32768", repeats=3, single_above=4096, threads=2,
                peak_size=4096, peak_tries=5, llama_batch=512)


def prefill_flops(config, T: int) -> int:
    """Floating-point operations of one prefill over T tokens with logits for every position.

    ``config``: anything with a LLaMA config's field names (ropekit's ``LlamaConfig`` or a transformers
    config): C = hidden_size, I = intermediate_size, L = num_hidden_layers, H = num_attention_heads,
    Hkv = num_key_value_heads, D = head_dim, V = vocab_size. A multiply-add counts as 2 FLOPs::

        matmuls   = 2 T (L (2 C H D + 2 C Hkv D + 3 C I) + C V)    # q,o + k,v + gate,up,down, lm_head
        attention = L * 2 * 2 (T^2 / 2) H D                         # QK^T and PV over the causal half
        total     = matmuls + attention

    Norms, RoPE, softmax, SiLU, residual adds and the cross-entropy (O(T C) and O(T V) element-wise
    work) are not counted; nor is a causal kernel's work above the diagonal.
    """
    C, I, L = config.hidden_size, config.intermediate_size, config.num_hidden_layers
    H, Hkv, V = config.num_attention_heads, config.num_key_value_heads, config.vocab_size
    D = getattr(config, "head_dim", None) or C // H
    per_token = L * (2 * C * H * D + 2 * C * Hkv * D + 3 * C * I) + C * V  # weights one token multiplies
    attention = L * 2 * T * T * H * D  # = L * 2 * 2 (T^2 / 2) H D, exact in integers
    return 2 * T * per_token + attention


def matmul_gflops(dtype: torch.dtype, n: int, tries: int) -> float:
    """The best of ``tries`` timings of one ``[n, n] @ [n, n]`` matmul in ``dtype``, as GFLOP/s."""
    a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
    out = torch.empty(n, n, dtype=dtype)
    torch.mm(a, b, out=out)  # warm-up: thread pool, oneDNN kernel selection
    best = math.inf
    for _ in range(tries):
        start = time.perf_counter()
        torch.mm(a, b, out=out)
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best / 1e9


def check_matmul_ms() -> float:
    """A short float32 matmul (best of 5, ms): timed at the start and the end to see the machine's load change."""
    return 2 * 512**3 / matmul_gflops(torch.float32, 512, 5) / 1e6


def cpu_features() -> dict[str, bool]:
    """AVX-512, AVX512_BF16 and AMX from /proc/cpuinfo's flags (all False where it is unreadable)."""
    try:
        flags = next((ln.split(":", 1)[1].split() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                      if ln.startswith("flags")), [])
    except OSError:
        flags = []
    return {name: name in flags for name in ("avx512f", "avx512_bf16", "amx_tile", "amx_bf16", "amx_int8")}


def busy_warning(threads: int) -> str | None:
    """A warning when the 1-minute load average leaves fewer than ``threads`` cores free (None if it does not)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    load = os.getloadavg()[0]
    if load > cores - threads + 0.5:
        return (f"machine busy: 1-minute load average {load:.2f} on {cores} cores leaves fewer than {threads} "
                "free; timings will be slow and noisy")
    return None


def window_tokens(tokenizer, lengths: list[int]) -> torch.Tensor:
    """The packaged text's tokens, long ``[N]``, at least ``max(lengths)`` of them."""
    from ropekit.eval.text import encode_text, load_text

    ids = encode_text(tokenizer, load_text(None))
    if len(ids) < max(lengths):
        raise ValueError(f"the packaged text has only {len(ids)} tokens, fewer than {max(lengths)}")
    return ids


# ---- the engines: each returns (nll [T-1] float64, seconds) for one window -------------------------


class RunnerEngine:
    """ropekit or transformers through ``load_runner``: times ``runner.window_nll``."""

    def __init__(self, model: str, backend: str, dtype: torch.dtype):
        from ropekit.eval.runners import load_runner

        if backend == "transformers":
            from transformers.utils import logging

            logging.disable_progress_bar()  # its GGUF conversion bar, on every load
        self.runner = load_runner(model, backend=backend, dtype=dtype)
        self.config = self.runner.config

    def window(self, ids: torch.Tensor) -> tuple[torch.Tensor, float]:
        start = time.perf_counter()
        nll = self.runner.window_nll(ids)
        return nll, time.perf_counter() - start

    def close(self) -> None:
        del self.runner


class LlamaCppEngine:
    """llama.cpp through llama-cpp-python: one context of n_ctx = T per window length, logits for every token."""

    def __init__(self, path: Path, threads: int, batch: int, flash_attn: bool):
        import llama_cpp

        self.llama_cpp, self.path, self.threads = llama_cpp, path, threads
        self.batch, self.flash_attn = batch, flash_attn
        self.llm, self.n_ctx = None, 0
        self._open(batch)
        meta = self.llm.metadata
        arch = meta["general.architecture"]
        heads = int(meta[f"{arch}.attention.head_count"])
        hidden = int(meta[f"{arch}.embedding_length"])
        self.config = SimpleNamespace(  # prefill_flops' fields, from the file llama.cpp reads
            hidden_size=hidden, intermediate_size=int(meta[f"{arch}.feed_forward_length"]),
            num_hidden_layers=int(meta[f"{arch}.block_count"]), num_attention_heads=heads,
            num_key_value_heads=int(meta.get(f"{arch}.attention.head_count_kv", heads)),
            head_dim=int(meta.get(f"{arch}.attention.key_length", hidden // heads)), vocab_size=self.llm.n_vocab())

    def _open(self, n_ctx: int) -> None:
        if self.llm is not None and self.n_ctx >= n_ctx:
            return
        if self.llm is not None:
            self.llm.close()
        # logits_all=False: llama-cpp-python would otherwise allocate an n_ctx x V float32 array of its own;
        # every batch below asks llama.cpp for the logits of all its tokens itself.
        self.llm = self.llama_cpp.Llama(str(self.path), n_ctx=n_ctx, n_batch=self.batch, n_ubatch=self.batch,
                                        n_threads=self.threads, n_threads_batch=self.threads, logits_all=False,
                                        flash_attn=self.flash_attn, verbose=False)
        self.n_ctx = n_ctx

    def window(self, ids: torch.Tensor) -> tuple[torch.Tensor, float]:
        import numpy as np

        T = ids.numel()
        self._open(T)  # outside the timing: opening maps the weights and allocates the KV cache
        llm, tokens, vocab = self.llm, ids.tolist(), self.llm.n_vocab()
        llm._ctx.kv_cache_clear()
        nll = torch.empty(T - 1, dtype=torch.float64)
        start = time.perf_counter()
        for i in range(0, T, self.batch):
            part = tokens[i:i + self.batch]
            llm._batch.set_batch(batch=part, n_past=i, logits_all=True)
            llm._ctx.decode(llm._batch)
            rows = min(len(part), T - 1 - i)  # row r predicts token i + r + 1; the window's last has no target
            if rows > 0:
                logits = torch.from_numpy(np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(len(part), vocab)))
                nll[i:i + rows] = F.cross_entropy(logits[:rows], ids[i + 1:i + 1 + rows], reduction="none").double()
        return nll, time.perf_counter() - start

    def close(self) -> None:
        self.llm.close()


def open_engine(name: str, model: str, path: Path, args):
    """The engine behind one row name, or None (with a printed note) when llama_cpp is not importable."""
    if name == "llama.cpp":
        try:
            import llama_cpp  # noqa: F401
        except ImportError as err:
            print(f"note: llama.cpp row skipped: llama_cpp is not importable ({err}); "
                  "pip install 'ropekit[llama]'", file=sys.stderr)
            return None
        return LlamaCppEngine(path, args.threads, args.llama_batch, args.llama_flash_attn)
    backend, dtype = name.split("-")
    return RunnerEngine(model, backend, DTYPES[dtype])


def time_engine(name: str, engine, ids: torch.Tensor, lengths: list[int], repeats: int,
                single_above: int) -> list[dict]:
    """One row per length: median seconds of ``repeats`` runs (one run above ``single_above``)."""
    engine.window(ids[:min(lengths)])  # warm-up: thread pools, allocator, first-call paths
    rows = []
    for T in lengths:
        window = ids[:T]
        runs, nll = [], None
        for _ in range(repeats if T <= single_above else 1):
            nll, seconds = engine.window(window)
            runs.append(seconds)
        seconds = statistics.median(runs)
        flops = prefill_flops(engine.config, T)
        row = {"engine": name, "tokens": T, "seconds": seconds, "runs": runs, "tok_s": T / seconds,
               "gflop": flops / 1e9, "gflop_s": flops / seconds / 1e9, "ppl": math.exp(float(nll.mean()))}
        print(f"  {name} T={T}: {seconds:.2f} s, {row['tok_s']:.0f} tok/s, {row['gflop_s']:.1f} GFLOP/s, "
              f"ppl {row['ppl']:.4f}", file=sys.stderr)
        rows.append(row)
    return rows


def reference_rows(name: str) -> tuple[str, str]:
    """(the float32 row of the same backend, the transformers row in the same dtype) for row ``name``;
    llama.cpp (integer dot products over Q4_1 weights) is compared with transformers float32 for both."""
    if "-" not in name:
        return "transformers-fp32", "transformers-fp32"
    backend, dtype = name.rsplit("-", 1)
    return f"{backend}-fp32", f"transformers-{dtype}"


def compare(rows: list[dict], peaks: dict[str, float]) -> None:
    """Add ``peak_ratio``, ``ppl_vs_fp32``, ``ppl_vs_transformers`` and ``speedup_vs_transformers`` to each
    row, in place (None where the reference row was not run)."""
    by = {(r["engine"], r["tokens"]): r for r in rows}
    for r in rows:
        dtype = r["engine"].rsplit("-", 1)[1] if "-" in r["engine"] else None
        r["peak_ratio"] = r["gflop_s"] / peaks[dtype] if dtype in peaks else None
        fp32, hf = (by.get((name, r["tokens"])) for name in reference_rows(r["engine"]))
        r["ppl_vs_fp32"] = r["ppl"] / fp32["ppl"] - 1 if fp32 else None
        r["ppl_vs_transformers"] = r["ppl"] / hf["ppl"] - 1 if hf else None
        r["speedup_vs_transformers"] = hf["seconds"] / r["seconds"] if hf else None


def ppl_warnings(rows: list[dict], tolerance: float = 1e-3) -> list[str]:
    """Perplexities that disagree by more than ``tolerance`` (relative): ropekit float32 with transformers
    float32 (the same maths on the same weights), and each bfloat16 row with its own float32 row."""
    out = []
    for r in rows:
        checks = [("transformers-fp32", r["ppl_vs_transformers"])] if r["engine"] == "ropekit-fp32" else []
        if r["engine"].endswith("-bf16"):
            checks.append((reference_rows(r["engine"])[0], r["ppl_vs_fp32"]))
        out += [f"{r['engine']} T={r['tokens']}: ppl {r['ppl']:.4f} is {diff:+.3%} from {name}'s "
                f"(more than {tolerance:.1%})" for name, diff in checks if diff is not None and abs(diff) > tolerance]
    return out


def fmt(value: float | None, spec: str, scale: float = 1.0) -> str:
    return "-" if value is None else format(value * scale, spec)


def print_table(report: dict) -> None:
    peaks = ", ".join(f"{k} {v:.0f}" for k, v in report["peak_gflop_s"].items()) or "not measured"
    print(f"{report['cpu']}; {report['threads']} threads; torch {report['torch']}; matmul peak GFLOP/s "
          f"({report['peak_size']}^3, best of {report['peak_tries']}): {peaks}")
    features = {"AVX-512": "avx512f", "AVX512_BF16": "avx512_bf16", "AMX-BF16": "amx_bf16"}
    print(", ".join(f"{label} {'yes' if report['cpu_features'][flag] else 'no'}" for label, flag in features.items())
          + "; OpenMP: " + (" ".join(f"{k}={v}" for k, v in report["omp_env"].items() if v) or "defaults"))
    print(f"median of {report['repeats']} up to T={report['single_above']}, one run above; "
          f"load average at start {report['load_average_start'][0]:.2f}")
    header = (f"{'engine':<19}{'T':>7}{'seconds':>10}{'tok/s':>9}{'GFLOP/s':>9}{'% peak':>8}"
              f"{'ppl':>10}{'vs fp32':>10}{'vs HF':>10}{'x HF':>7}")
    print(header)
    print("-" * len(header))
    for r in report["rows"]:
        print(f"{r['engine']:<19}{r['tokens']:>7}{r['seconds']:>10.2f}{r['tok_s']:>9.0f}{r['gflop_s']:>9.1f}"
              f"{fmt(r['peak_ratio'], '.1f', 100):>8}{r['ppl']:>10.4f}{fmt(r['ppl_vs_fp32'], '+.3%'):>10}"
              f"{fmt(r['ppl_vs_transformers'], '+.3%'):>10}"
              f"{fmt(r['speedup_vs_transformers'], '.2f'):>7}")
    for line in report["warnings"]:
        print(f"warning: {line}")


def run(args) -> dict:
    from ropekit.loading import load_tokenizer, resolve_source

    torch.set_num_threads(args.threads)
    lengths = sorted(int(n) for n in args.lengths.split(","))
    engines = [e for e in args.engines.split(",") if e]
    unknown = sorted(set(engines) - set(ENGINES))
    if unknown:
        raise SystemExit(f"unknown engines {', '.join(unknown)}; choose from {', '.join(ENGINES)}")
    warnings = [w for w in [busy_warning(args.threads)] if w]
    load_start = os.getloadavg()
    for line in warnings:
        print(f"warning: {line}", file=sys.stderr)
    check_start = check_matmul_ms()
    dtypes = {e.rsplit("-", 1)[1] for e in engines if "-" in e}
    peaks = {d: matmul_gflops(DTYPES[d], args.peak_size, args.peak_tries) for d in DTYPES if d in dtypes}
    print(f"matmul peak GFLOP/s: {peaks}", file=sys.stderr)

    path = resolve_source(args.model)
    ids = window_tokens(load_tokenizer(args.model), lengths)
    rows: list[dict] = []
    for name in engines:
        engine = open_engine(name, args.model, path, args)
        if engine is None:
            continue
        rows += time_engine(name, engine, ids, lengths, args.repeats, args.single_above)
        engine.close()
        del engine
    compare(rows, peaks)
    warnings += ppl_warnings(rows)
    check_end = check_matmul_ms()
    if abs(check_end / check_start - 1) > 0.15:
        warnings.append(f"machine load changed during the run: a 512^3 matmul took {check_start:.2f} ms at the "
                        f"start and {check_end:.2f} ms at the end")
    versions = {"torch": torch.__version__}
    for module in ("transformers", "llama_cpp"):
        try:
            versions[module] = __import__(module).__version__
        except ImportError:
            versions[module] = None
    return {"model": str(path), "threads": args.threads, "lengths": lengths, "repeats": args.repeats,
            "single_above": args.single_above, **versions, "cpu": cpu_model(), "cpu_features": cpu_features(),
            "machine": platform.machine(), "load_average_start": load_start, "omp_env": {
                k: os.environ.get(k) for k in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY", "OMP_PROC_BIND")},
            "peak_size": args.peak_size, "peak_tries": args.peak_tries, "peak_gflop_s": peaks,
            "check_matmul_ms": [check_start, check_end], "llama_batch": args.llama_batch,
            "llama_flash_attn": args.llama_flash_attn,
            "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "warnings": warnings, "rows": rows}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=DEFAULTS["model"])
    parser.add_argument("--lengths", default=DEFAULTS["lengths"], help="comma-separated window lengths")
    parser.add_argument("--repeats", type=int, default=DEFAULTS["repeats"])
    parser.add_argument("--single-above", type=int, default=DEFAULTS["single_above"],
                        help="lengths above this are timed once (after the warm-up)")
    parser.add_argument("--threads", type=int, default=DEFAULTS["threads"], help="torch and llama.cpp threads")
    parser.add_argument("--engines", default=",".join(ENGINES), help="comma-separated subset of the rows")
    parser.add_argument("--peak-size", type=int, default=DEFAULTS["peak_size"], help="n of the n^3 peak matmul")
    parser.add_argument("--peak-tries", type=int, default=DEFAULTS["peak_tries"])
    parser.add_argument("--llama-batch", type=int, default=DEFAULTS["llama_batch"], help="llama.cpp n_batch")
    parser.add_argument("--llama-flash-attn", action="store_true", help="llama.cpp with flash attention")
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    args = parser.parse_args(argv)
    report = run(args)
    print_table(report)
    write_json(report, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
