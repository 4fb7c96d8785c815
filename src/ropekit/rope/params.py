"""Typed parameter sets, one per rope type, and the rules that validate their keys.

Each dataclass holds exactly the keys its rope type reads from a Hugging Face
``rope_parameters`` dict. Its ``KEYS`` table gives the rule of every key (a number in a range,
a flag, a factor list); ``check_keys`` applies those rules alone (no model needed: a method is
checked this way before a model is loaded), and ``parse(raw, context)`` applies them and then
the checks that need the model's geometry (``context``: rotary dim, trained length). Every
problem is a ``ValueError`` naming the key, the value and the allowed range.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any, ClassVar

# Keys every rope_parameters dict may carry besides the type's own.
COMMON_KEYS = frozenset({"rope_type", "type", "rope_theta", "partial_rotary_factor"})


def check_number(key: str, value: Any, *, low: float | None = None, high: float | None = None,
                 low_open: bool = False, integer: bool = False, what: str = "rope key") -> float:
    """Return ``value`` as a float (or int) if it is a finite number inside the range, else raise.

    The range is ``[low, high]`` (``(low, high]`` with ``low_open``); ``None`` means unbounded.
    ``what`` names the kind of key in the message ("rope key", "self-extend key", ...).
    """
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{what} {key!r} must be a number, got {value!r}")
    if not math.isfinite(value):
        raise ValueError(f"{what} {key!r} must be finite, got {value!r}")
    if integer and value != int(value):
        raise ValueError(f"{what} {key!r} must be an integer, got {value!r}")
    too_low = low is not None and (value <= low if low_open else value < low)
    if too_low or (high is not None and value > high):
        left = "(" if low_open else "["
        raise ValueError(f"{what} {key!r}={value!r} is out of range {left}{low}, {high}]")
    return int(value) if integer else float(value)


_TRUE, _FALSE = ("true", "yes", "1"), ("false", "no", "0")


def check_flag(key: str, value: Any, what: str = "rope key") -> bool:
    """A boolean: true/false, 1/0, or the strings true/false/yes/no/1/0 (any case); anything else raises."""
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in _TRUE + _FALSE:
        return value.strip().lower() in _TRUE
    raise ValueError(f"{what} {key!r} must be true or false (also 1/0, yes/no), got {value!r}")


@dataclass(frozen=True)
class Number:
    """Rule: a finite number in ``[low, high]`` (``(low, high]`` with ``low_open``), optionally an integer."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    integer: bool = False

    def check(self, key: str, value: Any, what: str = "rope key") -> float:
        return check_number(key, value, low=self.low, high=self.high, low_open=self.low_open, integer=self.integer,
                            what=what)


@dataclass(frozen=True)
class Flag:
    """Rule: a boolean (see ``check_flag``)."""

    def check(self, key: str, value: Any, what: str = "rope key") -> bool:
        return check_flag(key, value, what)


@dataclass(frozen=True)
class FactorList:
    """Rule: a list of positive finite numbers (its length is checked against the rotary dim by ``parse``)."""

    def check(self, key: str, value: Any, what: str = "rope key") -> tuple[float, ...]:
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"{what} {key!r} must be a list of numbers (one per rotary pair), got {value!r}")
        return tuple(check_number(f"{key}[{i}]", v, low=0.0, low_open=True, what=what) for i, v in enumerate(value))


@dataclass(frozen=True)
class CountList:
    """Rule: a list of 1 to ``most`` integers >= 1, strictly increasing when ``increasing``."""

    increasing: bool = False
    most: int = 8

    def check(self, key: str, value: Any, what: str = "rope key") -> tuple[int, ...]:
        order = "strictly increasing " if self.increasing else ""
        if not isinstance(value, (list, tuple)) or not 1 <= len(value) <= self.most:
            raise ValueError(f"{what} {key!r} must be a list of 1 to {self.most} {order}integers >= 1, got {value!r}")
        counts = tuple(check_number(f"{key}[{i}]", v, low=1, integer=True, what=what) for i, v in enumerate(value))
        if self.increasing and any(b <= a for a, b in zip(counts[:-1], counts[1:], strict=True)):
            raise ValueError(f"{what} {key!r} must be strictly increasing, got {list(counts)}")
        return counts


