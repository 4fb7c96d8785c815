"""A ``RopeConfig`` in and out of every place rope settings live: HF configs (v5 ``rope_parameters``
and v4 ``rope_scaling`` + top-level ``rope_theta``), GGUF metadata (``<arch>.rope.*`` keys and the
``rope_freqs`` / ``rope_factors_*`` tensors), llama.cpp flags (and llama-cpp-python's constructor
arguments) and vLLM (``--hf-overrides`` JSON + ``--max-model-len``).

Conversions are exact where both sides can express a configuration; where a target cannot, an
``Inexpressible`` error (a ``ValueError``) says what and why in one line, never a setting that does
something else. The semantics of the other runtimes were read in their sources (llama.cpp's
``llama-model.cpp`` / ``llama-context.cpp`` / ``ggml`` rope, vLLM's ``get_rope``):

- llama.cpp reads ``rope.scaling.type`` none/linear/yarn/longrope, ``factor`` (freq_scale = 1/factor),
  ``original_context_length`` (YaRN's L), ``attn_factor`` (a multiplier on YaRN's own
  ``0.1 ln f + 1``; its ``--yarn-attn-factor`` flag is overwritten for YaRN, so an explicit
  attention factor lives only in the file). For llama-family architectures it never reads the
  YaRN beta keys: non-default betas are flags only. Its YaRN ramp is always truncated. Llama 3's
  bands are a ``rope_freqs`` tensor of per-pair divisors; LongRoPE is ``rope_factors_long`` /
  ``rope_factors_short`` with the long factors chosen by the allocated context. Dynamic scaling
  does not exist there (only a fixed ``--rope-freq-base``).
- vLLM takes the HF ``rope_parameters`` (with ``rope_theta`` inside) through ``--hf-overrides``; its
  ``dynamic`` type is computed once at load, not per length, so it is not transformers' dynamic.
"""

from __future__ import annotations

import math
import numbers
import shlex
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from ropekit.rope import frequencies as freq
from ropekit.rope.config import RopeConfig
from ropekit.rope.params import check_number


class Inexpressible(ValueError):
    """The target format cannot express this configuration (the message says what and why)."""


# Architectures whose llama.cpp loader reads the YaRN beta keys from the file (llama-model.cpp).
GGUF_BETA_ARCHITECTURES = ("grok", "mistral3")
YARN_DEFAULT_BETAS = (32.0, 1.0)


def context_length(rc: RopeConfig) -> int | None:
    """The context a configuration is meant to run at: the trained length times the factor for the
    static scaling types (linear, ntk, yarn, llama3), ``max_position_embeddings`` otherwise."""
    original = rc.original_max_position_embeddings
    if rc.rope_type in ("linear", "ntk", "yarn", "llama3", "dynamic") and original:
        return int(round(original * rc.scale))
    return rc.max_position_embeddings


def _deploy_max_positions(rc: RopeConfig) -> int | None:
    """``max_position_embeddings`` to ship with a config: the target length, except for dynamic types,
    where it is the length past which scaling starts (transformers' semantics)."""
    if rc.rope_type in ("dynamic", "dynamic_yarn"):
        return rc.original_max_position_embeddings
    return context_length(rc)


# ---- Hugging Face -------------------------------------------------------------------------------


def _portable(rc: RopeConfig) -> RopeConfig:
    """``rc`` in rope types every runtime knows: static NTK-aware scaling (ropekit's ``ntk``, which
    transformers has no type for) is plain RoPE at the larger base b * s^(d/(d-2)), exactly."""
    if rc.rope_type != "ntk":
        return rc
    base = freq.ntk_base(rc.rope_theta, rc.rotary_dim, rc.params.factor)
    return rc.with_rope_type({"rope_type": "default", "rope_theta": base})


def to_hf(rc: RopeConfig) -> dict:
    """transformers 5 (``rope_parameters`` with ``rope_theta`` inside) plus the context to run at."""
    out = _portable(rc).to_hf()
    out["max_position_embeddings"] = _deploy_max_positions(rc)
    return out


