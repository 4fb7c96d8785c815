"""The layers hold: import contracts (import-linter), no optional dependency at ``import ropekit``,
kernel registration that never hides a bug."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
OPTIONAL = ["gguf", "tokenizers", "safetensors", "matplotlib", "tqdm", "transformers", "accelerate", "triton",
            "jinja2"]


def run_python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          timeout=300, cwd=ROOT)


def test_import_contracts_hold():
    """pyproject.toml's [tool.importlinter] contracts: the layer order and the torch-only core."""
    command = shutil.which("lint-imports")
    if command is None:
        pytest.fail("import-linter is not installed: install the test extras (pip install -e '.[test]')")
    result = subprocess.run([command], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert "0 broken" in result.stdout


def test_import_ropekit_loads_no_optional_dependency():
    """What `import ropekit` adds to what `import torch` already imports: none of the optional packages."""
    result = run_python(f"""
        import sys
        import torch
        before = set(sys.modules)
        import ropekit
        from ropekit import RopeConfig, apply_rotary, rope_cos_sin
        import torch as t
        cfg = RopeConfig(head_dim=8)
        cos, sin = rope_cos_sin(cfg.frequencies()[0], t.arange(3))
        apply_rotary(t.randn(1, 1, 3, 8), cos, sin, backend="torch")
        new = {{name.split(".")[0] for name in set(sys.modules) - before}}
        print(sorted(new & set({OPTIONAL!r})))
    """)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]", result.stdout


def test_lazy_names_resolve():
    result = run_python("""
        import ropekit
        print(ropekit.load_model.__module__, ropekit.parse_method.__module__, ropekit.ATTENTION_VARIANTS.kind)
    """)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["ropekit.loading", "ropekit.method", "attention", "variant"]


def readme_api_names() -> list[str]:
    """The dotted names in the first column of the README's API table, completed to ``ropekit.<...>``.

    A cell lists names such as ``ropekit.hf.patch(model, spec)``, ``unpatch(model)``: a bare name
    lives beside the name before it, a dotted one that does not start at ``ropekit`` (``RopeConfig.from_gguf``)
    under ``ropekit``.
    """
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    table = text.split("\n## API\n", 1)[1].split("\n## ", 1)[0]
    names = []
    for row in table.splitlines():
        if not row.startswith("| `"):
            continue
        parent = "ropekit"
        for item in re.findall(r"`([^`]+)`", row.split(" | ")[0]):
            name = item.split("(")[0].strip()
            if "." not in name:
                name = f"{parent}.{name}"
            elif not name.startswith("ropekit."):
                name = f"ropekit.{name}"
            names.append(name)
            parent = name.rsplit(".", 1)[0]
    return names


def test_readme_api_names_work_after_a_plain_import():
    """Every name in the README's API table resolves after ``import ropekit`` alone, and ``dir(ropekit)``
    lists its first component (subpackages included)."""
    names = readme_api_names()
    assert {"ropekit.hf.patch", "ropekit.hf.unpatch", "ropekit.convert.translate", "ropekit.eval.Sweeper",
            "ropekit.RopeConfig.to_vllm"} <= set(names), names
    result = run_python(f"""
        import functools
        import ropekit
        listed = set(dir(ropekit))
        for name in {names!r}:
            parts = name.split(".")[1:]
            assert parts[0] in listed, f"dir(ropekit) lacks {{parts[0]}}"
            functools.reduce(getattr, parts, ropekit)
        print("ok")
    """)
    assert result.returncode == 0, result.stderr[-4000:]
    assert result.stdout.strip() == "ok"


def test_a_bug_in_a_kernel_module_is_not_hidden():
    """The dispatch point used to swallow ImportError while loading the kernels, so a bug there silently
    left only the slow backend. A failing kernel module now fails ``import ropekit``."""
    result = run_python("""
        import importlib.abc, sys

        class Broken(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path, target=None):
                if name == "ropekit.kernels.cpu":
                    raise ImportError("simulated bug in ropekit.kernels.cpu")
                return None

        sys.meta_path.insert(0, Broken())
        import ropekit
    """)
    assert result.returncode != 0
    assert "simulated bug in ropekit.kernels.cpu" in result.stderr


def test_triton_is_imported_only_for_cuda_tensors():
    result = run_python("""
        import sys, torch, ropekit
        from ropekit.kernels import select_backend
        print(select_backend(torch.zeros(1, 1, 2, 8, dtype=torch.float64)), "triton" in sys.modules)
    """)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["torch", "False"]
