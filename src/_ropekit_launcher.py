"""The ``ropekit`` command's entry point: set the OpenMP settings, then run ``ropekit.cli.main``.

This module sits beside the ``ropekit`` package, not in it, because ``import ropekit`` (like any
``ropekit.*`` import) imports torch, and torch's OpenMP runtime (GNU libgomp in its Linux wheels)
reads its environment once, while ``import torch`` loads it: a variable set later, even before the
first parallel op, changes nothing. So the setting is made by the two program entries only, and
the library never touches the environment of a process that imports it:

- the ``ropekit`` console script (``[project.scripts]``) calls ``main`` here, before any torch import;
- ``python -m ropekit`` runs ``ropekit/__main__.py`` after ``ropekit/__init__`` has loaded torch, so it
  calls ``reexec_with_openmp_env`` first: the same command line once more, in a process that starts
  with the settings (one extra interpreter start, only while a setting is missing).

A variable already in the environment (any value) is left as it is: that is how a user overrides it.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping

# Idle OpenMP threads sleep instead of spinning. With libgomp's default (spin ~300000 rounds, then
# sleep), every 2-thread torch op on a 2-core machine waited 4-8 ms on a barrier while another
# process kept one core busy; OMP_PROC_BIND=true, the other cure, pins the main thread to one core,
# and every thread started after it (ropekit's decode-kernel pool among them) inherits that core.
# Measurements: docs/performance.md, "OpenMP wait policy".
OPENMP_ENV = {"OMP_WAIT_POLICY": "PASSIVE"}


def openmp_defaults(environ: Mapping[str, str]) -> dict[str, str]:
    """The entries of ``OPENMP_ENV`` that ``environ`` does not set."""
    return {name: value for name, value in OPENMP_ENV.items() if name not in environ}


def main(argv: list[str] | None = None) -> int:
    """The ``ropekit`` command: ``OPENMP_ENV``'s defaults, then the command line (imports torch)."""
    os.environ.update(openmp_defaults(os.environ))
    from ropekit.cli import main as cli_main

    return cli_main(argv)


_TAKE_A_VALUE = ("-X", "-W", "--check-hash-based-pycs")  # interpreter options whose value is the next argument


def _runs_python_m_ropekit(orig_argv: list[str]) -> bool:
    """Whether the interpreter was started as ``python [options] -m ropekit ...``."""
    args = iter(orig_argv[1:])
    for arg in args:
        if arg in _TAKE_A_VALUE:
            next(args, None)
        elif arg.startswith("-m"):
            return (arg[2:] or next(args, None)) == "ropekit"
        elif not arg.startswith("-") or arg in ("-", "-c"):  # a script, stdin or a -c program
            return False
    return False


def reexec_with_openmp_env() -> None:
    """``python -m ropekit``: if a setting of ``OPENMP_ENV`` is missing and torch is loaded already, run the
    same command line again with it (on POSIX, by exec: same process id, stdin and stdout); else set it."""
    missing = openmp_defaults(os.environ)
    if not missing:
        return
    os.environ.update(missing)
    orig_argv = getattr(sys, "orig_argv", [])
    if "torch" in sys.modules and os.name == "posix" and _runs_python_m_ropekit(orig_argv):
        sys.stdout.flush()
        sys.stderr.flush()
        os.execv(sys.executable, [sys.executable, *orig_argv[1:]])
