"""A record store that never loses a record, with any number of writers: one file per record, an index
rebuilt from them.

Each finished cell (one method x length for perplexity, one method x length x depth for passkey, one
measurement of one candidate for tune) is written to its own file in ``results.records/`` (named by a hash
of the cell's key) through a temporary file in the same folder, fsynced and moved into place with
``os.replace``: atomic on POSIX and on NFS, so a reader sees the whole record or none, and a writer killed
mid-write leaves at most a ``.tmp`` file that no reader looks at. Two processes never write the same name
unless they ran the same cell, and then either complete record is a correct one.

``results.json`` (a JSON list, the file users and reports read) is an index rebuilt from the record files
(plus the records of an older ``results.json`` that had no record files) after every added record, under an
exclusive ``flock`` on ``results.records/.lock``, written atomically the same way. Where the file system gives
no locks (an NFS mount with ``nolock``), two rebuilds can race and the index can miss a record for a
moment; the record files stay complete and the next rebuild (every add, every report written) restores
it. A resumed or concurrent sweep skips every cell whose key is already stored.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ropekit.loading.checks import read_json_file

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


RECORDS_SUFFIX = ".records"  # results.json -> results.records/: one file per record


def record_name(record: dict[str, Any]) -> str:
    """The file name of ``record``'s cell in the records folder: the task and 20 hex digits of the SHA-256 of its
    key (the same for every record of the same cell, in any process, on any machine)."""
    key = json.dumps(list(cell_key(record)), default=str, sort_keys=True)
    return f"{record['task']}-{hashlib.sha256(key.encode('utf-8')).hexdigest()[:20]}.json"


class ResultStore:
    """The records of one output folder: ``find`` for resuming, ``add`` (atomic, safe with concurrent writers),
    ``reload`` to see what other processes added, ``locked`` around anything that reads all records and writes
    files from them (reports).

    ``path`` is the index (``results.json``); the records live in ``<stem>.records/`` beside it. Opening a store
    checks that its folder can be created and written (ValueError otherwise), so a bad ``--out`` fails before
    the first cell runs rather than after it.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.folder = self.path.with_name(self.path.stem + RECORDS_SUFFIX)
        self.lock_path = self.folder / ".lock"  # in the records folder: the output folder gets no hidden file
        _check_writable(self.path)
        _check_writable(self.folder / "record.json")
        self.records: list[dict[str, Any]] = []
        self._by_name: dict[str, dict[str, Any]] = {}
        self.reload()

    def reload(self) -> list[dict[str, Any]]:
        """Read the index and every record file again (what every writer has stored so far); the records."""
        by_name = {record_name(r): r for r in _read_index(self.path)}
        for name in sorted(os.listdir(self.folder)):
            if name.endswith(".json") and not name.startswith("."):
                by_name[name] = read_record(self.folder / name)
        self._by_name = by_name
        self.records = list(by_name.values())
        return self.records

    def find(self, cell: dict[str, Any]) -> dict[str, Any] | None:
        """The stored record of ``cell`` (a dict with the task's key fields), or None; looks at the record files
        again before answering None, so a cell another process finished is not run twice."""
        name = record_name(cell)
        if name not in self._by_name and (self.folder / name).is_file():
            self.reload()
        return self._by_name.get(name)

    def add(self, record: dict[str, Any]) -> None:
        """Store ``record`` (replacing an older record of the same cell): its own file first, then the index."""
        name = record_name(record)
        write_json_atomic(self.folder / name, record)
        with self.locked():
            self.write_index()

    def write_index(self) -> list[dict[str, Any]]:
        """Read every record again and rewrite the index from them, atomically; the records. Call it inside
        ``locked``, so that two rebuilds never race."""
        write_json_atomic(self.path, self.reload())
        return self.records

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """An exclusive lock on the store across processes (``flock``); without lock support in the file system
        (ENOLCK, EOPNOTSUPP) it runs unlocked: the record files stay safe, only the index may lag."""
        with open(self.lock_path, "a") as lock:
            try:
                fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
            except OSError as err:
                if err.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
                    raise
            try:
                yield
            finally:
                with contextlib.suppress(OSError):
                    fcntl.flock(lock.fileno(), fcntl.LOCK_UN)

    def of_task(self, task: str) -> list[dict[str, Any]]:
        return [r for r in self.records if r.get("task") == task]


def read_record(path: Path) -> dict[str, Any]:
    """One record file: a JSON object with a ``task``; ValueError naming the file otherwise."""
    record = read_json_file(path)
    if not isinstance(record, dict) or record.get("task") not in CELL_KEYS:
        raise ValueError(f"{path}: not a ropekit record (a JSON object with a known task); move it away")
    return record


def _read_index(path: Path) -> list[dict[str, Any]]:
    """The records of ``results.json`` (none when it does not exist); ValueError naming the file when it is not a
    JSON list of records."""
    if not path.exists():
        return []
    loaded = read_json_file(path)
    if not isinstance(loaded, list) or not all(isinstance(r, dict) and r.get("task") in CELL_KEYS for r in loaded):
        raise ValueError(f"{path} must hold a JSON list of records")
    return loaded


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
