"""Typed parameter sets, one per rope type, and the validators they share.

Each dataclass holds exactly the keys its method reads from a Hugging Face
``rope_parameters`` dict. ``parse`` builds it from such a dict and raises a
``ValueError`` naming the key, the value and the allowed range for anything unusable.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, fields
from typing import Any

# Keys every rope_parameters dict may carry besides the method's own.
COMMON_KEYS = frozenset({"rope_type", "type", "rope_theta", "partial_rotary_factor"})


def check_number(key: str, value: Any, *, low: float | None = None, high: float | None = None,
                 low_open: bool = False, integer: bool = False) -> float:
    """Return ``value`` as a float (or int) if it is a finite number inside the range, else raise.

    The range is ``[low, high]`` (``(low, high]`` with ``low_open``); ``None`` means unbounded.
    """
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"rope key {key!r} must be a number, got {value!r}")
    if not math.isfinite(value):
        raise ValueError(f"rope key {key!r} must be finite, got {value!r}")
    if integer and value != int(value):
        raise ValueError(f"rope key {key!r} must be an integer, got {value!r}")
    too_low = low is not None and (value <= low if low_open else value < low)
    if too_low or (high is not None and value > high):
        left = "(" if low_open else "["
        raise ValueError(f"rope key {key!r}={value!r} is out of range {left}{low}, {high}]")
    return int(value) if integer else float(value)


def optional_number(raw: dict, key: str, **limits: Any) -> float | None:
    """``check_number`` for a key that may be absent or None."""
    value = raw.get(key)
    return None if value is None else check_number(key, value, **limits)


def warn_unknown_keys(rope_type: str, raw: dict, known: set[str]) -> None:
    """Warn, as transformers does, about keys the method will ignore."""
    unknown = set(raw) - known - COMMON_KEYS
    if unknown:
        warnings.warn(f"rope_type {rope_type!r} ignores unrecognized keys {sorted(unknown)}", stacklevel=4)


@dataclass(frozen=True)
class MethodParams:
    """Base class: a method's typed parameters. Subclasses add fields."""

    @classmethod
    def parse(cls, raw: dict, context: dict) -> MethodParams:
        """Build from an HF rope_parameters dict; ``context`` has model-level keys."""
        warn_unknown_keys(context["rope_type"], raw, {f.name for f in fields(cls)})
        return cls()

    def to_hf(self) -> dict:
        """The non-None fields as an HF rope_parameters fragment."""
        out = {}
        for field in fields(self):
            value = getattr(self, field.name)
            if value is not None:
                out[field.name] = list(value) if isinstance(value, tuple) else value
        return out


def parse_factor(raw: dict, default: float | None = None) -> float:
    """The scale factor s >= 1 (a factor below 1 would shrink the context)."""
    if raw.get("factor") is None:
        if default is None:
            raise ValueError("rope key 'factor' is required, allowed range [1, inf)")
        return default
    return check_number("factor", raw["factor"], low=1.0)


def original_length(raw: dict, context: dict, required: bool = True) -> int | None:
    """The trained context length: rope_parameters, else the model's top-level keys."""
    value = raw.get("original_max_position_embeddings")
    if value is None:
        value = context.get("original_max_position_embeddings") or context.get("max_position_embeddings")
    if value is None:
        if required:
            raise ValueError(
                f"rope_type {context['rope_type']!r} needs 'original_max_position_embeddings' (or the model's "
                "'max_position_embeddings'), an integer in [1, inf); neither was given")
        return None
    return check_number("original_max_position_embeddings", value, low=1, integer=True)


@dataclass(frozen=True)
class DefaultParams(MethodParams):
    """Plain RoPE (Su et al. 2021): no parameters beyond the base."""


@dataclass(frozen=True)
class LinearParams(MethodParams):
    """Position interpolation (Chen et al. 2023, Eq. 4): positions divided by ``factor``."""

    factor: float = 1.0

    FACTOR_DEFAULT = None  # required

    @classmethod
    def parse(cls, raw: dict, context: dict) -> LinearParams:
        warn_unknown_keys(context["rope_type"], raw, {"factor"})
        return cls(factor=parse_factor(raw, default=cls.FACTOR_DEFAULT))


