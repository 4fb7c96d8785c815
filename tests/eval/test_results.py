"""The record store with concurrent writers: several processes (random start delays, one killed mid-run) writing
into one folder end with exactly the union of their finished records; every parse failure of a stored file is
one ValueError naming it."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

import ropekit
from ropekit.eval.results import ResultStore, record_name

SRC = Path(ropekit.__file__).resolve().parents[1]

# A writer: sleeps a seeded random time, then stores `count` records of its own, printing each record's length
# once `add` has returned (a finished record), with a random pause between records.
WRITER = """
import random, sys, time
from ropekit.eval.results import ResultStore
path, writer, count, pause = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
rng = random.Random(writer)
time.sleep(rng.random() * 0.3)
store = ResultStore(path)
for i in range(count):
    store.add({"task": "passkey", "model": "m", "method": f"writer{writer}", "length": 2 + i, "depth": 0.5,
               "trials": 1, "seed": 0, "accuracy": 1.0})
    print(2 + i, flush=True)
    time.sleep(rng.random() * pause)
"""


def _writer(path: Path, writer: int, count: int, pause: float) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", WRITER, str(path), str(writer), str(count), str(pause)],
                            env={**os.environ, "PYTHONPATH": str(SRC)}, stdout=subprocess.PIPE, text=True)


def _cell(writer: int, length: int) -> tuple[str, int]:
    return (f"writer{writer}", length)


def test_concurrent_writers_and_a_killed_one_keep_exactly_the_finished_records(tmp_path):
    path = tmp_path / "out" / "results.json"
    victim = _writer(path, 9, count=1000, pause=0.05)
    finished = {9: [int(victim.stdout.readline())]}
    writers = {w: _writer(path, w, count=25, pause=0.02) for w in range(4)}  # they start while the victim writes
    while len(finished[9]) < 3:  # let the victim store a few more records, then kill it mid-run
        finished[9].append(int(victim.stdout.readline()))
    os.kill(victim.pid, signal.SIGKILL)
    victim.wait()
    finished[9] += [int(line) for line in victim.stdout.read().split()]  # printed before the kill
    for w, process in writers.items():
        out, _ = process.communicate(timeout=120)
        assert process.returncode == 0
        finished[w] = [int(line) for line in out.split()]
    expected = {_cell(w, n) for w, lengths in finished.items() for n in lengths}
    assert len(expected) == 4 * 25 + len(finished[9])

    stored = [(r["method"], r["length"]) for r in ResultStore(path).records]
    assert len(stored) == len(set(stored))  # none twice
    # the victim may have stored one record it was killed before announcing: never more
    extra = set(stored) - expected
    assert expected <= set(stored) and extra <= {_cell(9, max(finished[9]) + 1)}
    # the index, rebuilt by the writers that outlived the victim: every record
    index = [(r["method"], r["length"]) for r in json.loads(path.read_text())]
    assert sorted(index) == sorted(stored)


def test_same_cell_from_two_stores_is_stored_once(tmp_path):
    path = tmp_path / "results.json"
    cell = {"task": "passkey", "model": "m", "method": "none", "length": 10, "depth": 0.5, "trials": 1, "seed": 0}
    first, second = ResultStore(path), ResultStore(path)
    first.add({**cell, "accuracy": 1.0})
    assert second.find(cell)["accuracy"] == 1.0  # written by another process: seen, not run again
    second.add({**cell, "accuracy": 0.5})
    assert [r["accuracy"] for r in ResultStore(path).records] == [0.5]
    assert (tmp_path / "results.records" / record_name(cell)).is_file()


def test_records_of_an_older_single_file_store_are_kept(tmp_path):
    path = tmp_path / "results.json"
    old = {"task": "passkey", "model": "m", "method": "none", "length": 10, "depth": 0.5, "trials": 1, "seed": 0,
           "accuracy": 1.0}
    path.write_text(json.dumps([old]))
    store = ResultStore(path)
    assert store.find(old) == old
    store.add({**old, "method": "yarn:factor=2"})
    assert sorted(r["method"] for r in json.loads(path.read_text())) == ["none", "yarn:factor=2"]


HOSTILE = {"deep nesting": b"[" * 100_000, "huge float": b'[{"task": "passkey", "ppl": 1e999}]',
           "huge integer": b"[" + b"9" * 5000 + b"]", "invalid UTF-8": b'[{"task": "\xff\xfe"}]',
           "broken": b"[{broken"}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_index_is_one_value_error_naming_the_file(tmp_path, case):
    path = tmp_path / "results.json"
    path.write_bytes(HOSTILE[case])
    with pytest.raises(ValueError) as err:
        ResultStore(path)
    assert str(path) in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_record_file_is_one_value_error_naming_the_file(tmp_path, case):
    path = tmp_path / "results.json"
    (tmp_path / "results.records").mkdir()
    record = tmp_path / "results.records" / "passkey-0.json"
    record.write_bytes(HOSTILE[case])
    with pytest.raises(ValueError) as err:
        ResultStore(path)
    assert str(record) in str(err.value) and "\n" not in str(err.value)


def test_unwritable_output_fails_when_the_store_opens(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="is a file"):
        ResultStore(tmp_path / "file" / "results.json")
    if os.geteuid() != 0:  # root writes anywhere
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        with pytest.raises(ValueError, match="not writable"):
            ResultStore(locked / "results.json")
