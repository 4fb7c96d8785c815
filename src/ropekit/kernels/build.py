"""Build the C++ CPU rotary kernel once, just in time, into a cache directory.

``python -m ropekit.kernels.build`` builds it ahead of time (CI runs this before the tests).
The cache lives in ``$ROPEKIT_CACHE`` (default ``~/.cache/ropekit/ext``), one folder per
(source, torch version, compiler flags, CPU features): the code is compiled with
``-march=native``, so a cache shared between different CPUs gets one build per CPU kind.
"""

from __future__ import annotations

import hashlib
import os
import platform
import sys
import warnings
from pathlib import Path
from types import ModuleType

import torch

SOURCE = Path(__file__).parent / "csrc" / "rope_cpu.cpp"
CACHE_ENV = "ROPEKIT_CACHE"
# -ffp-contract=off keeps a*c - b*s as two rounded products (no FMA), as torch's eager
# reference computes it: float32 results then agree bit for bit. -fopenmp makes
# at::parallel_for use torch's OpenMP thread pool (the same libgomp, by soname).
CFLAGS = ["-O3", "-march=native", "-ffp-contract=off", "-fopenmp"]
LDFLAGS = ["-fopenmp"]

def _cpu_signature() -> str:
    """Model name and feature flags of this CPU: a -march=native binary is only valid on its kind."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        wanted = [ln for ln in lines if ln.startswith(("model name", "flags"))][:2]
        return "\n".join(wanted)
    except OSError:
        return platform.processor() or platform.machine()


class JitExtension:
    """One C++ source compiled just in time into the shared cache, loaded once per process."""

    def __init__(self, name: str, source: Path, what: str):
        self.name, self.source, self.what = name, source, what
        self.module: ModuleType | None = None
        self.error: str | None = None

    def cache_dir(self) -> Path:
        """Where this build lives: keyed by source, torch, Python, flags and CPU."""
        root = Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "ropekit" / "ext")
        key = hashlib.sha256("\n".join([self.source.read_text(), torch.__version__, sys.version, " ".join(CFLAGS),
                                        _cpu_signature()]).encode()).hexdigest()[:16]
        return root / f"{self.source.stem}_{key}"

    def build(self, verbose: bool = False) -> ModuleType:
        """Compile (first call) or load (later calls); raises if the compiler fails."""
        if self.module is None:
            from torch.utils.cpp_extension import load

            build_dir = self.cache_dir()
            build_dir.mkdir(parents=True, exist_ok=True)
            if not any(build_dir.glob("*.so")):
                print(f"ropekit: compiling the {self.what} once into {build_dir} (about a minute)...",
                      file=sys.stderr, flush=True)
            self.module = load(name=self.name, sources=[str(self.source)], extra_cflags=CFLAGS,
                               extra_ldflags=LDFLAGS, build_directory=str(build_dir), verbose=verbose)
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
    """Build ahead of time and say where."""
    build_cpu_extension(verbose="-v" in sys.argv)
    print(f"ropekit C++ rotary kernel ready in {ROPE_EXTENSION.cache_dir()}")


if __name__ == "__main__":
    main()
