"""Evaluation text: the packaged *Pride and Prejudice* by default, or any UTF-8 text file."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import torch

from ropekit.defaults import DEFAULT_TEXT_NAME, default_text_path


def load_text(path: str | os.PathLike | None = None) -> str:
    """The text at ``path`` (default: the packaged book). Raises FileNotFoundError / ValueError."""
    path = Path(path) if path is not None else default_text_path()
    if not path.exists():
        raise FileNotFoundError(f"text file not found: {path}")
    if not path.is_file():  # a folder, a FIFO, a device such as /dev/zero (which would never end)
        raise ValueError(f"--text {path} is not a regular file ({_kind(path)}); give a UTF-8 text file")
    text = path.read_text(encoding="utf-8", errors="replace")
    if not text.strip():
        raise ValueError(f"text file is empty: {path}")
    return text


def _kind(path: Path) -> str:
    """What a path that is not a regular file is, in a word or two."""
    if path.is_dir():
        return "a folder"
    if path.is_fifo():
        return "a pipe"
    if path.is_char_device() or path.is_block_device():
        return "a device"
    if path.is_socket():
        return "a socket"
    return "not a plain file"


def encode_text(tokenizer, text: str) -> torch.Tensor:
    """The whole text as token ids, long ``[N]`` (no BOS: the text is scored as a continuous stream)."""
    return torch.tensor(tokenizer.encode(text), dtype=torch.long)


def load_tokens(tokenizer, path: str | os.PathLike | None = None) -> torch.Tensor:
    """The text at ``path`` (default: the packaged book) as token ids, long ``[N]``."""
    return encode_text(tokenizer, load_text(path))


def text_name(path: str | os.PathLike | None) -> str:
    return Path(path).name if path is not None else DEFAULT_TEXT_NAME


def text_sha256(text: str) -> str:
    """The first 16 hex digits of the text's SHA-256: identifies it in result records (names can collide)."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]
