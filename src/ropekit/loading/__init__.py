"""Loading: GGUF and HF folders into a ``LlamaModel`` plus ``Tokenizer``; the ``smollm2`` default."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping
from pathlib import Path

import torch

from ropekit.defaults import DEFAULT_MODEL
from ropekit.loading.checks import read_json_object
from ropekit.loading.default_model import ModelFetchError, is_model_name, resolve_model_name
from ropekit.loading.gguf_file import open_gguf, read_gguf, read_metadata
from ropekit.loading.hf_folder import MAX_CONFIG_BYTES, read_hf_folder
from ropekit.loading.tokenizer import Tokenizer
from ropekit.model.arena import state_on_huge_pages
from ropekit.model.llama import LlamaConfig, LlamaModel
from ropekit.rope import RopeConfig

__all__ = ["ModelFetchError", "Tokenizer", "load_model", "load_tokenizer", "model_identity", "parse_device",
           "parse_dtype", "resolve_source"]

_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def resolve_source(source: str | os.PathLike) -> Path:
    """A GGUF file or HF folder path for ``source`` (a path, or a default model name like ``smollm2``).

    ValueError for anything but a non-empty str or path-like, or a path the system refuses to look at.
    """
    if not isinstance(source, (str, os.PathLike)) or isinstance(source, str) and not source.strip():
        raise ValueError(f"model source must be a GGUF file, an HF folder or a model name, got {source!r}")
    path = Path(source)
    try:
        exists = path.exists()
    except (OSError, ValueError) as err:  # a name too long, a NUL byte, a loop of links
        raise ValueError(f"model source {str(source)[:200]!r}: {err}") from None
    if exists:
        if not path.is_file() and not path.is_dir():
            raise ValueError(f"{path}: not a regular file or a folder")
        return path
    if isinstance(source, str) and is_model_name(source):
        return resolve_model_name(source)
    if isinstance(source, str) and os.sep not in source and not source.endswith(".gguf"):
        raise ValueError(f"unknown model name {source!r}: not a file or folder, and not one of ropekit's "
                         "default models (smollm2)")
    raise FileNotFoundError(f"model file or folder not found: {source}")


HASH_LIMIT = 1 << 30  # files up to 1 GiB are identified by content; larger ones by size, mtime and path


def model_identity(source: str | os.PathLike) -> str:
    """A string that changes whenever the model's files do: ``sha256:<16 hex>`` of the GGUF file (or of an HF
    folder's config, tokenizer and safetensors files), or ``size:mtime:path`` entries for files over 1 GiB."""
    path = resolve_source(source)
    files = [path] if path.is_file() else sorted(p for p in path.iterdir() if p.is_file() and (
        p.suffix in (".json", ".safetensors", ".model") or p.name.endswith(".gguf")))
    digest = hashlib.sha256()
    for file in files:
        stat = file.stat()
        digest.update(f"{file.name}:{stat.st_size}\n".encode())
        if stat.st_size > HASH_LIMIT:
            digest.update(f"{stat.st_mtime_ns}:{file.resolve()}\n".encode())
            continue
        with open(file, "rb") as f:
            while block := f.read(1 << 22):
                digest.update(block)
    return f"sha256:{digest.hexdigest()[:16]}"


def parse_dtype(name: str | torch.dtype) -> torch.dtype:
    """``"float32"`` / ``"bfloat16"`` / ``"float16"`` (or the dtype itself) -> the torch dtype; ValueError otherwise."""
    if isinstance(name, torch.dtype) and name in _DTYPES:
        return name
    by_name = {str(d).removeprefix("torch."): d for d in _DTYPES}
    if not isinstance(name, str) or name not in by_name:
        raise ValueError(f"dtype must be one of {', '.join(by_name)}, got {name!r}")
    return by_name[name]