@dataclass(frozen=True)
class DynamicParams(MethodParams):
    """Dynamic NTK (transformers ``dynamic``): base grows with the current length past the original."""

    factor: float = 1.0
    original_max_position_embeddings: int | None = None

    @classmethod
    def parse(cls, raw: dict, context: dict) -> DynamicParams:
        warn_unknown_keys(context["rope_type"], raw, {"factor", "original_max_position_embeddings"})
        original = raw.get("original_max_position_embeddings")
        if original is not None:
            original = check_number("original_max_position_embeddings", original, low=1, integer=True)
        elif context.get("max_position_embeddings") is None:
            original_length(raw, context)  # raises: dynamic needs some length to compare against
        return cls(factor=parse_factor(raw), original_max_position_embeddings=original)


@dataclass(frozen=True)
class NtkParams(MethodParams):
    """Static NTK-aware scaling (bloc97 2023; YaRN paper Sec. 3.1): base * s^(d/(d-2))."""

    factor: float = 1.0

    @classmethod
    def parse(cls, raw: dict, context: dict) -> NtkParams:
        warn_unknown_keys(context["rope_type"], raw, {"factor", "alpha"})
        factor = None if raw.get("factor") is None else check_number("factor", raw["factor"], low=1.0)
        alpha = None if raw.get("alpha") is None else check_number("alpha", raw["alpha"], low=1.0)
        if factor is not None and alpha is not None and factor != alpha:
            raise ValueError(f"rope_type 'ntk' takes 'factor' or 'alpha' (synonyms), got factor={factor} "
                             f"and alpha={alpha}")
        if factor is None and alpha is None:
            raise ValueError("rope_type 'ntk' needs 'factor' (or 'alpha'), a number in [1, inf)")
        return cls(factor=factor if factor is not None else alpha)


def parse_yarn_common(raw: dict) -> dict:
    """Fields YaRN and dynamic YaRN share, validated."""
    beta_fast = raw.get("beta_fast") or 32
    beta_slow = raw.get("beta_slow") or 1
    beta_fast = check_number("beta_fast", beta_fast, low=0.0, low_open=True)
    beta_slow = check_number("beta_slow", beta_slow, low=0.0, low_open=True)
    if beta_fast < beta_slow:
        raise ValueError(f"rope key 'beta_fast'={beta_fast} must be >= 'beta_slow'={beta_slow}")
    truncate = raw.get("truncate", True)
    if not isinstance(truncate, bool):
        raise ValueError(f"rope key 'truncate' must be true or false, got {truncate!r}")
    return {
        "beta_fast": float(beta_fast),
        "beta_slow": float(beta_slow),
        "truncate": truncate,
        "attention_factor": optional_number(raw, "attention_factor", low=0.0, low_open=True),
        "mscale": optional_number(raw, "mscale", low=0.0),
        "mscale_all_dim": optional_number(raw, "mscale_all_dim", low=0.0),
    }


YARN_KEYS = {"factor", "original_max_position_embeddings", "beta_fast", "beta_slow", "truncate",
             "attention_factor", "mscale", "mscale_all_dim"}


@dataclass(frozen=True)
class YarnRampParams(MethodParams):
    """The fields YaRN and dynamic YaRN share: the trained length, the ramp and the temperature."""

    original_max_position_embeddings: int = 0
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    truncate: bool = True
    attention_factor: float | None = None
    mscale: float | None = None
    mscale_all_dim: float | None = None


@dataclass(frozen=True)
class YarnParams(YarnRampParams):
    """YaRN (Peng et al. 2023, Sec. 3.4): NTK-by-parts ramp plus attention temperature."""

    factor: float = 1.0

    @classmethod
    def parse(cls, raw: dict, context: dict) -> YarnParams:
        warn_unknown_keys(context["rope_type"], raw, YARN_KEYS)
        original = original_length(raw, context)
        if raw.get("factor") is None and context.get("max_position_embeddings"):
            factor = check_number("factor", context["max_position_embeddings"] / original, low=1.0)
        else:
            factor = parse_factor(raw)
        return cls(factor=factor, original_max_position_embeddings=original, **parse_yarn_common(raw))


