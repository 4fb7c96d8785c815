"""Evaluation text: the packaged *Pride and Prejudice* by default, or any UTF-8 text file."""

from __future__ import annotations

import os
from importlib import resources
from pathlib import Path

import torch

DEFAULT_TEXT = "pride-and-prejudice.txt"


def default_text_path() -> Path:
    """The copy of *Pride and Prejudice* shipped inside the package (``ropekit/data``)."""
    return Path(str(resources.files("ropekit") / "data" / DEFAULT_TEXT))


def load_text(path: str | os.PathLike | None = None) -> str:
    """The text at ``path`` (default: the packaged book). Raises FileNotFoundError / ValueError."""
    path = Path(path) if path is not None else default_text_path()
    if not path.is_file():
        raise FileNotFoundError(f"text file not found: {path}")
    text = path.read_text(encoding="utf-8", errors="replace")
    if not text.strip():
        raise ValueError(f"text file is empty: {path}")
    return text


def load_tokens(tokenizer, path: str | os.PathLike | None = None) -> torch.Tensor:
    """The whole text as token ids, long ``[N]`` (no BOS: the text is scored as a continuous stream)."""
    return torch.tensor(tokenizer.encode(load_text(path)), dtype=torch.long)


def text_name(path: str | os.PathLike | None) -> str:
    return Path(path).name if path is not None else DEFAULT_TEXT
