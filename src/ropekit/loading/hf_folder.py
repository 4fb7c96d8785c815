"""Read a Hugging Face LLaMA checkpoint folder: config.json, *.safetensors, tokenizer.json."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from ropekit.model.llama import LlamaConfig

SUPPORTED_MODEL_TYPES = ("llama", "mistral")


def read_hf_config(folder: str | os.PathLike) -> dict[str, Any]:
    """The parsed ``config.json``; ValueError unless it describes a LLaMA-architecture model."""
    path = Path(folder) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"no config.json in {folder}")
    with open(path, encoding="utf-8") as f:
        hf = json.load(f)
    model_type = hf.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(f"unsupported model_type {model_type!r} in {path}; supported: "
                         f"{', '.join(SUPPORTED_MODEL_TYPES)}")
    return hf


def read_safetensors(folder: str | os.PathLike) -> dict[str, torch.Tensor]:
    """All tensors of the folder's ``*.safetensors`` shards, under our names (``model.`` prefix dropped)."""
    from safetensors.torch import load_file

    files = sorted(Path(folder).glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors files in {folder}")
    state = {}
    for file in files:
        for name, tensor in load_file(str(file)).items():
            state[name.removeprefix("model.")] = tensor
    return state


def read_hf_folder(folder: str | os.PathLike) -> tuple[LlamaConfig, dict[str, torch.Tensor], dict[str, Any]]:
    """``(config, state dict, raw config.json)`` of an HF LLaMA folder."""
    hf = read_hf_config(folder)
    state = read_safetensors(folder)
    if "lm_head.weight" not in state and "tie_word_embeddings" not in hf:
        hf = {**hf, "tie_word_embeddings": True}
    state = {k: v for k, v in state.items() if not k.endswith("rotary_emb.inv_freq")}
    return LlamaConfig.from_hf(hf), state, hf
