"""Prefill and decode speed of ropekit's LLaMA vs transformers, same GGUF weights, same dtype, same run.

    python benchmarks/bench_generate.py [--model smollm2] [--prompt-tokens 1000] [--new-tokens 128]
                                        [--repeats 3] [--threads 2] [--out results/bench_generate.json]

Prefill: one forward pass over the prompt with a fresh cache, logits for the last position only
(what generation does). Decode: greedy generation of ``--new-tokens`` after that prompt, timed from
the first new token to the last (so it excludes the prefill), through each library's own
generation path (``ropekit.model.generate.generate_ids`` / ``transformers`` ``generate``).
Medians over ``--repeats`` runs after one warm-up. "weights GB/s" is the parameter bytes read per
decoded token times tokens/s, a lower bound on memory traffic.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import sys
import time
from pathlib import Path

import torch

DEFAULTS = dict(model="smollm2", prompt_tokens=1000, new_tokens=128, repeats=3, threads=2)


def prompt_ids(tokenizer, n: int) -> list[int]:
    """The first ``n`` tokens of the shipped evaluation text."""
    from ropekit.data import DEFAULT_TEXT

    ids = tokenizer.encode(Path(DEFAULT_TEXT).read_text(encoding="utf-8"))
    if len(ids) < n:
        raise ValueError(f"the evaluation text has only {len(ids)} tokens, fewer than {n}")
    return ids[:n]


class _Timestamps:
    """A transformers streamer that records when each new token arrives (the first put is the prompt)."""

    def __init__(self):
        self.times: list[float] = []

    def put(self, value):
        self.times.append(time.perf_counter())

    def end(self):
        pass


def time_ropekit(model, ids: list[int], new_tokens: int, fast: bool = True) -> tuple[float, float]:
    """(prefill seconds, decode seconds for new_tokens - 1 steps) for ropekit's ``generate_ids``:
    ``fast`` (the default path) runs decode steps through the fused C++ kernels, else as torch ops."""
    from ropekit.model.generate import generate_ids

    x = torch.tensor([ids])
    with torch.inference_mode():
        cache = model.new_cache(1, len(ids))
        start = time.perf_counter()
        model(x, cache=cache, logits_to_keep=1)
        prefill = time.perf_counter() - start
    stamps = [time.perf_counter() for _ in generate_ids(model, [ids], max_new_tokens=new_tokens, fast=fast)]
    return prefill, stamps[-1] - stamps[0]


def time_torch_ops(model, ids: list[int], new_tokens: int) -> tuple[float, float]:
    return time_ropekit(model, ids, new_tokens, fast=False)


def time_transformers(hf, ids: list[int], new_tokens: int) -> tuple[float, float]:
    """(prefill seconds, decode seconds for new_tokens - 1 steps) for transformers."""
    from transformers import DynamicCache

    x = torch.tensor([ids])
    with torch.inference_mode():
        start = time.perf_counter()
        hf(x, past_key_values=DynamicCache(config=hf.config), use_cache=True, logits_to_keep=1)
        prefill = time.perf_counter() - start
        streamer = _Timestamps()
        hf.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=new_tokens,
                    min_new_tokens=new_tokens, do_sample=False, streamer=streamer)
    stamps = streamer.times[1:]  # drop the prompt's put
    return prefill, stamps[-1] - stamps[0]


def measure(name: str, timer, engine, ids: list[int], new_tokens: int, repeats: int,
            weight_bytes: int) -> dict:
    timer(engine, ids[:64], 4)  # warm-up: thread pools, allocator, first-call paths
    runs = [timer(engine, ids, new_tokens) for _ in range(repeats)]
    prefill = statistics.median(r[0] for r in runs)
    decode = statistics.median(r[1] for r in runs)
    decode_tok_s = (new_tokens - 1) / decode
    result = {"prefill_s": prefill, "prefill_tok_s": len(ids) / prefill, "decode_s": decode,
              "decode_tok_s": decode_tok_s, "weights_gb_s": weight_bytes * decode_tok_s / 1e9,
              "runs": [{"prefill_s": p, "decode_s": d} for p, d in runs]}
    print(f"  {name}: prefill {result['prefill_tok_s']:.0f} tok/s, decode {decode_tok_s:.1f} tok/s",
          file=sys.stderr)
    return result


def load_transformers(path: Path):
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
    return hf.eval()


def write_json(report: dict, path: Path | None) -> None:
    """Write the report as JSON to ``path`` (nothing when None)."""
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(report, indent=2))


def print_table(report: dict) -> None:
    header = f"{'engine':<20}{'prefill tok/s':>15}{'decode tok/s':>15}{'weights GB/s':>15}"
    print(f"{report['cpu']}; prompt {report['prompt_tokens']} tokens, {report['new_tokens']} new tokens, "
          f"{report['threads']} threads, median of {report['repeats']}")
    print(header)
    print("-" * len(header))
    for name, r in report["results"].items():
        print(f"{name:<20}{r['prefill_tok_s']:>15.0f}{r['decode_tok_s']:>15.1f}{r['weights_gb_s']:>15.2f}")


def cpu_model() -> str:
    """The CPU's model name and the matrix features that matter here (AVX-512 BF16, AMX)."""
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or platform.machine()
    name = next((ln.split(":", 1)[1].strip() for ln in info.splitlines() if ln.startswith("model name")), "?")
    flags = next((ln.split(":", 1)[1].split() for ln in info.splitlines() if ln.startswith("flags")), [])
    features = [f for f in ("avx512f", "avx512_bf16", "amx_bf16") if f in flags]
    return f"{name} ({', '.join(features) or 'no AVX-512'})"


