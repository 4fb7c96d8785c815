"""``RopeConfig``: one typed rope configuration, the rope-type registry, and HF (de)serialisation.

``ROPE_TYPES`` maps each ``rope_type`` to its typed parameter class and its frequency
function. Adding a rope type = one function in ``frequencies.py`` + one ``RopeType`` entry.
The type is always named explicitly by ``rope_type``; it is never guessed from keys.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from ropekit.rope import frequencies as freq
from ropekit.rope.params import (
    LENGTH,
    DefaultParams,
    DynamicParams,
    DynamicYarnParams,
    LinearParams,
    Llama3Params,
    LongRopeParams,
    NtkParams,
    ProportionalParams,
    RopeTypeParams,
    YarnParams,
    check_number,
)
from ropekit.rope.registry import Registry


@dataclass(frozen=True)
class RopeType:
    """A registry entry: the name, typed parameters, the frequency function, whether it depends on length."""

    name: str
    params: type[RopeTypeParams]
    compute: Callable[[RopeConfig, int | None], freq.Frequencies]
    length_dependent: bool = False
    source: str = ""


def _original(rc: RopeConfig) -> int:
    return rc.original_max_position_embeddings  # type: ignore[return-value]


ROPE_TYPES: Registry[RopeType] = Registry("rope_type")
for _entry, _aliases in [
    (RopeType("default", DefaultParams, lambda rc, n: freq.default_frequencies(rc.rope_theta, rc.rotary_dim),
              source="RoFormer (Su et al. 2021), Eq. 15"), ("none",)),
    (RopeType("linear", LinearParams,
              lambda rc, n: freq.linear_frequencies(rc.rope_theta, rc.rotary_dim, rc.params),
              source="Position Interpolation (Chen et al. 2023, arXiv 2306.15595), Eq. 4"), ("pi",)),
    (RopeType("ntk", NtkParams, lambda rc, n: freq.ntk_frequencies(rc.rope_theta, rc.rotary_dim, rc.params),
              source="NTK-aware scaling (bloc97 2023; YaRN paper Sec. 3.1)"), ("ntk-aware",)),
    (RopeType("dynamic", DynamicParams,
              lambda rc, n: freq.dynamic_frequencies(rc.rope_theta, rc.rotary_dim, rc.params, _original(rc), n),
              length_dependent=True, source="Dynamic NTK (emozilla 2023; YaRN paper Sec. 3.3)"),
     ("dynamic-ntk", "dynamic_ntk")),
    (RopeType("yarn", YarnParams, lambda rc, n: freq.yarn_frequencies(rc.rope_theta, rc.rotary_dim, rc.params),
              source="YaRN (Peng et al. 2023, arXiv 2309.00071), Sec. 3.4, Eq. 18-22"), ()),
    (RopeType("dynamic_yarn", DynamicYarnParams,
              lambda rc, n: freq.dynamic_yarn_frequencies(rc.rope_theta, rc.rotary_dim, rc.params, n),
              length_dependent=True, source="Dynamic YaRN (Peng et al. 2023, Sec. 3.3 + 3.4)"), ("dynamic-yarn",)),
    (RopeType("longrope", LongRopeParams,
              lambda rc, n: freq.longrope_frequencies(rc.rope_theta, rc.rotary_dim, rc.params,
                                                      rc.max_position_embeddings, n),
              length_dependent=True, source="LongRoPE (Ding et al. 2024, arXiv 2402.13753); Phi-3"), ()),
    (RopeType("llama3", Llama3Params,
              lambda rc, n: freq.llama3_frequencies(rc.rope_theta, rc.rotary_dim, rc.params),
              source="Llama 3.1 (Meta, apply_scaling in the reference code)"), ()),
    (RopeType("proportional", ProportionalParams,
              lambda rc, n: freq.proportional_frequencies(rc.rope_theta, rc.head_dim, rc.partial_rotary_factor,
                                                          rc.params),
              source="Proportional RoPE (transformers, Gemma 4)"), ()),
]:
    ROPE_TYPES.register(_entry, _aliases)


def canonical_rope_type(name: Any) -> str:
    """Resolve aliases; unknown names raise ValueError listing the known ones."""
    if not isinstance(name, str):
        raise ValueError(f"rope key 'rope_type' must be a string, got {name!r}")
    return ROPE_TYPES.resolve(name)


@dataclass(frozen=True)
class RopeConfig:
    """Everything needed to compute a model's rotary frequencies.

    ``head_dim`` is the attention head size D; the rotary dim R = D * partial_rotary_factor
    (except ``proportional``, which always returns D/2 frequencies, some of them zero).
    ``max_position_embeddings`` is the model's nominal context (for dynamic NTK: the length
    past which scaling starts, as in transformers).
    """

    head_dim: int
    rope_theta: float = 10000.0
    rope_type: str = "default"
    params: RopeTypeParams = field(default_factory=DefaultParams)
    partial_rotary_factor: float = 1.0
    max_position_embeddings: int | None = None

    @property
    def entry(self) -> RopeType:
        """This configuration's ``ROPE_TYPES`` entry."""
        return ROPE_TYPES[self.rope_type]

    @property
    def rotary_dim(self) -> int:
        """R: the number of channels rotated (and 2 * the number of frequencies returned)."""
        if self.rope_type == "proportional":
            return self.head_dim
        return int(self.head_dim * self.partial_rotary_factor)

    @property
    def is_dynamic(self) -> bool:
        """True when the frequencies depend on the current sequence length."""
        return self.entry.length_dependent

    @property
    def original_max_position_embeddings(self) -> int | None:
        """The trained context length L this configuration extends from."""
        original = getattr(self.params, "original_max_position_embeddings", None)
        return original if original is not None else self.max_position_embeddings

    @property
    def scale(self) -> float:
        """The nominal extension factor s (1 for methods without one)."""
        factor = getattr(self.params, "factor", None)
        return float(factor) if factor is not None else 1.0

    def frequencies(self, seq_len: int | None = None) -> tuple[torch.Tensor, float]:
        """(inv_freq float32 ``(R/2,)``, attention_factor) at the given current length."""
        inv_freq, attention_factor = self.entry.compute(self, seq_len)
        return inv_freq.to(torch.float32), float(attention_factor)

    @classmethod
    def from_hf(cls, config: Any) -> RopeConfig:
        """Parse an HF config (``dict`` as in config.json, or a ``PretrainedConfig``)."""
        if isinstance(config, RopeConfig):
            return config
        return _parse_hf(_as_mapping(config))

    def to_hf(self) -> dict:
        """An HF-style config dict that ``from_hf`` turns back into this object."""
        rope_parameters = {"rope_type": self.rope_type, "rope_theta": self.rope_theta, **self.params.to_hf()}
        if self.partial_rotary_factor != 1.0:
            rope_parameters["partial_rotary_factor"] = self.partial_rotary_factor
        out: dict[str, Any] = {"head_dim": self.head_dim, "rope_parameters": rope_parameters}
        if self.max_position_embeddings is not None:
            out["max_position_embeddings"] = self.max_position_embeddings
        return out

    # -- other runtimes' formats (ropekit.rope.formats); each raises Inexpressible where the format cannot
    #    express this configuration

    @classmethod
    def from_gguf(cls, metadata: Mapping, tensors: Mapping | None = None) -> RopeConfig:
        """From GGUF metadata (``<arch>.rope.*`` keys) and its ``rope_freqs`` / ``rope_factors_*`` tensors."""
        from ropekit.rope import formats

        return formats.from_gguf(metadata, tensors)

    def to_gguf(self, arch: str = "llama") -> dict:
        """GGUF metadata for ``arch``; entries named ``*.weight`` are tensors the file must carry."""
        from ropekit.rope import formats

        return formats.to_gguf(self, arch)

    @classmethod
    def from_llama_cpp(cls, flags: str | list, base: RopeConfig) -> RopeConfig:
        """What llama.cpp runs with these flags on a model whose file rope is ``base``."""
        from ropekit.rope import formats

        return formats.from_llama_cpp(flags, base)

    def to_llama_cpp(self) -> list[str]:
        """llama.cpp command-line flags."""
        from ropekit.rope import formats

        return formats.to_llama_cpp(self)

    def to_vllm(self) -> dict:
        """``{"hf_overrides": ..., "max_model_len": ...}`` for ``vllm serve``."""
        from ropekit.rope import formats

        return formats.to_vllm(self)

    def to_hf_legacy(self) -> dict:
        """A transformers-4 style config fragment (``rope_scaling`` + top-level ``rope_theta``)."""
        from ropekit.rope import formats

        return formats.to_hf_legacy(self)

    def with_rope_type(self, spec: str | Mapping | RopeConfig) -> RopeConfig:
        """The same model geometry (D, base, trained length) with another rope type.

        ``spec`` is a ``RopeConfig``, an HF ``rope_parameters`` dict, or a string
        ``TYPE[:key=value[,key=value...]]`` such as ``"yarn:factor=2"``.
        """
        if isinstance(spec, RopeConfig):
            return spec
        rope_parameters = parse_part(spec) if isinstance(spec, str) else dict(spec)
        rope_parameters.setdefault("rope_theta", self.rope_theta)
        hf = {"head_dim": self.head_dim, "max_position_embeddings": self.max_position_embeddings,
              "original_max_position_embeddings": self.original_max_position_embeddings,
              "partial_rotary_factor": self.partial_rotary_factor, "rope_parameters": rope_parameters}
        return _parse_hf(hf)

    def describe(self) -> str:
        """One line: type and non-default parameters."""
        params = ", ".join(f"{k}={v}" for k, v in self.params.to_hf().items() if not isinstance(v, list))
        return f"{self.rope_type}({params})" if params else self.rope_type


