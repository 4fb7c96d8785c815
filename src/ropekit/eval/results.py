"""A results file that survives interruption: one JSON list, rewritten atomically per finished cell.

Each finished cell (one method x length for perplexity, one method x length x depth for
passkey, one measurement of one candidate for tune) is appended and the whole list is written to a
temporary file in the same folder, flushed, fsynced and moved over ``results.json`` with
``os.replace`` (atomic on POSIX): a crash leaves either the old or the new file, never half of
one. A resumed sweep skips every cell whose key is already present.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

# Every input that changes a cell's numbers, per task; a record matches a planned cell when all agree
# (a field absent from an older record reads as its KEY_DEFAULTS value, else None, so such a record matches
# no new cell unless the field was added later with the behaviour of before as its default).
RUN_KEYS = ("model", "model_id", "dtype", "device", "backend")
CELL_KEYS = {
    "perplexity": ("task", *RUN_KEYS, "text", "text_sha256", "method", "length", "protocol", "stride", "windows",
                   "max_tokens", "segment"),
    "passkey": ("task", *RUN_KEYS, "method", "length", "depth", "trials", "seed", "keys", "jitter"),
    # ropekit tune: one measurement ("ppl" or "passkey") of one candidate spec on one split of the data
    "tune": ("task", *RUN_KEYS, "measure", "method", "length", "split", "text_sha256", "window_start", "depths",
             "trials", "seed", "keys"),
}
# Fields added to a task's key after records existed: their value in those records (one untagged passkey,
# no depth jitter), so records written before them still resume.
KEY_DEFAULTS = {"passkey": {"keys": 1, "jitter": 0.0}}


def cell_key(record: dict[str, Any]) -> tuple:
    defaults = KEY_DEFAULTS.get(record["task"], {})
    return tuple(record.get(k, defaults.get(k)) for k in CELL_KEYS[record["task"]])


class ResultStore:
    """The records in ``path`` (a JSON list), with ``find`` for resuming and atomic ``add``.

    Opening a store checks that its folder can be created and written (ValueError otherwise), so a
    bad ``--out`` fails before the first cell runs rather than after it.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.records: list[dict[str, Any]] = []
        _check_writable(self.path)
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


def _check_writable(path: Path) -> None:
    """ValueError unless ``path`` (a JSON file) can be written: its folder creatable and writable, and
    the path itself not a folder."""
    folder = path.parent
    if folder.exists() and not folder.is_dir():
        raise ValueError(f"output folder {folder} is a file; give --out a folder")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ValueError(f"cannot create the output folder {folder}: {err.strerror}") from None
    if path.exists() and not path.is_file():
        raise ValueError(f"{path} exists and is not a file; move it away or choose another --out")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise ValueError(f"output folder {folder} is not writable")


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_json_atomic(path: str | os.PathLike, data: Any) -> None:
    """Write ``data`` as JSON to ``path`` atomically (temp file, fsync, rename), with the user's umask."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=1)
            f.write("\n")
            f.flush()
            os.fchmod(f.fileno(), 0o666 & ~_umask())  # mkstemp makes 0600 files
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