def to_hf_legacy(rc: RopeConfig) -> dict:
    """transformers 4 (``rope_scaling`` with both ``type`` and ``rope_type``, top-level ``rope_theta``)."""
    ctx = _deploy_max_positions(rc)
    rc = _portable(rc)
    out: dict[str, Any] = {"rope_theta": rc.rope_theta, "head_dim": rc.head_dim}
    if rc.partial_rotary_factor != 1.0:
        out["partial_rotary_factor"] = rc.partial_rotary_factor
    if rc.rope_type == "default":
        out["rope_scaling"] = None
    else:
        out["rope_scaling"] = {"type": rc.rope_type, "rope_type": rc.rope_type, **rc.params.to_hf()}
    out["max_position_embeddings"] = ctx
    return out


# ---- GGUF ---------------------------------------------------------------------------------------


def _yarn_file_attn_factor(rc: RopeConfig) -> float | None:
    """The ``rope.scaling.attn_factor`` that makes llama.cpp's YaRN magnitude equal ours (None: llama.cpp's
    own ``0.1 ln f + 1`` already does)."""
    p = rc.params
    ours = freq.yarn_attention_factor(p.factor, p)
    default = freq.yarn_mscale(p.factor)
    return None if math.isclose(ours, default, rel_tol=0, abs_tol=1e-12) else ours / default


def llama3_freq_factors(rc: RopeConfig) -> list[float]:
    """llama.cpp's ``rope_freqs`` tensor for a Llama 3 configuration: each pair's default frequency divided
    by its Llama 3 one (llama.cpp divides the angle of pair i by entry i)."""
    default = freq.base_inv_freq(rc.rope_theta, rc.rotary_dim)
    scaled, _ = freq.llama3_frequencies(rc.rope_theta, rc.rotary_dim, rc.params)
    return (default / scaled).tolist()


def to_gguf(rc: RopeConfig, arch: str = "llama") -> dict[str, Any]:
    """GGUF metadata for ``rc`` under ``arch`` (keys ``<arch>.rope.*`` and ``<arch>.context_length``).
    Entries whose name ends in ``.weight`` are tensors (lists of float32 values) the file must carry."""
    prefix = f"{arch}.rope"
    out: dict[str, Any] = {f"{prefix}.freq_base": float(rc.rope_theta), f"{prefix}.dimension_count": rc.rotary_dim}
    ctx = context_length(rc)
    if ctx is not None:
        out[f"{arch}.context_length"] = int(ctx)
    kind, p = rc.rope_type, rc.params
    if kind == "default":
        out[f"{prefix}.scaling.type"] = "none"
    elif kind == "linear":
        out.update({f"{prefix}.scaling.type": "linear", f"{prefix}.scaling.factor": float(p.factor)})
    elif kind == "ntk":  # static NTK-aware scaling is plain RoPE at a larger base
        out[f"{prefix}.freq_base"] = float(freq.ntk_base(rc.rope_theta, rc.rotary_dim, p.factor))
        out[f"{prefix}.scaling.type"] = "none"
    elif kind == "yarn":
        if not p.truncate:
            raise Inexpressible("gguf: llama.cpp always truncates the YaRN ramp; 'truncate: false' has no equivalent")
        out.update({f"{prefix}.scaling.type": "yarn", f"{prefix}.scaling.factor": float(p.factor),
                    f"{prefix}.scaling.original_context_length": int(p.original_max_position_embeddings)})
        if (p.beta_fast, p.beta_slow) != YARN_DEFAULT_BETAS:
            if arch not in GGUF_BETA_ARCHITECTURES:
                raise Inexpressible(f"gguf: llama.cpp does not read YaRN betas from '{arch}' files (beta_fast="
                                    f"{p.beta_fast:g}, beta_slow={p.beta_slow:g}); pass them as flags (--to llama.cpp)")
            out.update({f"{prefix}.scaling.yarn_beta_fast": float(p.beta_fast),
                        f"{prefix}.scaling.yarn_beta_slow": float(p.beta_slow)})
        attn = _yarn_file_attn_factor(rc)
        if attn is not None:
            out[f"{prefix}.scaling.attn_factor"] = float(attn)
    elif kind == "llama3":  # llama.cpp reads only the tensor; the length lets readers recover the bands exactly
        out[f"{prefix}.scaling.type"] = "none"
        out[f"{prefix}.scaling.original_context_length"] = int(p.original_max_position_embeddings)
        out["rope_freqs.weight"] = llama3_freq_factors(rc)
    elif kind == "longrope":
        out.update({f"{prefix}.scaling.type": "longrope",
                    f"{prefix}.scaling.original_context_length": int(p.original_max_position_embeddings),
                    f"{prefix}.scaling.attn_factor": float(rc.frequencies(None)[1]),
                    "rope_factors_long.weight": list(p.long_factor), "rope_factors_short.weight": list(p.short_factor)})
    else:
        raise Inexpressible(f"gguf: llama.cpp has no rope type like {kind!r} (it computes no per-length base)")
    return out