# Bounds far past any real model (factors of 4-128, lengths up to 10M tokens), low enough that every
# derived quantity (an NTK base b * s^(d/(d-2)), an angle p * theta) stays a finite float64.
MAX_FACTOR = 2.0**20
MAX_LENGTH = 2**31
FACTOR = Number(low=1.0, high=MAX_FACTOR)
POSITIVE = Number(low=0.0, low_open=True)
LENGTH = Number(low=1, high=MAX_LENGTH, integer=True)


def _warn_unknown_keys(rope_type: str, raw: Mapping, known: set[str]) -> None:
    """Warn, as transformers does, about keys the type will ignore."""
    unknown = set(raw) - known - COMMON_KEYS
    if unknown:
        warnings.warn(f"rope_type {rope_type!r} ignores unrecognized keys {sorted(unknown)}", stacklevel=5)


@dataclass(frozen=True)
class Params:
    """Base class of every typed parameter set (rope types and attention variants).

    ``KEYS`` maps each key to its rule; ``IGNORED`` are keys accepted and left to the caller;
    ``WHAT`` names the kind of key in messages.
    """

    KEYS: ClassVar[dict[str, Any]] = {}
    IGNORED: ClassVar[frozenset[str]] = frozenset()
    WHAT: ClassVar[str] = "rope key"

    @classmethod
    def check_keys(cls, name: str, raw: Mapping, *, unknown: str = "warn") -> dict[str, Any]:
        """Check every key of ``raw`` by its rule, without a model: unknown keys warn (``unknown="warn"``,
        as transformers does for config files) or raise (``"error"``, for typed methods). Returns the checked
        keys that are present and not None."""
        extra = sorted(set(raw) - set(cls.KEYS) - cls.IGNORED)
        if extra and unknown == "error":
            known = ", ".join(cls.KEYS) or "no keys"
            raise ValueError(f"{name!r} takes {known}; unknown {extra}")
        if extra:
            _warn_unknown_keys(name, raw, set(cls.KEYS) | cls.IGNORED)
        return {key: rule.check(key, raw[key], cls.WHAT) for key, rule in cls.KEYS.items()
                if raw.get(key) is not None}

    def to_hf(self) -> dict:
        """The non-None fields as a dict (an HF rope_parameters fragment for rope types)."""
        out = {}
        for field in fields(self):
            value = getattr(self, field.name)
            if value is not None:
                out[field.name] = list(value) if isinstance(value, tuple) else value
        return out


@dataclass(frozen=True)
class RopeTypeParams(Params):
    """Base class of a rope type's typed parameters. Subclasses add fields and their ``KEYS`` rules."""

    IGNORED: ClassVar[frozenset[str]] = COMMON_KEYS

    @classmethod
    def parse(cls, raw: Mapping, context: dict) -> RopeTypeParams:
        """Build from an HF rope_parameters dict; ``context`` has the model-level keys."""
        cls.check_keys(context["rope_type"], raw)
        return cls()


def _factor(values: dict, default: float | None = None) -> float:
    """The scale factor s >= 1 (already range-checked), or ``default``; required when there is none."""
    if "factor" in values:
        return values["factor"]
    if default is None:
        raise ValueError("rope key 'factor' is required, allowed range [1, 1048576.0]")
    return default


def _original_length(values: dict, context: dict, required: bool = True) -> int | None:
    """The trained context length: rope_parameters, else the model's top-level keys."""
    if "original_max_position_embeddings" in values:
        return values["original_max_position_embeddings"]
    value = context.get("original_max_position_embeddings") or context.get("max_position_embeddings")
    if value is None:
        if required:
            raise ValueError(
                f"rope_type {context['rope_type']!r} needs 'original_max_position_embeddings' (or the model's "
                "'max_position_embeddings'), an integer in [1, 2**31]; neither was given")
        return None
    return LENGTH.check("original_max_position_embeddings", value)


