"""A results file that survives interruption: one JSON list, rewritten atomically per finished cell.

Each finished cell (one method x length for perplexity, one method x length x depth for
passkey) is appended and the whole list is written to a temporary file in the same folder,
flushed, fsynced and moved over ``results.json`` with ``os.replace`` (atomic on POSIX): a crash
leaves either the old or the new file, never half of one. A resumed sweep skips every cell
whose key is already present.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

# Fields that identify a cell, per task; a record matches a planned cell when all agree.
CELL_KEYS = {
    "perplexity": ("task", "model", "text", "method", "length", "protocol", "stride", "windows"),
    "passkey": ("task", "model", "method", "length", "depth", "trials", "seed"),
}


def cell_key(record: dict[str, Any]) -> tuple:
    return tuple(record.get(k) for k in CELL_KEYS[record["task"]])


class ResultStore:
    """The records in ``path`` (a JSON list), with ``find`` for resuming and atomic ``add``."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.records: list[dict[str, Any]] = []
        if self.path.exists():
            try:
                loaded = json.loads(self.path.read_text())
            except json.JSONDecodeError as err:
                raise ValueError(f"{self.path} is not valid JSON ({err}); move it away to start afresh"
                                 ) from None
            if not isinstance(loaded, list):
                raise ValueError(f"{self.path} must hold a JSON list of records")
            self.records = loaded

    def find(self, cell: dict[str, Any]) -> dict[str, Any] | None:
        """The stored record of ``cell`` (a dict with the task's key fields), or None."""
        key = cell_key(cell)
        for record in self.records:
            if record.get("task") == cell["task"] and cell_key(record) == key:
                return record
        return None

    def add(self, record: dict[str, Any]) -> None:
        """Append (replacing an older record of the same cell) and write the file atomically."""
        self.records = [r for r in self.records
                        if not (r.get("task") == record["task"] and cell_key(r) == cell_key(record))]
        self.records.append(record)
        write_json_atomic(self.path, self.records)

    def of_task(self, task: str) -> list[dict[str, Any]]:
        return [r for r in self.records if r.get("task") == task]


def write_json_atomic(path: str | os.PathLike, data: Any) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=1)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
