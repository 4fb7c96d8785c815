"""How much memory this process may still allocate, and a check that refuses a request before it allocates.

A size-like argument (new tokens, a window length, a cache capacity) turns into a few large
tensors; ``check_fits`` compares their estimated size with what the machine can give and raises a
``ValueError`` naming the argument, the estimate and the limit, instead of letting the allocator
fail deep in torch (or the machine swap). The estimates are lower bounds: a request refused here
could never have run.

The limit is the smallest of: ``MemAvailable`` in ``/proc/meminfo``, the cgroup v2 limit minus its
current use, and the address-space limit (``ulimit -v``) minus this process's current size.
``ROPEKIT_MEMORY_BYTES`` replaces it (tests, or a deliberate cap); where none is known there is
no check.
"""

from __future__ import annotations

import os
import resource
from pathlib import Path

MEMORY_ENV = "ROPEKIT_MEMORY_BYTES"


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