def parse_part(spec: str) -> dict:
    """``"yarn:factor=2,beta_fast=32"`` -> ``{"rope_type": "yarn", "factor": 2, "beta_fast": 32}``.

    Values are read as JSON where possible (numbers, true/false, lists such as ``[1,2]``: commas
    inside brackets do not split), else kept as strings. A key given twice is an error.
    """
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(f"a spec must be 'TYPE[:key=value,...]', got {spec!r}")
    rope_type, _, rest = spec.strip().partition(":")
    out: dict[str, Any] = {"rope_type": rope_type.strip()}
    for item in _split_items(rest, spec):
        key, eq, value = item.partition("=")
        key = key.strip()
        if not eq or not key:
            raise ValueError(f"spec {spec!r}: expected key=value, got {item!r}")
        if key in out:
            raise ValueError(f"spec {spec!r}: key {key!r} is given twice")
        out[key] = _spec_value(value.strip())
    return out


def _split_items(text: str, spec: str) -> list[str]:
    """``text`` split at the commas outside brackets; empty items dropped."""
    items, depth, current = [], 0, []
    for char in text:
        depth += {"[": 1, "]": -1}.get(char, 0)
        if depth < 0:
            raise ValueError(f"spec {spec!r}: unbalanced ']'")
        if char == "," and depth == 0:
            items.append("".join(current))
            current = []
        else:
            current.append(char)
    if depth:
        raise ValueError(f"spec {spec!r}: unbalanced '['")
    items.append("".join(current))
    return [item.strip() for item in items if item.strip()]


