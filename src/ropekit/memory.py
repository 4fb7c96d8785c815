"""Memory: what a request needs, what the machine can give, and what a run used.

Three parts, each usable alone:

- **Estimates** (``kv_cache_bytes``, ``forward_bytes``, ``request_bytes``): lower bounds on the
  memory a request needs, from a model's shape. They count only tensors that must exist at once,
  so a request they refuse could never run.
- **The limit and the check** (``available_memory``, ``check_fits``, ``format_bytes``): a size-like
  argument (new tokens, a window length, a cache capacity) turns into a few large tensors;
  ``check_fits`` compares their estimated size with what the machine can give and raises a
  ``ValueError`` naming the argument, the estimate and the limit, instead of letting the allocator
  fail deep in torch (or the machine swap). The limit is the smallest of: ``MemAvailable`` in
  ``/proc/meminfo``, the cgroup v2 limit minus its current use, and the address-space limit
  (``ulimit -v``) minus this process's current size. ``ROPEKIT_MEMORY_BYTES`` replaces it (tests,
  or a deliberate cap); where none is known there is no check.
- **Peak resident memory of a run** (``rss_mb``, ``PeakMemory``), sampled by a background thread.
  ``tracemalloc`` is far too slow for 16K-token forwards and misses torch's allocator; the
  process's resident set size (``/proc/self/statm``, or ``ru_maxrss`` elsewhere) is what a user
  sees. ``ru_maxrss`` alone is a lifetime maximum and cannot show a smaller second run, hence the
  sampler.
"""

from __future__ import annotations

import os
import resource
import sys
import threading
from pathlib import Path

import torch

MEMORY_ENV = "ROPEKIT_MEMORY_BYTES"

_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


# Estimates from a model's shape


def element_size(dtype: torch.dtype) -> int:
    """Bytes per element of ``dtype``."""
    return torch.empty((), dtype=dtype).element_size()


def kv_cache_bytes(num_layers: int, batch_size: int, num_kv_heads: int, head_dim: int, tokens: int,
                   dtype: torch.dtype) -> int:
    """Keys and values of ``tokens`` slots in every layer: ``2 * L * B * Hkv * tokens * D`` elements."""
    return 2 * num_layers * batch_size * num_kv_heads * tokens * head_dim * element_size(dtype)


def forward_bytes(hidden_size: int, intermediate_size: int, kv_dim: int, tokens: int, dtype: torch.dtype,
                  batch_size: int = 1) -> int:
    """One layer's live activations over ``tokens`` positions: hidden state and residual, q, k and v,
    the MLP's gate and up projections (``B * T * (3C + 2I + 2 kv_dim)`` elements)."""
    return batch_size * tokens * (3 * hidden_size + 2 * intermediate_size + 2 * kv_dim) * element_size(dtype)


def model_shape(config) -> dict[str, int]:
    """The sizes the estimates need, from a ``LlamaConfig`` or a transformers ``PretrainedConfig``."""
    hidden = int(config.hidden_size)
    heads = int(config.num_attention_heads)
    head_dim = int(getattr(config, "head_dim", None) or hidden // heads)
    kv_heads = int(getattr(config, "num_key_value_heads", None) or heads)
    intermediate = int(getattr(config, "intermediate_size", None) or 4 * hidden)
    return {"num_layers": int(config.num_hidden_layers), "hidden_size": hidden, "intermediate_size": intermediate,
            "num_kv_heads": kv_heads, "head_dim": head_dim}


def request_bytes(config, tokens: int, dtype: torch.dtype, *, batch_size: int = 1, cache: bool = True) -> int:
    """A forward pass over ``tokens`` positions, plus (``cache``) a KV cache holding them all."""
    s = model_shape(config)
    total = forward_bytes(s["hidden_size"], s["intermediate_size"], s["num_kv_heads"] * s["head_dim"], tokens,
                          dtype, batch_size)
    if cache:
        total += kv_cache_bytes(s["num_layers"], batch_size, s["num_kv_heads"], s["head_dim"], tokens, dtype)
    return total


# What this process may still allocate, and the check against it


def _meminfo_available() -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def _cgroup_available() -> int | None:
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        if limit == "max":
            return None
        return int(limit) - int(Path("/sys/fs/cgroup/memory.current").read_text().strip())
    except (OSError, ValueError):
        return None


def _address_space_available() -> int | None:
    soft, _ = resource.getrlimit(resource.RLIMIT_AS)
    if soft == resource.RLIM_INFINITY:
        return None
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmSize:"):
                return soft - int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def available_memory() -> int | None:
    """Bytes this process can still allocate (see the module docstring), or None where unknown."""
    override = os.environ.get(MEMORY_ENV)
    if override:
        try:
            value = int(float(override))
        except ValueError:
            raise ValueError(f"{MEMORY_ENV} must be a number of bytes, got {override!r}") from None
        if value <= 0:
            raise ValueError(f"{MEMORY_ENV} must be > 0, got {override!r}")
        return value
    known = [v for v in (_meminfo_available(), _cgroup_available(), _address_space_available()) if v is not None]
    return max(0, min(known)) if known else None


def format_bytes(n: float) -> str:
    """``1536 -> '1.5 KiB'``."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if abs(n) < 1024 or unit == "PiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def check_fits(what: str, needed_bytes: int, advice: str = "") -> None:
    """Raise ``ValueError`` if ``needed_bytes`` (the estimate for ``what``) exceeds the memory available.

    what: names the argument and the request, e.g. ``"--max-new-tokens 200000: a KV cache of 200005 tokens"``.
    advice: appended to the message, e.g. ``"at most ~90000 tokens fit"``.
    """
    available = available_memory()
    if available is None or needed_bytes <= available:
        return
    tail = f"; {advice}" if advice else ""
    raise ValueError(f"{what} needs about {format_bytes(needed_bytes)}, more than the {format_bytes(available)} of "
                     f"memory available{tail}")


# Peak resident memory of a run


def rss_mb() -> float:
    """Current resident set size in MiB (the lifetime peak where /proc is unavailable)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * _PAGE / 2**20
    except OSError:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak / 2**20 if sys.platform == "darwin" else peak / 1024


class PeakMemory:
    """``with PeakMemory() as mem: ...`` then ``mem.peak_mb`` (peak RSS during the block, MiB)
    and ``mem.delta_mb`` (peak minus the RSS at entry)."""

    def __init__(self, interval: float = 0.02):
        self.interval = interval
        self.start_mb = self.peak_mb = 0.0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _sample(self) -> None:
        while not self._stop.wait(self.interval):
            self.peak_mb = max(self.peak_mb, rss_mb())

    def __enter__(self) -> PeakMemory:
        self.start_mb = self.peak_mb = rss_mb()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.peak_mb = max(self.peak_mb, rss_mb())

    @property
    def delta_mb(self) -> float:
        return self.peak_mb - self.start_mb