# The largest context length a GGUF file may give (far above any released model; the loaders' cap too).
MAX_GGUF_CONTEXT = 1 << 24
GGUF_SCALING_TYPES = ("none", "linear", "yarn", "longrope")
# The tensors that carry rope factors: Llama 3's per-pair divisors, LongRoPE's long and short factors.
GGUF_ROPE_TENSORS = ("rope_freqs.weight", "rope_factors_long.weight", "rope_factors_short.weight")


def _shown(value: Any) -> str:
    """A metadata value as an error message shows it: numbers as written, strings quoted and shortened,
    arrays by their size."""
    if isinstance(value, numbers.Real) and not isinstance(value, bool):
        return str(value)
    if isinstance(value, str):
        return repr(value[:100])
    if isinstance(value, Sequence) or hasattr(value, "__array__"):
        try:
            return f"an array of {len(value)} values"
        except TypeError:
            pass
    return repr(value)[:100]


def _bound(x: float) -> str:
    """A range end as a message writes it: ``1``, ``0.5``, ``16777216``, ``inf``."""
    return str(int(x)) if math.isfinite(x) and float(x).is_integer() else f"{x:g}"


def _gguf_error(key: str, value: Any, allowed: str) -> ValueError:
    """``"<key> = <value>: <allowed>"``, the one-line message for a bad GGUF key."""
    return ValueError(f"{key} = {_shown(value)}: {allowed}")


def _gguf_number(metadata: Mapping, key: str, default: Any = None, *, low: float = -math.inf,
                 high: float = math.inf, low_open: bool = False, integer: bool = False,
                 required: bool = False) -> Any:
    """``metadata[key]`` (``default`` when absent; None when both are) checked: a finite number in
    ``[low, high]`` (``(low, high]`` with ``low_open``), a whole one for ``integer``; else a ValueError
    naming the key. Returns an int for ``integer``, a float otherwise."""
    value = metadata.get(key, default)
    if value is None:
        if required:
            raise ValueError(f"{key} = (missing): required")
        return None
    real = isinstance(value, numbers.Real) and not isinstance(value, bool)
    finite = real and (isinstance(value, numbers.Integral) or math.isfinite(value))
    if integer:
        whole = finite and (isinstance(value, numbers.Integral) or float(value).is_integer())
        if not whole or not low <= value <= high:
            raise _gguf_error(key, value, f"must be an integer in [{_bound(low)}, {_bound(high)}]")
        return int(value)
    allowed = f"must be a finite number in {'(' if low_open else '['}{_bound(low)}, {_bound(high)}]"
    if not finite or (value <= low if low_open else value < low) or value > high:
        raise _gguf_error(key, value, allowed)
    return float(value)


def _gguf_scaling_type(metadata: Mapping, key: str) -> str:
    """``<arch>.rope.scaling.type``: one of ``GGUF_SCALING_TYPES`` ("none" when absent)."""
    kind = metadata.get(key, "none")
    if kind is None:
        return "none"
    if not isinstance(kind, str) or kind not in GGUF_SCALING_TYPES:
        raise _gguf_error(key, kind, f"unsupported GGUF rope scaling type (known: {', '.join(GGUF_SCALING_TYPES)})")
    return kind


