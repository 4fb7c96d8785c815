"""A sandbox for hostile inputs: one long-lived driver process forks a capped child per case.

The driver imports torch and ropekit once; each case runs in a forked child with stdout sent to
/dev/null, an address-space cap (its size at fork plus ``extra_as_mb``) and an alarm
(``timeout_s``). What a case does and how its end is classified belong to the test module, as
Python source that defines three functions, run in the driver before the shared serving loop:

- ``prepare(args)``: once, before any fork (``args``: the driver's extra command-line arguments);
- ``run(request, fd) -> (exit code, text)``: in the child; ``text`` is written to ``fd`` (the pipe
  whose whole content comes back as the reply's ``message``);
- ``outcome(status, message) -> str``: in the driver, from the child's wait status.

The reply to each request: ``{"outcome", "message" (its last 3000 characters), "status",
"maxrss_kb" (the child's), "seconds", "driver_rss_kb"}``. ``ROPEKIT_FUZZ_EXAMPLES`` sets the number
of cases of every fuzz test, ``ROPEKIT_FUZZ_AS_MB`` the address-space headroom of a child.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

from hypothesis import settings

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = int(os.environ.get("ROPEKIT_FUZZ_EXAMPLES", "0")) or None
EXTRA_AS_MB = int(os.environ.get("ROPEKIT_FUZZ_AS_MB", "2048"))

SERVE = r'''
import json as _json, os as _os, resource as _resource, signal as _signal, sys as _sys, time as _time
import traceback as _traceback


def _vm_size():
    with open("/proc/self/status") as f:
        line = next(line for line in f if line.startswith("VmSize:"))
    return int(line.split()[1]) * 1024


def _child(request, fd, timeout, extra):
    _os.dup2(_os.open(_os.devnull, _os.O_WRONLY), 1)
    cap = _vm_size() + extra
    _resource.setrlimit(_resource.RLIMIT_AS, (cap, cap))
    _signal.alarm(timeout)
    try:
        code, text = run(request, fd)
    except BaseException:
        code, text = 1, _traceback.format_exc()
    data = text.encode("utf-8", "replace")
    while data:
        data = data[_os.write(fd, data):]
    _sys.stderr.flush()
    _os._exit(code)


def _serve(timeout, extra):
    for line in _sys.stdin:
        request = _json.loads(line)
        read, write = _os.pipe()
        start = _time.monotonic()
        pid = _os.fork()
        if pid == 0:
            _os.close(read)
            _child(request, write, timeout, extra)
        _os.close(write)
        chunks = []
        while chunk := _os.read(read, 1 << 16):
            chunks.append(chunk)
        _os.close(read)
        _, status, usage = _os.wait4(pid, 0)
        message = b"".join(chunks).decode("utf-8", "replace")
        reply = {"outcome": outcome(status, message), "message": message[-3000:], "status": status,
                 "maxrss_kb": usage.ru_maxrss, "seconds": round(_time.monotonic() - start, 3),
                 "driver_rss_kb": _resource.getrusage(_resource.RUSAGE_SELF).ru_maxrss}
        _sys.stdout.write(_json.dumps(reply) + "\n")
        _sys.stdout.flush()


prepare(_sys.argv[3:])
_serve(int(_sys.argv[1]), int(_sys.argv[2]) << 20)
'''


class Sandbox:
    """The driver process running ``cases`` (the module's ``prepare``, ``run`` and ``outcome``)."""

    def __init__(self, cases: str, *args: str, timeout_s: int, extra_as_mb: int = EXTRA_AS_MB, cwd: Path = ROOT,
                 env: dict[str, str] | None = None, stderr_path: Path | None = None):
        env = dict(os.environ if env is None else env)
        paths = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p] + [str(ROOT / "src")]
        env["PYTHONPATH"] = os.pathsep.join(paths)
        self.stderr_path = stderr_path
        stderr = open(stderr_path, "w") if stderr_path is not None else None  # the driver inherits it
        try:
            self.proc = subprocess.Popen([sys.executable, "-c", cases + SERVE, str(timeout_s), str(extra_as_mb), *args],
                                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=stderr, text=True,
                                         env=env, cwd=cwd)
        finally:
            if stderr is not None:
                stderr.close()
        self.counts: Counter[str] = Counter()
        self.by_kind: dict[str, Counter[str]] = {}
        self.max_rss_kb = self.driver_rss_kb = 0

    def request(self, request: Any, kind: str = "other") -> dict[str, Any]:
        """The reply for one case, counted under ``kind``."""
        self.proc.stdin.write(json.dumps(request) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            self.proc.wait(timeout=30)
            stderr = f": {self.stderr_path.read_text()[-3000:]}" if self.stderr_path is not None else ""
            raise RuntimeError(f"the sandbox driver died (exit {self.proc.returncode}) on {request!r:.300}{stderr}")
        reply = json.loads(line)
        self.counts[reply["outcome"]] += 1
        self.by_kind.setdefault(kind, Counter())[reply["outcome"]] += 1
        self.max_rss_kb = max(self.max_rss_kb, reply["maxrss_kb"])
        self.driver_rss_kb = reply["driver_rss_kb"]
        return reply

    def close(self, timeout_s: float = 30) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=timeout_s)


def show_summary(request, lines: list[str]) -> None:
    """Print ``lines`` in pytest's terminal report, even when the tests' output is captured."""
    reporter = request.config.pluginmanager.get_plugin("terminalreporter")
    capture = request.config.pluginmanager.get_plugin("capturemanager")
    if reporter is not None and capture is not None:
        with capture.global_and_fixture_disabled():
            reporter.write_line("")
            for line in lines:
                reporter.write_line(line)
    else:
        print("\n" + "\n".join(lines), file=sys.stderr)


def hypothesis_settings(default: int, suppress_health_check):
    """``default`` examples (deterministic), or ``ROPEKIT_FUZZ_EXAMPLES`` (random) when set."""
    return settings(max_examples=EXAMPLES or default, deadline=None, derandomize=EXAMPLES is None, database=None,
                    suppress_health_check=list(suppress_health_check))
