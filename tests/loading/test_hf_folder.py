"""HF checkpoint folders (ropekit.loading.hf_folder): tiny random models against transformers, a rope override,
and safetensors files that are truncated or whose header lies."""

from __future__ import annotations

import copy
import json
import struct
from pathlib import Path

import pytest
import torch
from file_edits import hf_copy
from tiny_llama import tiny_model, to_transformers, write_hf_folder

from ropekit.loading import load_model

# ---------------------------------------------------------------- HF folders


def test_hf_folder_matches_transformers(tmp_path):
    model = tiny_model(seed=1)
    folder = write_hf_folder(tmp_path / "tiny-hf", model)
    loaded, tokenizer = load_model(folder)
    ids = torch.tensor([tokenizer.encode("Hello, rope!")])
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids), to_transformers(model)(ids).logits, atol=1e-5, rtol=0)


def test_rope_override_on_hf_folder_matches_transformers(tmp_path):
    """``rope=`` replaces the file's rope; transformers configured the same gives the same logits."""
    model = tiny_model(seed=2)
    loaded, _ = load_model(write_hf_folder(tmp_path / "tiny-hf", model), rope="linear:factor=4")
    reference = to_transformers(model)
    config = copy.deepcopy(reference.config)
    config.rope_parameters = {"rope_type": "linear", "factor": 4.0, "rope_theta": 10000.0}
    reference = type(reference)(config).eval()
    reference.load_state_dict(to_transformers(model).state_dict())
    ids = torch.randint(0, 259, (1, 40))
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids), reference(ids).logits, atol=1e-5, rtol=0)


# ---------------------------------------------------------------- hostile files (each test names the bug it guards)


@pytest.fixture(scope="module")
def hf_base(tmp_path_factory) -> Path:
    return write_hf_folder(tmp_path_factory.mktemp("hf") / "tiny-hf", tiny_model(seed=1))


def test_hf_truncated_safetensors_is_rejected(tmp_path, hf_base):
    data = (hf_base / "model.safetensors").read_bytes()
    for size, match in ((4, r"header length = 4 bytes"), (100, r"header length = \d+: at most 92 bytes"),
                        (len(data) - 10, r"data_offsets = \[\d+, \d+\]: must be \[begin, end\] within the \d+ data "
                                         r"bytes \(truncated")):
        with pytest.raises(ValueError, match=match):
            load_model(hf_copy(tmp_path / str(size), hf_base, model__safetensors=data[:size]))
    with pytest.raises(ValueError, match=r"data = \d+ bytes: the tensors cover \d+ bytes"):
        load_model(hf_copy(tmp_path / "long", hf_base, model__safetensors=data + b"junk"))


def test_hf_safetensors_header_lies_are_rejected(tmp_path, hf_base):
    data = (hf_base / "model.safetensors").read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + n])
    name = next(k for k in header if k.endswith("q_proj.weight"))
    for change, match in (({"dtype": "X9"}, r"dtype = 'X9': must be one of"),
                          ({"shape": [-1, 64]}, r"shape = \[-1, 64\]: must be a list of at most 8 integers"),
                          ({"shape": [64, 65]}, r"data_offsets = .*: must span 16640 bytes"),
                          ({"data_offsets": [0, 1 << 60]}, r"data_offsets = .*: must be \[begin, end\] within")):
        edited = copy.deepcopy(header)
        edited[name].update(change)
        raw = json.dumps(edited).encode()
        folder = hf_copy(tmp_path / str(len(list(tmp_path.iterdir()))), hf_base,
                         model__safetensors=struct.pack("<Q", len(raw)) + raw + data[8 + n:])
        with pytest.raises(ValueError, match=match):
            load_model(folder)