@dataclass(frozen=True)
class DefaultParams(RopeTypeParams):
    """Plain RoPE (Su et al. 2021): no parameters beyond the base."""


@dataclass(frozen=True)
class LinearParams(RopeTypeParams):
    """Position interpolation (Chen et al. 2023, Eq. 4): positions divided by ``factor``."""

    factor: float = 1.0

    KEYS: ClassVar[dict[str, Any]] = {"factor": FACTOR}
    FACTOR_DEFAULT: ClassVar[float | None] = None  # required

    @classmethod
    def parse(cls, raw: Mapping, context: dict) -> LinearParams:
        values = cls.check_keys(context["rope_type"], raw)
        return cls(factor=_factor(values, default=cls.FACTOR_DEFAULT))


@dataclass(frozen=True)
class DynamicParams(RopeTypeParams):
    """Dynamic NTK (transformers ``dynamic``): base grows with the current length past the original."""

    factor: float = 1.0
    original_max_position_embeddings: int | None = None

    KEYS: ClassVar[dict[str, Any]] = {"factor": FACTOR, "original_max_position_embeddings": LENGTH}

    @classmethod
    def parse(cls, raw: Mapping, context: dict) -> DynamicParams:
        values = cls.check_keys(context["rope_type"], raw)
        original = values.get("original_max_position_embeddings")
        if original is None and context.get("max_position_embeddings") is None:
            _original_length(values, context)  # raises: dynamic needs some length to compare against
        return cls(factor=_factor(values), original_max_position_embeddings=original)


@dataclass(frozen=True)
class NtkParams(RopeTypeParams):
    """Static NTK-aware scaling (bloc97 2023; YaRN paper Sec. 3.1): base * s^(d/(d-2))."""

    factor: float = 1.0

    KEYS: ClassVar[dict[str, Any]] = {"factor": FACTOR, "alpha": FACTOR}

    @classmethod
    def parse(cls, raw: Mapping, context: dict) -> NtkParams:
        values = cls.check_keys(context["rope_type"], raw)
        factor, alpha = values.get("factor"), values.get("alpha")
        if factor is not None and alpha is not None and factor != alpha:
            raise ValueError(f"rope_type 'ntk' takes 'factor' or 'alpha' (synonyms), got factor={factor} "
                             f"and alpha={alpha}")
        if factor is None and alpha is None:
            raise ValueError("rope_type 'ntk' needs 'factor' (or 'alpha'), a number in [1, 1048576.0]")
        return cls(factor=factor if factor is not None else alpha)


_YARN_RAMP_KEYS: dict[str, Any] = {
    "original_max_position_embeddings": LENGTH, "beta_fast": POSITIVE, "beta_slow": POSITIVE, "truncate": Flag(),
    "attention_factor": POSITIVE, "mscale": Number(low=0.0), "mscale_all_dim": Number(low=0.0),
}


def _yarn_common(values: dict) -> dict:
    """Fields YaRN and dynamic YaRN share: defaults for absent keys, then the cross-key check."""
    beta_fast, beta_slow = values.get("beta_fast", 32.0), values.get("beta_slow", 1.0)
    if beta_fast < beta_slow:
        raise ValueError(f"rope key 'beta_fast'={beta_fast} must be >= 'beta_slow'={beta_slow}")
    return {"beta_fast": float(beta_fast), "beta_slow": float(beta_slow), "truncate": values.get("truncate", True),
            "attention_factor": values.get("attention_factor"), "mscale": values.get("mscale"),
            "mscale_all_dim": values.get("mscale_all_dim")}


@dataclass(frozen=True)
class YarnRampParams(RopeTypeParams):
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

    KEYS: ClassVar[dict[str, Any]] = {"factor": FACTOR, **_YARN_RAMP_KEYS}

    @classmethod
    def parse(cls, raw: Mapping, context: dict) -> YarnParams:
        values = cls.check_keys(context["rope_type"], raw)
        original = _original_length(values, context)
        if "factor" not in values and context.get("max_position_embeddings"):
            factor = FACTOR.check("factor", context["max_position_embeddings"] / original)
        else:
            factor = _factor(values)
        return cls(factor=factor, original_max_position_embeddings=original, **_yarn_common(values))


