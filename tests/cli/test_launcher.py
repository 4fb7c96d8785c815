"""The ``ropekit`` command sets its OpenMP settings before torch loads; ``import ropekit`` leaves the environment alone.

What the OpenMP runtime itself read is checked through GNU libgomp's ``OMP_DISPLAY_ENV=verbose``
report, printed while ``import torch`` loads it: ``GOMP_SPINCOUNT`` is 0 under
``OMP_WAIT_POLICY=PASSIVE``, 300000 with no policy set and 3e10 under ``ACTIVE``.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from _ropekit_launcher import OPENMP_ENV, _runs_python_m_ropekit, openmp_defaults

SRC = Path(__file__).resolve().parents[2] / "src"
CONSOLE_SCRIPT = "import sys, _ropekit_launcher; sys.exit(_ropekit_launcher.main(['--help']))"

linux_only = pytest.mark.skipif(sys.platform != "linux", reason="reads GNU libgomp's report (torch's Linux wheels)")


def run_python(*args: str, **env: str) -> subprocess.CompletedProcess:
    """``python args`` with none of OPENMP_ENV's variables inherited, ``env`` added, libgomp's report on."""
    base = {k: v for k, v in os.environ.items() if k not in OPENMP_ENV}
    base["PYTHONPATH"] = os.pathsep.join([str(SRC), *filter(None, [os.environ.get("PYTHONPATH")])])
    result = subprocess.run([sys.executable, *args], env={**base, "OMP_DISPLAY_ENV": "verbose", **env},
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    return result


def spin_counts(stderr: str) -> list[str]:
    """GOMP_SPINCOUNT of each libgomp report on stderr (one per process that loaded torch)."""
    return re.findall(r"GOMP_SPINCOUNT = '(\d+)'", stderr)


def test_openmp_defaults_leave_what_the_user_set():
    assert openmp_defaults({}) == OPENMP_ENV
    assert openmp_defaults({name: "" for name in OPENMP_ENV}) == {}


@pytest.mark.parametrize("argv, expected", [
    (["python", "-m", "ropekit", "eval"], True), (["python", "-X", "dev", "-m", "ropekit"], True),
    (["python", "-u", "-mropekit"], True), (["python", "-m", "ropekit.kernels.build"], False),
    (["python", "-m", "pytest", "-m", "ropekit"], False), (["python", "run.py", "-m", "ropekit"], False),
    (["python", "-c", "pass", "-m", "ropekit"], False), (["python"], False)])
def test_python_m_ropekit_is_recognised_from_the_command_line(argv, expected):
    assert _runs_python_m_ropekit(argv) is expected


def test_launcher_imports_neither_torch_nor_ropekit():
    out = run_python("-c", "import sys, _ropekit_launcher; print(sorted({'torch', 'ropekit'} & set(sys.modules)))")
    assert out.stdout.strip() == "[]"


@linux_only
def test_console_script_sets_the_policy_before_torch_loads():
    assert spin_counts(run_python("-c", CONSOLE_SCRIPT).stderr) == ["0"]


@linux_only
def test_python_m_ropekit_runs_again_once_with_the_policy():
    """The first process loaded torch (in ropekit/__init__) without it; the re-executed one has it."""
    assert spin_counts(run_python("-m", "ropekit", "--help").stderr) == ["300000", "0"]


@linux_only
@pytest.mark.parametrize("entry", [("-c", CONSOLE_SCRIPT), ("-m", "ropekit", "--help")])
def test_a_policy_the_user_set_wins(entry):
    assert spin_counts(run_python(*entry, OMP_WAIT_POLICY="ACTIVE").stderr) == ["30000000000"]


@linux_only
def test_import_ropekit_leaves_the_environment_alone():
    out = run_python("-c", "import os, ropekit; print(os.environ.get('OMP_WAIT_POLICY'))")
    assert out.stdout.strip() == "None"
    assert spin_counts(out.stderr) == ["300000"]
