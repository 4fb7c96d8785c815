"""The C++ kernel cache cannot wedge: fresh flag lists per build, a stable cache key, a stale lock of torch's
builder removed, a builder killed while holding the lock releases it, and two processes never build at once.

torch's ``cpp_extension.load`` is replaced by a stand-in that behaves as it does where it matters here (it
appends to the flag lists it is given, and waits while a ``lock`` file sits in the build folder), so these
tests compile nothing.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
import types

import pytest

from ropekit.kernels import build


class FakeLoad:
    """Records each call's flags; like torch, appends to the lists it is given and waits on a ``lock`` file."""

    def __init__(self, wait_s: float = 0.0):
        self.calls: list[dict] = []
        self.wait_s = wait_s

    def __call__(self, *, name, sources, extra_cflags, extra_ldflags, build_directory, verbose):
        if os.path.exists(os.path.join(build_directory, "lock")):
            raise AssertionError("torch would wait forever on this lock file")
        self.calls.append({"name": name, "cflags": list(extra_cflags), "ldflags": list(extra_ldflags)})
        extra_cflags.append("-DAPPENDED_BY_TORCH")  # what torch's load does to its arguments
        extra_ldflags.append("-lappended_by_torch")
        time.sleep(self.wait_s)
        return types.ModuleType(name)


@pytest.fixture
def fake_load(monkeypatch, tmp_path):
    import torch.utils.cpp_extension as cpp_extension

    monkeypatch.setenv("ROPEKIT_CACHE", str(tmp_path / "cache"))
    fake = FakeLoad()
    monkeypatch.setattr(cpp_extension, "load", fake)
    return fake


def test_every_build_gets_fresh_flags_and_the_key_does_not_move(fake_load):
    """Before: torch appended to a shared LDFLAGS list, so the second kernel got duplicated flags and a new
    cache key, and switching between commands recompiled every time."""
    first = build.JitExtension("ropekit_test_a", build.SOURCE, "test kernel")
    second = build.JitExtension("ropekit_test_b", build.SOURCE, "test kernel")
    key = first.cache_key()
    first.build()
    second.build()
    assert [c["ldflags"] for c in fake_load.calls] == [list(build.LDFLAGS)] * 2
    assert [c["cflags"] for c in fake_load.calls] == [list(build.CFLAGS)] * 2
    assert build.LDFLAGS == ("-fopenmp",) and first.cache_key() == key == second.cache_key()


def test_the_key_covers_flags_source_and_compiler(fake_load, monkeypatch, tmp_path):
    ext = build.JitExtension("ropekit_test", build.SOURCE, "test kernel")
    key = ext.cache_key()
    monkeypatch.setattr(build, "CFLAGS", (*build.CFLAGS, "-DX"))
    assert ext.cache_key() != key
    monkeypatch.undo()
    other = tmp_path / "other.cpp"
    other.write_text(build.SOURCE.read_text() + "\n// changed\n")
    assert build.JitExtension("ropekit_test", other, "test kernel").cache_key() != key
    monkeypatch.setattr(build, "_compiler_signature", lambda: "c++: another compiler 99")
    assert ext.cache_key() != key


def test_a_stale_torch_lock_is_removed(fake_load):
    """Before: a process killed during a build left torch's ``lock`` file and every later run waited forever."""
    ext = build.JitExtension("ropekit_test", build.SOURCE, "test kernel")
    ext.cache_dir().mkdir(parents=True)
    (ext.cache_dir() / "lock").write_text("")
    assert ext.build() is not None and len(fake_load.calls) == 1
    assert not (ext.cache_dir() / "lock").exists()


CHILD = textwrap.dedent("""
    import json, os, sys, time, types
    import torch.utils.cpp_extension as cpp_extension
    from ropekit.kernels import build

    log, hold = sys.argv[1], float(sys.argv[2])

    def load(*, name, build_directory, **kwargs):
        start = time.time()
        time.sleep(hold)
        with open(log, "a") as f:
            f.write(json.dumps([os.getpid(), start, time.time()]) + "\\n")
        return types.ModuleType(name)

    cpp_extension.load = load
    build.JitExtension("ropekit_test", build.SOURCE, "test kernel").build()
""")


def _child(tmp_path, log, hold: float) -> subprocess.Popen:
    env = {**os.environ, "ROPEKIT_CACHE": str(tmp_path / "cache")}
    return subprocess.Popen([sys.executable, "-c", CHILD, str(log), str(hold)], env=env)


def test_two_processes_never_build_at_once(tmp_path):
    log = tmp_path / "builds.jsonl"
    children = [_child(tmp_path, log, 1.5) for _ in range(2)]
    assert [c.wait(timeout=120) for c in children] == [0, 0]
    (_, start_a, end_a), (_, start_b, end_b) = sorted(json.loads(line)[:3] for line in log.read_text().splitlines())
    assert end_a <= start_b or end_b <= start_a, "the two builds overlapped"


def test_a_builder_killed_while_holding_the_lock_does_not_wedge_the_next(tmp_path):
    log = tmp_path / "builds.jsonl"
    holder = _child(tmp_path, log, 600)  # holds the build lock for 10 minutes...
    lock = None
    deadline = time.time() + 60
    while lock is None and time.time() < deadline:  # ...once it has taken it
        found = list((tmp_path / "cache" / "ext").glob("*.lock")) if (tmp_path / "cache" / "ext").exists() else []
        lock = found[0] if found else None
        time.sleep(0.2)
    assert lock is not None, "the first builder never took its lock"
    time.sleep(1.0)
    holder.send_signal(signal.SIGKILL)  # ...and dies
    holder.wait(timeout=30)
    start = time.time()
    assert _child(tmp_path, log, 0).wait(timeout=60) == 0, "the next build waited on a dead process's lock"
    assert time.time() - start < 60