@dataclass(frozen=True)
class DynamicYarnParams(YarnRampParams):
    """YaRN whose factor follows the sequence: s = max(1, seq_len / original length)."""

    KEYS: ClassVar[dict[str, Any]] = dict(_YARN_RAMP_KEYS)

    @classmethod
    def parse(cls, raw: Mapping, context: dict) -> DynamicYarnParams:
        values = cls.check_keys(context["rope_type"], raw)
        return cls(original_max_position_embeddings=_original_length(values, context), **_yarn_common(values))


@dataclass(frozen=True)
class LongRopeParams(RopeTypeParams):
    """LongRoPE / Phi-3 (Ding et al. 2024): per-pair rescale factors, long or short by length."""

    short_factor: tuple[float, ...] = ()
    long_factor: tuple[float, ...] = ()
    original_max_position_embeddings: int = 0
    factor: float | None = None
    attention_factor: float | None = None

    KEYS: ClassVar[dict[str, Any]] = {"short_factor": FactorList(), "long_factor": FactorList(),
                                      "original_max_position_embeddings": LENGTH, "factor": FACTOR,
                                      "attention_factor": POSITIVE}

    @classmethod
    def parse(cls, raw: Mapping, context: dict) -> LongRopeParams:
        values = cls.check_keys(context["rope_type"], raw)
        pairs = context["rotary_dim"] // 2
        for key in ("short_factor", "long_factor"):
            if key not in values:
                raise ValueError(f"rope key {key!r} must be a list of {pairs} numbers (rotary_dim/2), "
                                 f"got {raw.get(key)!r}")
            if len(values[key]) != pairs:
                raise ValueError(f"rope key {key!r} must have length {pairs} (rotary_dim/2), "
                                 f"got length {len(values[key])}")
        return cls(short_factor=values["short_factor"], long_factor=values["long_factor"],
                   original_max_position_embeddings=_original_length(values, context), factor=values.get("factor"),
                   attention_factor=values.get("attention_factor"))


@dataclass(frozen=True)
class Llama3Params(RopeTypeParams):
    """Llama 3.1 frequency bands (Meta's ``apply_scaling``)."""

    factor: float = 8.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192

    KEYS: ClassVar[dict[str, Any]] = {"factor": FACTOR, "low_freq_factor": POSITIVE, "high_freq_factor": POSITIVE,
                                      "original_max_position_embeddings": LENGTH}

    @classmethod
    def parse(cls, raw: Mapping, context: dict) -> Llama3Params:
        values = cls.check_keys(context["rope_type"], raw)
        for key in ("low_freq_factor", "high_freq_factor"):
            if key not in values:
                raise ValueError(f"rope_type 'llama3' needs {key!r}, a number in (0, inf)")
        low, high = values["low_freq_factor"], values["high_freq_factor"]
        if high <= low:
            raise ValueError(f"rope key 'high_freq_factor'={high} must be > 'low_freq_factor'={low}")
        original = _original_length(values, context)
        max_len = context.get("max_position_embeddings")
        if max_len is not None and original > max_len:  # equal is how with_rope_type() describes a model
            warnings.warn(f"llama3: original_max_position_embeddings={original} should not exceed "
                          f"max_position_embeddings={max_len}", stacklevel=4)
        return cls(factor=_factor(values), low_freq_factor=low, high_freq_factor=high,
                   original_max_position_embeddings=original)


@dataclass(frozen=True)
class ProportionalParams(LinearParams):
    """Proportional RoPE (transformers, Gemma 4): partial rotation with full-dim frequencies.

    Same single ``factor`` as linear, but optional (default 1).
    """

    FACTOR_DEFAULT: ClassVar[float | None] = 1.0
