"""Defaults every layer shares, defined once: the default model, the default text, the cache folder."""

from __future__ import annotations

import os
from importlib import resources
from pathlib import Path

DEFAULT_MODEL = "smollm2"  # SmolLM2-135M-Instruct, see ropekit.loading.default_model
DEFAULT_TEXT_NAME = "pride-and-prejudice.txt"  # shipped in ropekit/data
CACHE_ENV = "ROPEKIT_CACHE"


def default_text_path() -> Path:
    """The copy of *Pride and Prejudice* shipped inside the package (``ropekit/data``)."""
    return Path(str(resources.files("ropekit") / "data" / DEFAULT_TEXT_NAME))


def cache_dir() -> Path:
    """ropekit's per-user cache: ``$ROPEKIT_CACHE``, else ``~/.cache/ropekit`` (models, compiled kernels)."""
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "ropekit")
