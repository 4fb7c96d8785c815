"""Checks on a model's architecture numbers and tensors, before any model is built.

Both loaders describe a model as an HF-style dict (``hidden_size``, ``num_attention_heads``, ...)
and name, for each of its keys, the key of their own file (``llama.embedding_length`` in a GGUF,
the same name in a config.json), so every message names what the user can find in the file:
``"<file>: <key> = <value>: <what is allowed>"``.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from ropekit.loading.gguf_header import printable
from ropekit.model.llama import LlamaConfig

# Upper limits, each far above any released LLaMA-family model (in brackets: the largest known).
MAX_LAYERS = 1024  # [126: Llama 3.1 405B]
MAX_HEADS = 1024  # query and key/value heads [128]
MAX_HEAD_DIM = 1024  # [256]
MAX_HIDDEN = 1 << 17  # 131072 [16384]
MAX_INTERMEDIATE = 1 << 20  # 1048576 [53248]
MAX_VOCAB = 1 << 20  # 1048576 [262144: Gemma 3]
MAX_CONTEXT = 1 << 24  # 16777216 tokens [10M: Llama 4 Scout]
MAX_EPS = 1.0  # rms_norm_eps in (0, 1] [1e-5]

# HF key -> upper limit; the integer architecture numbers (each must be an int in [1, limit]).
INT_LIMITS = {"num_hidden_layers": MAX_LAYERS, "num_attention_heads": MAX_HEADS, "num_key_value_heads": MAX_HEADS,
              "head_dim": MAX_HEAD_DIM, "hidden_size": MAX_HIDDEN, "intermediate_size": MAX_INTERMEDIATE,
              "vocab_size": MAX_VOCAB, "max_position_embeddings": MAX_CONTEXT}
REQUIRED = ("hidden_size", "num_attention_heads", "num_hidden_layers", "intermediate_size", "vocab_size")


class Raw(str):
    """A value shown as is in a message (a description such as ``(missing)``, not the file's string)."""


MISSING = Raw("(missing)")


def fail(source: Any, key: str, value: Any, allowed: str) -> ValueError:
    """The one-line error ``"<source>: <key> = <value>: <allowed>"`` (long values shortened)."""
    if isinstance(value, np.ndarray):
        value = Raw(f"array of {value.size} {value.dtype} {value[:8].tolist()}")
    numeric = isinstance(value, (int, float)) and not isinstance(value, bool)
    if isinstance(value, str) and not isinstance(value, Raw):
        value = value[:100]
    text = str(value) if numeric or isinstance(value, Raw) else repr(value)
    return ValueError(printable(f"{source}: {printable(key, 120)} = {printable(text, 80)}: {allowed}", 1000))


def check_int(source: Any, key: str, value: Any, high: int, low: int = 1) -> int:
    """``value`` if it is an int (not a bool) in ``[low, high]``, else ValueError naming ``key``."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise fail(source, key, value, f"must be an integer in [{low}, {high}]")
    if not low <= value <= high:
        raise fail(source, key, value, f"must be an integer in [{low}, {high}]")
    return value


def check_float(source: Any, key: str, value: Any, low: float, high: float = math.inf, *,
                low_open: bool = True) -> float:
    """``value`` as a float if it is a finite number in ``(low, high]`` (``[low, high]``), else ValueError."""
    interval = f"{'(' if low_open else '['}{low:g}, {high:g}]"
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise fail(source, key, value, f"must be a finite number in {interval}")
    if (value <= low if low_open else value < low) or value > high:
        raise fail(source, key, value, f"must be a finite number in {interval}")
    return float(value)


def check_bool(source: Any, key: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise fail(source, key, value, "must be true or false")
    return value


def check_architecture(source: Any, hf: Mapping[str, Any], names: Mapping[str, str]) -> dict[str, Any]:
    """The architecture numbers of ``hf`` checked and completed (ints and floats, no ``None``).

    ``hf``: an HF-style dict; absent or ``None`` optional keys get HF's defaults
    (``num_key_value_heads`` = heads, ``head_dim`` = hidden / heads). ``names``: HF key -> the key
    in the file (messages use it). Checks: each integer in ``[1, INT_LIMITS[key]]``, kv heads
    dividing heads, head_dim even (rotary pairs), hidden divisible by heads when head_dim is
    implied, ``rms_norm_eps`` finite in ``(0, 1]``.
    """
    name = lambda key: names.get(key, key)  # noqa: E731
    out = dict(hf)
    for key in REQUIRED:
        if hf.get(key) is None:
            raise fail(source, name(key), hf.get(key, MISSING), "required")
    for key, high in INT_LIMITS.items():
        if hf.get(key) is not None:
            out[key] = check_int(source, name(key), hf[key], high)
        else:
            out.pop(key, None)
    heads = out["num_attention_heads"]
    kv_heads = out.setdefault("num_key_value_heads", heads)
    if heads % kv_heads:
        raise fail(source, name("num_key_value_heads"), kv_heads,
                   f"must divide {name('num_attention_heads')} = {heads}")
    if "head_dim" not in out:
        if out["hidden_size"] % heads:
            raise fail(source, name("hidden_size"), out["hidden_size"],
                       f"must be a multiple of {name('num_attention_heads')} = {heads} (or give {name('head_dim')})")
        out["head_dim"] = check_int(source, f"{name('hidden_size')} / {name('num_attention_heads')}",
                                    out["hidden_size"] // heads, MAX_HEAD_DIM)
    if out["head_dim"] % 2:
        raise fail(source, name("head_dim"), out["head_dim"], "must be even (rope rotates pairs of channels)")
    if hf.get("rms_norm_eps") is not None:
        out["rms_norm_eps"] = check_float(source, name("rms_norm_eps"), hf["rms_norm_eps"], 0.0, MAX_EPS)
    else:
        out.pop("rms_norm_eps", None)
    for key in ("tie_word_embeddings", "attention_bias"):
        if hf.get(key) is not None:
            out[key] = check_bool(source, name(key), hf[key])
        else:
            out.pop(key, None)
    return out


def build_config(source: Any, hf: Mapping[str, Any]) -> LlamaConfig:
    """``LlamaConfig.from_hf(hf)`` for a checked ``hf``, its rope frequencies computed once; any error in
    the rope settings becomes a ValueError naming ``source``."""
    try:
        config = LlamaConfig.from_hf(hf)
        config.rope.frequencies(config.max_position_embeddings)
    except (ValueError, TypeError, KeyError, ArithmeticError) as err:
        rope = hf.get("rope_parameters") or hf.get("rope_scaling")
        raise ValueError(f"{source}: rope settings {_short(rope)}: {one_line(err)}") from None
    return config


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 120 else text[:120] + "..."


def one_line(err: BaseException) -> str:
    """The first line of an exception's message, control characters escaped."""
    text = str(err).strip().splitlines()
    return printable(text[0]) if text else type(err).__name__


def _finite_float(text: str) -> float:
    """A JSON number as a float; ValueError for one too large for a float (``1e999`` would read as inf)."""
    value = float(text)
    if math.isinf(value):
        raise ValueError(f"number {text[:40]!r} is too large for a float")
    return value


def parse_json(raw: bytes | str, path: Path | str) -> Any:
    """``raw`` (a JSON document read from ``path``) parsed; every parse failure becomes one ValueError naming the
    file: invalid JSON, invalid UTF-8, nesting too deep for the parser, an integer of more digits than Python
    converts, a number too large for a float."""
    try:
        text = raw.decode("utf-8") if isinstance(raw, bytes) else raw
        return json.loads(text, parse_float=_finite_float)
    except (ValueError, RecursionError) as err:  # JSONDecodeError, UnicodeDecodeError, too many digits, too deep
        reason = "nested too deeply" if isinstance(err, RecursionError) else one_line(err)
        raise ValueError(f"{path}: not valid JSON: {reason}") from None


def read_json_file(path: Path, max_bytes: int | None = None) -> Any:
    """The JSON document in ``path`` (a regular file, at most ``max_bytes`` long when given); ValueError naming the
    file for anything else (see ``parse_json``)."""
    if path.exists() and not path.is_file():
        raise ValueError(f"{path}: not a regular file")
    try:
        size = path.stat().st_size
        if max_bytes is not None and size > max_bytes:
            raise fail(path, "size", Raw(f"{size} bytes"), f"at most {max_bytes} bytes for a JSON file")
        raw = path.read_bytes()
    except OSError as err:  # permissions, missing
        raise ValueError(f"{path}: cannot read the file ({err.strerror or err})") from None
    return parse_json(raw, path)


def read_json_object(path: Path, max_bytes: int) -> dict[str, Any]:
    """A JSON file that must hold an object, at most ``max_bytes`` long; ValueError naming the file otherwise."""
    value = read_json_file(path, max_bytes)
    if not isinstance(value, dict):
        raise fail(path, "(the whole file)", _short_value(value), "must be a JSON object")
    return value


def _short_value(value: Any) -> Any:
    return Raw(f"{type(value).__name__} of {len(value)} items") if isinstance(value, (list, str)) and len(value) > 8 \
        else value


# ---------------------------------------------------------------- tensors

_LAYER = re.compile(r"layers\.(\d+)\.")


def expected_shapes(config: LlamaConfig) -> dict[str, tuple[tuple[int, ...], str]]:
    """Our parameter name -> ``(shape, formula)`` for ``config`` (PyTorch order: ``[out, in]``).

    ``lm_head.weight`` is listed unless the embeddings are tied. Attention biases appear with
    ``attention_bias``.
    """
    C, I, V = config.hidden_size, config.intermediate_size, config.vocab_size
    q, kv = config.num_attention_heads * config.head_dim, config.num_key_value_heads * config.head_dim
    shapes = {"embed_tokens.weight": ((V, C), "(vocab, hidden)"), "norm.weight": ((C,), "(hidden,)")}
    if not config.tie_word_embeddings:
        shapes["lm_head.weight"] = ((V, C), "(vocab, hidden)")
    layer = {"input_layernorm.weight": ((C,), "(hidden,)"),
             "self_attn.q_proj.weight": ((q, C), "(heads*head_dim, hidden)"),
             "self_attn.k_proj.weight": ((kv, C), "(kv_heads*head_dim, hidden)"),
             "self_attn.v_proj.weight": ((kv, C), "(kv_heads*head_dim, hidden)"),
             "self_attn.o_proj.weight": ((C, q), "(hidden, heads*head_dim)"),
             "post_attention_layernorm.weight": ((C,), "(hidden,)"),
             "mlp.gate_proj.weight": ((I, C), "(intermediate, hidden)"),
             "mlp.up_proj.weight": ((I, C), "(intermediate, hidden)"),
             "mlp.down_proj.weight": ((C, I), "(hidden, intermediate)")}
    if config.attention_bias:
        layer.update({"self_attn.q_proj.bias": ((q,), "(heads*head_dim,)"),
                      "self_attn.k_proj.bias": ((kv,), "(kv_heads*head_dim,)"),
                      "self_attn.v_proj.bias": ((kv,), "(kv_heads*head_dim,)"),
                      "self_attn.o_proj.bias": ((C,), "(hidden,)")})
    for i in range(config.num_hidden_layers):
        shapes.update({f"layers.{i}.{k}": v for k, v in layer.items()})
    return shapes


def check_layer_count(source: Any, layers_key: str, layers: int, names: list[str]) -> None:
    """The layer indices in ``names`` (our names) must be exactly ``0 .. layers-1``."""
    found = sorted({int(m.group(1)) for n in names if (m := _LAYER.match(n))})
    if found != list(range(layers)):
        shown = ", ".join(map(str, found[:8])) + (", ..." if len(found) > 8 else "")
        raise fail(source, layers_key, layers,
                   f"the file has tensors for {len(found)} layers (indices {shown or 'none'})")


def check_tensor_shapes(source: Any, config: LlamaConfig, shapes: Mapping[str, tuple[int, ...]],
                        label: Callable[[str], str], optional: frozenset[str] = frozenset()) -> None:
    """Every tensor the config implies is present with its shape, and nothing else is.

    ``shapes``: our parameter name -> shape in PyTorch order. ``label``: our name -> the file's name
    (for messages). ``optional``: names that may be present (checked if so) or absent.
    """
    expected = expected_shapes(config)
    if config.tie_word_embeddings:
        expected["lm_head.weight"] = ((config.vocab_size, config.hidden_size), "(vocab, hidden)")
        optional = optional | {"lm_head.weight"}
    for name, shape in shapes.items():
        if name not in expected:
            raise fail(source, f"tensor {label(name)}", list(shape), "not a tensor of a LLaMA model with these "
                                                                     "settings")
    for name, (want, formula) in expected.items():
        if name in shapes and tuple(shapes[name]) != want:
            raise fail(source, f"tensor {label(name)} shape", list(shapes[name]), f"must be {list(want)} = {formula}")
    missing = [name for name in expected if name not in shapes and name not in optional]
    if missing:
        raise fail(source, f"tensor {label(missing[0])}", MISSING,
                   f"required by the config ({len(missing)} tensors missing)")
