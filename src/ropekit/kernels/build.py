"""Build the C++ CPU kernels once, just in time, into a cache directory.

``python -m ropekit.kernels.build`` builds them ahead of time. The cache lives in
``$ROPEKIT_CACHE/ext`` (default ``~/.cache/ropekit/ext``), one folder per (source, torch
version, Python, compiler flags, compiler, CPU features): the code is compiled with
``-march=native``, so a cache shared between different CPUs gets one build per CPU kind.

Builds are serialised by an ``flock`` on ``<folder>.lock`` (the kernel releases it when a
process dies, so a killed build never wedges the next one); while it is held, a leftover lock
file of torch's own builder in that folder can only be stale and is removed. A second process
that wants the same build waits for the first and then loads its result.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import warnings
from pathlib import Path
from types import ModuleType

import torch

from ropekit.defaults import cache_dir

SOURCE = Path(__file__).parent / "csrc" / "rope_cpu.cpp"
# -ffp-contract=off keeps a*c - b*s as two rounded products (no FMA), as torch's eager
# reference computes it: float32 results then agree bit for bit. -fopenmp makes
# at::parallel_for use torch's OpenMP thread pool (the same libgomp, by soname).
CFLAGS = ("-O3", "-march=native", "-ffp-contract=off", "-fopenmp")
LDFLAGS = ("-fopenmp",)


def _cpu_signature() -> str:
    """Model name and feature flags of this CPU: a -march=native binary is only valid on its kind."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        wanted = [ln for ln in lines if ln.startswith(("model name", "flags"))][:2]
        return "\n".join(wanted)
    except OSError:
        return platform.processor() or platform.machine()


def _compiler_signature() -> str:
    """The first line of ``c++ --version`` (another compiler makes another binary)."""
    compiler = os.environ.get("CXX") or shutil.which("c++") or "c++"
    try:
        result = subprocess.run([compiler, "--version"], capture_output=True, text=True, timeout=30)
        return f"{compiler}: {result.stdout.splitlines()[0] if result.stdout else result.returncode}"
    except (OSError, subprocess.SubprocessError) as err:
        return f"{compiler}: {type(err).__name__}"


def cache_root() -> Path:
    """``$ROPEKIT_CACHE/ext``, else ``~/.cache/ropekit/ext``."""
    return cache_dir() / "ext"


class JitExtension:
    """One C++ source compiled just in time into the shared cache, loaded once per process."""

    def __init__(self, name: str, source: Path, what: str):
        self.name, self.source, self.what = name, source, what
        self.module: ModuleType | None = None
        self.error: str | None = None

    def cache_key(self) -> str:
        """Everything that changes the binary: source, torch, Python, flags, compiler, CPU."""
        parts = [self.source.read_text(), torch.__version__, sys.version, " ".join(CFLAGS), " ".join(LDFLAGS),
                 _compiler_signature(), _cpu_signature()]
        return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]

    def cache_dir(self) -> Path:
        """Where this build lives."""
        return cache_root() / f"{self.source.stem}_{self.cache_key()}"

    def build(self, verbose: bool = False) -> ModuleType:
        """Compile (first call) or load (later calls); raises if the compiler fails."""
        if self.module is None:
            from torch.utils.cpp_extension import load

            build_dir = self.cache_dir()
            build_dir.mkdir(parents=True, exist_ok=True)
            with open(build_dir.with_name(build_dir.name + ".lock"), "w") as lock:
                fcntl.flock(lock, fcntl.LOCK_EX)  # one builder at a time; released if this process dies
                stale = build_dir / "lock"  # torch's FileBaton: nobody else can hold it while we hold ours
                stale.unlink(missing_ok=True)
                if not any(build_dir.glob("*.so")):
                    print(f"ropekit: compiling the {self.what} once into {build_dir} (about a minute)...",
                          file=sys.stderr, flush=True)
                # torch appends to the lists it is given: pass fresh copies, never shared state
                self.module = load(name=self.name, sources=[str(self.source)], extra_cflags=list(CFLAGS),
                                   extra_ldflags=list(LDFLAGS), build_directory=str(build_dir), verbose=verbose)
        return self.module

    def get(self) -> ModuleType | None:
        """The module, or None (with one warning) when it cannot be built here."""
        if self.module is None and self.error is None:
            try:
                self.build()
            except Exception as exc:  # a compiler, ninja or header problem: callers fall back to torch
                self.error = f"{type(exc).__name__}: {exc}"
                warnings.warn(f"ropekit: the {self.what} could not be built, using torch ({self.error[:500]})",
                              RuntimeWarning, stacklevel=3)
        return self.module


ROPE_EXTENSION = JitExtension("ropekit_rope_cpu", SOURCE, "C++ rotary kernel")


def build_cpu_extension(verbose: bool = False) -> ModuleType:
    """Compile or load the C++ rotary kernel; raises if the compiler fails."""
    return ROPE_EXTENSION.build(verbose)


def cpu_extension() -> ModuleType | None:
    """The rotary kernel module, or None (with one warning) when it cannot be built here."""
    return ROPE_EXTENSION.get()


def main() -> None:
    """Build every C++ kernel ahead of time and say where."""
    from ropekit.kernels.decode import GEMV_EXTENSION

    for extension in (ROPE_EXTENSION, GEMV_EXTENSION):
        extension.build(verbose="-v" in sys.argv)
        print(f"ropekit {extension.what} ready in {extension.cache_dir()}")


if __name__ == "__main__":
    main()