def _infer_llama3(factors: Sequence[float], base: float, rotary_dim: int, original: int | None,
                  context: int | None = None) -> dict[str, Any]:
    """The Llama 3 parameters that produce ``factors`` (a ``rope_freqs`` tensor): factor = the largest entry;
    the trained length and band edges are searched among the values Meta's configs use and checked by
    recomputing the tensor."""
    values = [float(v) for v in factors]
    if len(values) != rotary_dim // 2:
        raise ValueError(f"GGUF tensor rope_freqs.weight has {len(values)} entries; the rope rotates {rotary_dim} "
                         f"channels, so it must have {rotary_dim // 2}")
    if not all(math.isfinite(v) and v > 0 for v in values):
        raise ValueError("GGUF tensor rope_freqs.weight must hold finite divisors > 0")
    factor = max(values)
    lengths = [original] if original else [2**k for k in range(10, 18)]
    if not original and context:
        lengths.insert(0, int(round(context / factor)))
    # band edges only depend on L/low and L/high: search Meta's low_freq_factor 1 first
    for low in (1.0, 0.5, 2.0):
        for length in lengths:
            for high in (4.0, 2.0, 8.0, 16.0):
                if high <= low:
                    continue
                rope = {"rope_type": "llama3", "rope_theta": base, "factor": factor, "low_freq_factor": low,
                        "high_freq_factor": high, "original_max_position_embeddings": length}
                rc = RopeConfig.from_hf({"head_dim": rotary_dim, "rope_parameters": rope})
                if torch.allclose(torch.tensor(llama3_freq_factors(rc)), torch.tensor(values), rtol=1e-5, atol=0):
                    return rope
    raise ValueError(f"GGUF tensor rope_freqs.weight ({len(values)} entries, max {factor:g}) matches no Llama 3 "
                     "band configuration; pass the rope explicitly")


