"""What every demo shares: the result record, claim printing, plotting, and the real model.

A demo states claims and checks each one; ``DemoResult.passed`` is False as soon as one fails,
and the CLI turns that into exit code 1. ``numbers`` holds the key values the claims rest on,
so tests can compare them with their own independent computations.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ropekit.defaults import DEFAULT_MODEL


@dataclass
class Claim:
    """One checked statement: what is claimed, whether it held, and the numbers behind it."""

    text: str
    passed: bool
    detail: str = ""


@dataclass
class DemoResult:
    """The outcome of one demo: its claims, key numbers, files written and parts skipped."""

    name: str
    claims: list[Claim] = field(default_factory=list)
    numbers: dict[str, Any] = field(default_factory=dict)
    plots: list[Path] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return all(claim.passed for claim in self.claims)

    def check(self, text: str, passed: bool, detail: str = "") -> bool:
        """Record a claim and print it as ``[ok]`` or ``[FAIL]`` with its detail."""
        passed = bool(passed)
        self.claims.append(Claim(text, passed, detail))
        print(f"  [{'ok' if passed else 'FAIL'}] {text}" + (f"  ({detail})" if detail else ""))
        return passed

    def skip(self, text: str) -> None:
        """Record and print a part that did not run (fast mode, no model)."""
        self.skipped.append(text)
        print(f"  [skipped] {text}")


def heading(title: str) -> None:
    print(f"\n== {title} ==")


def explain(text: str) -> None:
    """Print a short paragraph of explanation, indented."""
    for line in text.strip().splitlines():
        print(f"  {line.strip()}")


def save_plot(fig, plot_dir: Path | None, filename: str, result: DemoResult) -> Path | None:
    """Write ``fig`` as ``plot_dir/filename`` (PNG), record it in ``result``, close it."""
    import matplotlib.pyplot as plt

    if plot_dir is None:
        plt.close(fig)
        return None
    plot_dir = Path(plot_dir)
    plot_dir.mkdir(parents=True, exist_ok=True)
    path = plot_dir / filename
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    result.plots.append(path)
    print(f"  wrote {path}")
    return path


def new_figure(width: float = 7.0, height: float = 4.0):
    """A matplotlib figure and axes on the non-interactive Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(figsize=(width, height))


# --- the real model -----------------------------------------------------------------------------

_LOADED: dict[str, tuple[Any, Any]] = {}

ModelArg = Any  # a model name ("smollm2"), a path, or an already loaded (model, tokenizer) pair


def get_model(model: ModelArg = DEFAULT_MODEL) -> tuple[Any, Any]:
    """``(model, tokenizer)``: loads a name or path once per process (``demo all`` shares it)."""
    if isinstance(model, tuple):
        return model
    key = os.fspath(model)
    if key not in _LOADED:
        from ropekit.loading import load_model

        print(f"  loading {key} ...")
        _LOADED[key] = load_model(key)
    return _LOADED[key]


@contextmanager
def using_attention(model, attention) -> Iterator[None]:
    """Install another ``EngineAttention`` on ``model`` for the duration of the block."""
    previous = model.attention
    model.set_attention(attention)
    try:
        yield
    finally:
        model.set_attention(previous)


@contextmanager
def using_rope(model, spec) -> Iterator[None]:
    """Switch ``model``'s rope (a spec string, dict or RopeConfig) for the duration of the block."""
    previous = model.config.rope
    model.set_rope(spec)
    try:
        yield
    finally:
        model.set_rope(previous)


def top_tokens(tokenizer, log_probs, k: int = 5) -> list[tuple[str, float]]:
    """The ``k`` most likely next tokens as ``(text, probability)``; log_probs ``(V,)``."""
    values, ids = log_probs.topk(k)
    return [(tokenizer.decode([int(i)]), float(v.exp())) for v, i in zip(values, ids, strict=True)]


def format_top(top: list[tuple[str, float]]) -> str:
    return "  ".join(f"{text!r} {p:.3f}" for text, p in top)