def parse_device(name: str | torch.device | None) -> torch.device:
    """A torch device that exists here (``cpu``, ``cuda``, ``cuda:1``, ...); ValueError naming it otherwise."""
    try:
        device = torch.device(name if name is not None else "cpu")
    except (RuntimeError, TypeError):
        raise ValueError(f"unknown device {name!r} (e.g. cpu, cuda, cuda:1)") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {name!r}: CUDA is not available on this machine")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"device {name!r}: only {torch.cuda.device_count()} CUDA device(s) here")
    elif device.type not in ("cpu", "mps", "xpu"):
        raise ValueError(f"device {name!r}: ropekit runs on cpu or cuda devices")
    return device


def load_tokenizer(source: str | os.PathLike = DEFAULT_MODEL) -> Tokenizer:
    """The tokenizer of a model (GGUF metadata or an HF folder's tokenizer.json), without its weights."""
    path = resolve_source(source)
    if path.is_dir():
        config = path / "config.json"
        return Tokenizer.from_folder(path, read_json_object(config, MAX_CONFIG_BYTES) if config.is_file() else {})
    return Tokenizer.from_gguf_metadata(read_metadata(open_gguf(path)), source=path)


def load_model(source: str | os.PathLike = DEFAULT_MODEL, *, rope: RopeConfig | Mapping | str | None = None,
               dtype: torch.dtype | str = torch.float32,
               device: torch.device | str | None = None) -> tuple[LlamaModel, Tokenizer]:
    """Load a LLaMA model and its tokenizer.

    source: a ``.gguf`` path, an HF folder (config.json, *.safetensors, tokenizer.json), or
    ``"smollm2"``. rope: overrides the file's rope settings (a ``RopeConfig``, an HF
    ``rope_parameters`` dict, or a spec string like ``"yarn:factor=2"``; dicts and strings keep
    the model's base, head_dim and trained length). dtype: float32 (default), bfloat16 or float16.
    device: where the model runs (default cpu; e.g. "cuda"). Returns ``(model, tokenizer)``, the
    model in eval mode.
    """
    dtype = parse_dtype(dtype)
    device = parse_device(device)
    if rope is not None and not isinstance(rope, (RopeConfig, Mapping, str)):
        raise ValueError(f"rope must be a RopeConfig, an HF rope_parameters dict or a spec string, got {rope!r}")
    path = resolve_source(source)
    if path.is_dir():
        config, state, hf = read_hf_folder(path)
        tokenizer = Tokenizer.from_folder(path, hf)
    else:
        config, state, meta = read_gguf(path, has_rope_override=rope is not None)
        tokenizer = Tokenizer.from_gguf_metadata(meta, source=path)
    if rope is not None:
        config = config.with_rope(config.rope.with_rope_type(rope))
    return build_model(config, state, dtype, device), tokenizer


def build_model(config: LlamaConfig, state: dict[str, torch.Tensor], dtype: torch.dtype,
                device: torch.device | None = None) -> LlamaModel:
    """A ``LlamaModel`` holding ``state`` (our parameter names), in ``dtype`` on ``device``, eval mode."""
    with torch.device("meta"):
        model = LlamaModel(config)
    missing = set(model.state_dict()) - set(state)
    if config.tie_word_embeddings:
        missing.discard("lm_head.weight")
        state = {k: v for k, v in state.items() if k != "lm_head.weight"}
    unexpected = set(state) - set(model.state_dict())
    if missing or unexpected:
        raise ValueError(f"checkpoint does not match the config: missing {sorted(missing)[:5]}, "
                         f"unexpected {sorted(unexpected)[:5]}")
    device = device or torch.device("cpu")
    if device.type == "cpu":
        # one huge-page buffer in the order the forward reads the weights (faster decoding, arena.py)
        state = state_on_huge_pages({k: v.to(dtype) for k, v in state.items()}, order=list(model.state_dict()))
    else:
        state = {k: v.to(device=device, dtype=dtype) for k, v in state.items()}
    model.load_state_dict(state, strict=False, assign=True)
    if config.tie_word_embeddings:
        model.lm_head.weight = model.embed_tokens.weight
    model.rope = type(model.rope)(config.rope, device=device)  # rebuilt off the meta device
    return model.eval()
