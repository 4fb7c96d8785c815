"""``load_model`` itself (ropekit.loading): missing files, unknown names, dtype on request, and wrong arguments
as ``ValueError``."""

from __future__ import annotations

import pytest
import torch
from test_hostile_files import GGUFParts, tiny_gguf_parts, write_parts
from tiny_llama import tiny_model, write_gguf

from ropekit.loading import load_model

# ---------------------------------------------------------------- bad input


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        load_model(tmp_path / "nope.gguf")


def test_unknown_model_name():
    with pytest.raises(ValueError, match="unknown model name 'tinyllama'"):
        load_model("tinyllama")


# ---------------------------------------------------------------- dtype


def test_bfloat16_on_request(tmp_path):
    loaded, _ = load_model(write_gguf(tmp_path / "tiny.gguf", tiny_model()), dtype=torch.bfloat16)
    assert loaded.embed_tokens.weight.dtype == torch.bfloat16
    logits = loaded(torch.tensor([[5, 6, 7]]))
    assert logits.dtype == torch.float32 and torch.isfinite(logits).all()


# ---------------------------------------------------------------- arguments


@pytest.fixture(scope="module")
def base_parts(tmp_path_factory) -> GGUFParts:
    return tiny_gguf_parts(tmp_path_factory.mktemp("base"))


@pytest.mark.parametrize("source", [None, 3, ["a.gguf"], "", "x" * 5000])
def test_load_model_with_a_wrong_argument_is_a_value_error(source):
    """load_model(None) raised TypeError from pathlib."""
    with pytest.raises(ValueError):
        load_model(source)


@pytest.mark.parametrize("kwargs, match", [({"rope": 3}, "rope must be"), ({"dtype": [1]}, "dtype must be one of"),
                                           ({"device": 5.5}, "unknown device")])
def test_load_model_with_a_wrong_keyword_is_a_value_error(tmp_path, base_parts, kwargs, match):
    with pytest.raises(ValueError, match=match):
        load_model(write_parts(tmp_path / "ok.gguf", base_parts), **kwargs)