def _spec_value(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


_MODEL_KEYS = ("rope_parameters", "rope_scaling", "rope_theta", "head_dim", "hidden_size",
               "num_attention_heads", "partial_rotary_factor", "max_position_embeddings",
               "original_max_position_embeddings")


def _as_mapping(config: Any) -> Mapping:
    """A dict view of the keys we read, from a dict or any object with attributes (PretrainedConfig)."""
    if isinstance(config, Mapping):
        return config
    if not hasattr(config, "__dict__") and not hasattr(config, "to_dict"):
        raise ValueError(f"rope config must be a dict, a PretrainedConfig or a RopeConfig, got {type(config)}")
    return {key: getattr(config, key) for key in _MODEL_KEYS if getattr(config, key, None) is not None}


def _rope_dict(config: Mapping) -> dict:
    """The rope_parameters dict (or legacy rope_scaling), empty for plain RoPE."""
    raw = config.get("rope_parameters") or config.get("rope_scaling") or {}
    if not isinstance(raw, Mapping):
        raise ValueError(f"rope key 'rope_parameters' must be a dict, got {raw!r}")
    return dict(raw)


def _head_dim(config: Mapping) -> int:
    head_dim = config.get("head_dim")
    if head_dim is None:
        hidden, heads = config.get("hidden_size"), config.get("num_attention_heads")
        if hidden is None or heads is None:
            raise ValueError("config needs 'head_dim', or 'hidden_size' and 'num_attention_heads'")
        hidden = check_number("hidden_size", hidden, low=1, integer=True)
        heads = check_number("num_attention_heads", heads, low=1, integer=True)
        head_dim = hidden // heads
    head_dim = check_number("head_dim", head_dim, low=2, integer=True)
    if head_dim % 2:
        raise ValueError(f"rope key 'head_dim'={head_dim} must be even (RoPE rotates pairs)")
    return head_dim


def _parse_hf(config: Mapping) -> RopeConfig:
    raw = _rope_dict(config)
    if "rope_type" in raw and "type" in raw and ROPE_TYPES.get(str(raw["type"])) is not ROPE_TYPES.get(
            str(raw["rope_type"])):
        raise ValueError(f"rope keys 'rope_type'={raw['rope_type']!r} and legacy 'type'={raw['type']!r} disagree")
    rope_type = canonical_rope_type(raw.get("rope_type", raw.get("type", "default")))
    head_dim = _head_dim(config)
    theta = raw.get("rope_theta", config.get("rope_theta", 10000.0))
    theta = check_number("rope_theta", theta, low=1.0, low_open=True, high=1e12)  # real models: 1e4-1e8
    partial = raw.get("partial_rotary_factor", config.get("partial_rotary_factor", 1.0))
    partial = check_number("partial_rotary_factor", partial, low=0.0, high=1.0, low_open=True)
    rotary_dim = int(head_dim * partial)
    if rope_type != "proportional" and (rotary_dim < 2 or rotary_dim % 2):
        raise ValueError(f"rotary dim head_dim*partial_rotary_factor = {head_dim}*{partial} = {rotary_dim} "
                         "must be even and >= 2")
    max_len = config.get("max_position_embeddings")
    if max_len is not None:
        max_len = LENGTH.check("max_position_embeddings", max_len)
    context = {"rope_type": rope_type, "rotary_dim": rotary_dim, "max_position_embeddings": max_len,
               "original_max_position_embeddings": config.get("original_max_position_embeddings")}
    params = ROPE_TYPES[rope_type].params.parse(raw, context)
    return RopeConfig(head_dim=head_dim, rope_theta=theta, rope_type=rope_type, params=params,
                      partial_rotary_factor=partial, max_position_embeddings=max_len)


def compute_inv_freq(config: Any, seq_len: int | None = None) -> tuple[torch.Tensor, float]:
    """Inverse frequencies and attention factor for an HF config (dict / PretrainedConfig) or RopeConfig.

    Returns ``(inv_freq, attention_factor)``: ``inv_freq`` float32 of shape ``(R/2,)``, computed in
    float64 and rounded once; ``attention_factor`` multiplies cos and sin (YaRN / LongRoPE mscale).
    ``seq_len`` is the current sequence length, used by the length-dependent types.
    """
    if seq_len is not None:
        seq_len = check_number("seq_len", seq_len, low=0, integer=True)
    return RopeConfig.from_hf(config).frequencies(seq_len)