def from_gguf(metadata: Mapping[str, Any], tensors: Mapping[str, Sequence[float]] | None = None) -> RopeConfig:
    """The rope of a GGUF file from its metadata (and its ``rope_freqs`` / ``rope_factors_*`` tensors), read
    as llama.cpp reads it: a ``rope_freqs`` tensor is Llama 3's bands, ``rope_factors_long`` / ``_short``
    (or scaling type ``longrope``) LongRoPE, a linear or YaRN factor of 0 or 1 no scaling.

    Every key is checked first; a bad one raises a ValueError ``"<key> = <value>: <what is allowed>"``.
    """
    arch = metadata.get("general.architecture")
    if not isinstance(arch, str):
        raise ValueError("GGUF metadata general.architecture is missing or not a string")
    tensors = tensors or {}
    p = f"{arch}.rope"
    heads = _gguf_number(metadata, f"{arch}.attention.head_count", low=1, integer=True, required=True)
    hidden = _gguf_number(metadata, f"{arch}.embedding_length", low=1, integer=True, required=True)
    head_dim = _gguf_number(metadata, f"{arch}.attention.key_length", hidden // heads, low=2, integer=True)
    rotary = _gguf_number(metadata, f"{p}.dimension_count", head_dim, low=2, high=head_dim, integer=True)
    if rotary % 2:
        raise _gguf_error(f"{p}.dimension_count", rotary, "must be even (rope rotates pairs of channels)")
    theta = _gguf_number(metadata, f"{p}.freq_base", 10000.0, low=1.0, low_open=True)
    ctx = _gguf_number(metadata, f"{arch}.context_length", low=1, high=MAX_GGUF_CONTEXT, integer=True)
    original = _gguf_number(metadata, f"{p}.scaling.original_context_length", low=1, high=MAX_GGUF_CONTEXT,
                            integer=True)
    kind = _gguf_scaling_type(metadata, f"{p}.scaling.type")
    factor = _gguf_number(metadata, f"{p}.scaling.factor", low=0.0)
    rope: dict[str, Any] = {"rope_type": "default", "rope_theta": theta}
    if "rope_freqs.weight" in tensors:
        rope = _infer_llama3(tensors["rope_freqs.weight"], theta, rotary, original, ctx)
    elif kind == "longrope" or "rope_factors_long.weight" in tensors:
        rope = {"rope_type": "longrope", "rope_theta": theta,
                "long_factor": [float(v) for v in tensors.get("rope_factors_long.weight", [])],
                "short_factor": [float(v) for v in tensors.get("rope_factors_short.weight", [])],
                "original_max_position_embeddings": original or ctx}
        attn = _gguf_number(metadata, f"{p}.scaling.attn_factor", low=0.0, low_open=True)
        if attn is not None:
            rope["attention_factor"] = attn
    elif kind in ("linear", "yarn") and factor not in (None, 0.0, 1.0):
        factor = _gguf_number(metadata, f"{p}.scaling.factor", low=1.0)
        rope = {"rope_type": kind, "rope_theta": theta, "factor": factor}
        if kind == "yarn":
            rope.update(_gguf_yarn_extras(metadata, arch, factor, original or ctx))
    if rotary != head_dim:
        rope["partial_rotary_factor"] = rotary / head_dim
    config = {"head_dim": head_dim, "rope_parameters": rope}
    if ctx is not None:
        config["max_position_embeddings"] = ctx
    return RopeConfig.from_hf(config)


def _gguf_yarn_extras(metadata: Mapping[str, Any], arch: str, factor: float, original: int | None) -> dict[str, Any]:
    """YaRN's trained length, betas (read from the file only for ``GGUF_BETA_ARCHITECTURES``, as llama.cpp
    does) and attention factor (the file's ``attn_factor`` multiplies llama.cpp's ``0.1 ln f + 1``)."""
    p = f"{arch}.rope.scaling"
    out: dict[str, Any] = {} if original is None else {"original_max_position_embeddings": original}
    if arch in GGUF_BETA_ARCHITECTURES:
        for key, name in (("yarn_beta_fast", "beta_fast"), ("yarn_beta_slow", "beta_slow")):
            beta = _gguf_number(metadata, f"{p}.{key}")
            if beta is not None:
                out[name] = beta
    attn = _gguf_number(metadata, f"{p}.attn_factor", low=0.0, low_open=True)
    if attn is not None and attn != 1.0:
        out["attention_factor"] = attn * freq.yarn_mscale(factor)
    return out


# ---- llama.cpp ------------------------------------------------------------------------------------


def _check_flags_expressible(rc: RopeConfig) -> None:
    kind = rc.rope_type
    if kind in ("llama3", "longrope"):
        raise Inexpressible(f"llama.cpp: {kind} needs per-pair factor tensors in the GGUF file; no flag sets them "
                            "(use --to gguf --out NEW.gguf)")
    if kind in ("dynamic", "dynamic_yarn", "proportional"):
        raise Inexpressible(f"llama.cpp has no rope type like {kind!r} (it computes no per-length base)")
    if kind == "yarn":
        if not rc.params.truncate:
            raise Inexpressible("llama.cpp: the YaRN ramp is always truncated; 'truncate: false' has no flag")
        if _yarn_file_attn_factor(rc) is not None:
            raise Inexpressible("llama.cpp: for YaRN --yarn-attn-factor is overwritten; an explicit attention factor "
                                "(attention_factor / mscale) lives only in the file (use --to gguf)")


def to_llama_cpp_python(rc: RopeConfig) -> dict[str, Any]:
    """llama-cpp-python's ``Llama(...)`` rope arguments (the ones its wrapper must not default: the YaRN
    attention factor and betas are passed as -1, "from the file", unless set)."""
    _check_flags_expressible(rc)
    kind, p = rc.rope_type, rc.params
    out: dict[str, Any] = {"rope_freq_base": float(rc.rope_theta), "yarn_attn_factor": -1.0,
                           "yarn_beta_fast": -1.0, "yarn_beta_slow": -1.0, "yarn_ext_factor": -1.0}
    if kind in ("default", "ntk"):
        out.update(rope_scaling_type=0, rope_freq_scale=1.0)  # LLAMA_ROPE_SCALING_TYPE_NONE
        if kind == "ntk":
            out["rope_freq_base"] = float(freq.ntk_base(rc.rope_theta, rc.rotary_dim, p.factor))
    elif kind == "linear":
        out.update(rope_scaling_type=1, rope_freq_scale=1.0 / p.factor)
    elif kind == "yarn":
        out.update(rope_scaling_type=2, rope_freq_scale=1.0 / p.factor,
                   yarn_orig_ctx=int(p.original_max_position_embeddings))
        if (p.beta_fast, p.beta_slow) != YARN_DEFAULT_BETAS:
            out.update(yarn_beta_fast=float(p.beta_fast), yarn_beta_slow=float(p.beta_slow))
    ctx = context_length(rc)
    if ctx:
        out["n_ctx"] = int(ctx)
    return out


def to_llama_cpp(rc: RopeConfig) -> list[str]:
    """llama.cpp command-line flags (``llama-cli``, ``llama-server``, ``llama-perplexity``, ...) for ``rc``."""
    kw = to_llama_cpp_python(rc)
    flags = ["--rope-scaling", {0: "none", 1: "linear", 2: "yarn"}[kw["rope_scaling_type"]]]
    if kw["rope_scaling_type"] != 0:
        flags += ["--rope-scale", _num(1.0 / kw["rope_freq_scale"])]
    flags += ["--rope-freq-base", _num(kw["rope_freq_base"])]
    if "yarn_orig_ctx" in kw:
        flags += ["--yarn-orig-ctx", str(kw["yarn_orig_ctx"])]
    if kw["yarn_beta_fast"] >= 0:
        flags += ["--yarn-beta-fast", _num(kw["yarn_beta_fast"]), "--yarn-beta-slow", _num(kw["yarn_beta_slow"])]
    if "n_ctx" in kw:
        flags += ["-c", str(kw["n_ctx"])]
    return flags


def _num(value: float) -> str:
    return f"{value:.10g}"


LLAMA_CPP_FLAGS = {
    "--rope-scaling": "type", "--rope-scale": "scale", "--rope-freq-scale": "freq_scale",
    "--rope-freq-base": "base", "--yarn-orig-ctx": "orig", "--yarn-beta-fast": "beta_fast",
    "--yarn-beta-slow": "beta_slow", "--yarn-ext-factor": "ext", "--yarn-attn-factor": "attn",
    "-c": "ctx", "--ctx-size": "ctx", "--grp-attn-n": "group", "-gan": "group", "--grp-attn-w": "window",
    "-gaw": "window",
}


def parse_llama_cpp_flags(flags: str | Sequence[str]) -> dict[str, str]:
    """``"--rope-scaling yarn --rope-scale 2"`` -> ``{"type": "yarn", "scale": "2"}`` (flag=value also
    accepted); unknown flags and flags without a value raise ValueError naming them."""
    tokens = shlex.split(flags) if isinstance(flags, str) else list(flags)
    out: dict[str, str] = {}
    i = 0
    while i < len(tokens):
        flag, eq, value = tokens[i].partition("=")
        if flag not in LLAMA_CPP_FLAGS:
            raise ValueError(f"llama.cpp flag {flag!r} is not a rope flag ropekit reads; known: "
                             f"{', '.join(LLAMA_CPP_FLAGS)}")
        if not eq:
            if i + 1 >= len(tokens):
                raise ValueError(f"llama.cpp flag {flag} needs a value")
            value, i = tokens[i + 1], i + 1
        name = LLAMA_CPP_FLAGS[flag]
        if name in out:
            raise ValueError(f"llama.cpp flag {flag} is given twice")
        out[name] = value
        i += 1
    return out


def _flag_number(values: dict[str, str], name: str, flag: str, **limits) -> float | None:
    if name not in values:
        return None
    try:
        number = float(values[name])
    except ValueError:
        raise ValueError(f"llama.cpp flag {flag} must be a number, got {values[name]!r}") from None
    return check_number(flag, number, what="llama.cpp flag", **limits)


def from_llama_cpp(flags: str | Sequence[str], base: RopeConfig) -> RopeConfig:
    """The rope llama.cpp runs with ``flags`` on a model whose file rope is ``base`` (flags not given keep
    the file's values). The Self-Extend flags are the extension layer's (``ropekit.convert``)."""
    values = parse_llama_cpp_flags(flags)
    theta = _flag_number(values, "base", "--rope-freq-base", low=0.0, low_open=True) or base.rope_theta
    scale = _flag_number(values, "scale", "--rope-scale", low=1.0)
    freq_scale = _flag_number(values, "freq_scale", "--rope-freq-scale", low=0.0, high=1.0, low_open=True)
    if scale is not None and freq_scale is not None and not math.isclose(scale * freq_scale, 1.0):
        raise ValueError(f"llama.cpp flags --rope-scale {scale:g} and --rope-freq-scale {freq_scale:g} disagree")
    factor = scale if scale is not None else (1.0 / freq_scale if freq_scale is not None else None)
    kind = values.get("type")
    if kind is not None and kind not in ("none", "linear", "yarn"):
        raise ValueError(f"llama.cpp flag --rope-scaling must be none, linear or yarn, got {kind!r}")
    ext = _flag_number(values, "ext", "--yarn-ext-factor")
    if ext is not None and ext >= 0 and ext not in (0.0, 1.0):
        raise Inexpressible(f"--yarn-ext-factor {ext:g}: only 1 (YaRN) and 0 (plain interpolation) map to rope types")
    own = base.to_hf()["rope_parameters"]
    if kind is None:  # the file's type; a bare --rope-scale rescales it (linear for a file without scaling)
        kind = {"default": "none" if factor is None else "linear", "linear": "linear", "yarn": "yarn"}.get(
            base.rope_type)
        if kind is None:
            if factor is not None:
                raise Inexpressible(f"llama.cpp: --rope-scale on a {base.rope_type} file has no rope-type equivalent")
            return base.with_rope_type({**own, "rope_theta": theta})
    if factor is None and kind == base.rope_type:
        factor = base.scale
    if kind == "none" or (kind == "linear" and factor in (None, 1.0)):
        return base.with_rope_type({"rope_type": "default", "rope_theta": theta})
    if kind == "linear" or ext == 0.0:
        return base.with_rope_type({"rope_type": "linear", "factor": factor or 1.0, "rope_theta": theta})
    rope: dict[str, Any] = {"rope_type": "yarn", "rope_theta": theta, "factor": factor or 1.0}
    orig = _flag_number(values, "orig", "--yarn-orig-ctx", low=0, integer=True)
    rope["original_max_position_embeddings"] = int(orig) if orig else base.original_max_position_embeddings
    for name, flag in (("beta_fast", "--yarn-beta-fast"), ("beta_slow", "--yarn-beta-slow")):
        value = _flag_number(values, name, flag)
        if value is not None and value >= 0:
            rope[name] = value
        elif base.rope_type == "yarn":
            rope[name] = getattr(base.params, name)
    return base.with_rope_type(rope)


# ---- vLLM -----------------------------------------------------------------------------------------


def to_vllm(rc: RopeConfig) -> dict[str, Any]:
    """``{"hf_overrides": {...}, "max_model_len": N}`` for ``vllm serve --hf-overrides JSON --max-model-len N``
    (transformers-5 style ``rope_parameters`` with ``rope_theta`` inside; ``max_position_embeddings`` raised to
    the target, since vLLM does not multiply it by the YaRN / Llama 3 / LongRoPE factor)."""
    if rc.rope_type in ("dynamic", "dynamic_yarn"):
        raise Inexpressible(f"vllm: its {rc.rope_type!r} is computed once at load for max_model_len, not per "
                            "sequence length as in transformers; no equivalent")
    hf = to_hf(rc)
    ctx = hf["max_position_embeddings"]
    overrides = {"rope_parameters": hf["rope_parameters"]}
    if ctx is not None:
        overrides["max_position_embeddings"] = ctx
    out: dict[str, Any] = {"hf_overrides": overrides}
    if ctx is not None:
        out["max_model_len"] = ctx
    return out