@dataclass(frozen=True)
class DynamicYarnParams(YarnRampParams):
    """YaRN whose factor follows the sequence: s = max(1, seq_len / original length)."""

    @classmethod
    def parse(cls, raw: dict, context: dict) -> DynamicYarnParams:
        warn_unknown_keys(context["rope_type"], raw, YARN_KEYS - {"factor"})
        return cls(original_max_position_embeddings=original_length(raw, context), **parse_yarn_common(raw))


@dataclass(frozen=True)
class LongRopeParams(MethodParams):
    """LongRoPE / Phi-3 (Ding et al. 2024): per-pair rescale factors, long or short by length."""

    short_factor: tuple[float, ...] = ()
    long_factor: tuple[float, ...] = ()
    original_max_position_embeddings: int = 0
    factor: float | None = None
    attention_factor: float | None = None

    @classmethod
    def parse(cls, raw: dict, context: dict) -> LongRopeParams:
        warn_unknown_keys(context["rope_type"], raw, {f.name for f in fields(cls)})
        pairs = context["rotary_dim"] // 2
        lists = {key: _factor_list(key, raw.get(key), pairs) for key in ("short_factor", "long_factor")}
        factor = None if raw.get("factor") is None else check_number("factor", raw["factor"], low=1.0)
        return cls(original_max_position_embeddings=original_length(raw, context), factor=factor,
                   attention_factor=optional_number(raw, "attention_factor", low=0.0, low_open=True), **lists)


def _factor_list(key: str, value: Any, pairs: int) -> tuple[float, ...]:
    """A LongRoPE factor list: exactly ``pairs`` positive finite numbers."""
    if not isinstance(value, (list, tuple)):
        raise ValueError(f"rope key {key!r} must be a list of {pairs} numbers (rotary_dim/2), got {value!r}")
    if len(value) != pairs:
        raise ValueError(f"rope key {key!r} must have length {pairs} (rotary_dim/2), got length {len(value)}")
    return tuple(check_number(f"{key}[{i}]", v, low=0.0, low_open=True) for i, v in enumerate(value))


@dataclass(frozen=True)
class Llama3Params(MethodParams):
    """Llama 3.1 frequency bands (Meta's ``apply_scaling``)."""

    factor: float = 8.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192

    @classmethod
    def parse(cls, raw: dict, context: dict) -> Llama3Params:
        warn_unknown_keys(context["rope_type"], raw, {f.name for f in fields(cls)})
        for key in ("low_freq_factor", "high_freq_factor"):
            if raw.get(key) is None:
                raise ValueError(f"rope_type 'llama3' needs {key!r}, a number in (0, inf)")
        low = check_number("low_freq_factor", raw["low_freq_factor"], low=0.0, low_open=True)
        high = check_number("high_freq_factor", raw["high_freq_factor"], low=0.0, low_open=True)
        if high <= low:
            raise ValueError(f"rope key 'high_freq_factor'={high} must be > 'low_freq_factor'={low}")
        original = original_length(raw, context)
        max_len = context.get("max_position_embeddings")
        if max_len is not None and original > max_len:  # equal is how with_method() describes a model
            warnings.warn(f"llama3: original_max_position_embeddings={original} should not exceed "
                          f"max_position_embeddings={max_len}", stacklevel=3)
        return cls(factor=parse_factor(raw), low_freq_factor=low, high_freq_factor=high,
                   original_max_position_embeddings=original)


@dataclass(frozen=True)
class ProportionalParams(LinearParams):
    """Proportional RoPE (transformers, Gemma 4): partial rotation with full-dim frequencies.

    Same single ``factor`` as linear, but optional (default 1).
    """

    FACTOR_DEFAULT = 1.0
