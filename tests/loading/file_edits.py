"""Edited copies of the tiny model's files: a GGUF with metadata changed or deleted, an HF folder with files
replaced, a config.json with keys changed."""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

from test_hostile_files import GGUFParts, write_parts


def edited_gguf(tmp_path, parts: GGUFParts, *, delete=(), name="edited.gguf", **changes) -> Path:
    """The tiny GGUF with metadata ``changes`` (``key__with__dots=(types, value)``) and keys deleted."""
    parts = copy.deepcopy(parts)
    for key, (types, value) in changes.items():
        parts.set(key.replace("__", "."), types, value)
    for key in delete:
        parts.delete(key)
    return write_parts(tmp_path / name, parts)


def hf_copy(tmp_path, base: Path, **files: bytes | str | None) -> Path:
    """A copy of the HF folder with files replaced (``None`` deletes one); names with ``_`` for ``.``."""
    folder = tmp_path / "hf"
    shutil.copytree(base, folder)
    for name, content in files.items():
        path = folder / name.replace("__", ".")
        if content is None:
            path.unlink()
        else:
            path.write_bytes(content if isinstance(content, bytes) else content.encode())
    return folder


def hf_config(base: Path, **changes) -> str:
    config = json.loads((base / "config.json").read_text())
    for key, value in changes.items():
        if value is DELETE:
            del config[key]
        else:
            config[key] = value
    return json.dumps(config)


DELETE = object()