ENGINES = ("ropekit", "ropekit-torch-ops", "ropekit-bf16", "transformers")


def run(model: str, prompt_tokens: int, new_tokens: int, repeats: int, threads: int,
        engines: tuple[str, ...] = ENGINES) -> dict:
    """ropekit (float32, decode through the fused kernels: the default), ropekit-torch-ops (the same model
    with its decode steps as torch ops), ropekit-bf16 (bfloat16 weights), transformers (float32)."""
    from ropekit.loading import load_model, resolve_source

    torch.set_num_threads(threads)
    path = resolve_source(model)
    ours, tokenizer = load_model(path, dtype=torch.float32)
    ids = prompt_ids(tokenizer, prompt_tokens)
    weight_bytes = sum(p.numel() * p.element_size() for p in ours.parameters())
    results = {}
    for name, timer in (("ropekit", time_ropekit), ("ropekit-torch-ops", time_torch_ops)):
        if name in engines:
            results[name] = measure(name, timer, ours, ids, new_tokens, repeats, weight_bytes)
    del ours
    if "ropekit-bf16" in engines:
        bf16, _ = load_model(path, dtype=torch.bfloat16)
        results["ropekit-bf16"] = measure("ropekit-bf16", time_ropekit, bf16, ids, new_tokens, repeats,
                                          weight_bytes // 2)
        del bf16
    if "transformers" in engines:
        hf = load_transformers(path)
        results["transformers"] = measure("transformers", time_transformers, hf, ids, new_tokens, repeats,
                                          weight_bytes)
    return {"model": str(path), "dtype": "float32", "threads": threads, "prompt_tokens": prompt_tokens,
            "new_tokens": new_tokens, "repeats": repeats, "torch": torch.__version__,
            "machine": platform.processor() or platform.machine(), "cpu": cpu_model(),
            "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "results": results}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=DEFAULTS["model"])
    parser.add_argument("--prompt-tokens", type=int, default=DEFAULTS["prompt_tokens"])
    parser.add_argument("--new-tokens", type=int, default=DEFAULTS["new_tokens"])
    parser.add_argument("--repeats", type=int, default=DEFAULTS["repeats"])
    parser.add_argument("--threads", type=int, default=DEFAULTS["threads"])
    parser.add_argument("--engines", default=",".join(ENGINES), help="comma-separated subset")
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    args = parser.parse_args(argv)
    report = run(args.model, args.prompt_tokens, args.new_tokens, args.repeats, args.threads,
                 tuple(args.engines.split(",")))
    print_table(report)
    write_json(report, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
