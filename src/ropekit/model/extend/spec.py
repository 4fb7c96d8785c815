"""Method SPECs: one string names a rope type, an attention method, or both.

Grammar: ``PART[+PART]``, each ``PART`` being ``TYPE[:key=value[,key=value...]]`` (the rope
core's ``parse_spec`` syntax). At most one rope part and one attention part:

- rope types (``none``/``default``, ``linear``, ``ntk``, ``dynamic``, ``yarn``, ``dynamic_yarn``,
  ``longrope``, ``llama3``, ...): e.g. ``yarn:factor=2``. On ``dynamic`` / ``dynamic_yarn`` the
  extra key ``consistent=true`` selects cache-consistent dynamic scaling (every cached key
  re-rotated with the current frequencies); without it the mode is transformers-compatible.
- attention methods: ``self-extend:group=G,window=W``, ``rerope:window=w[,logn=true]``,
  ``leaky-rerope:window=w,k=K[,logn=true]``; all accept ``chunk=N`` (queries per chunk).

Examples: ``none``, ``dynamic:factor=2,consistent=true``, ``self-extend:group=8,window=1024``,
``yarn:factor=2+self-extend:group=4,window=1024``. A SPEC without a rope part keeps the model's
own rope. Attention methods re-rotate keys on use, so with a dynamic rope type they are
always cache-consistent.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ropekit.model.attention import AttentionMethod
from ropekit.model.extend.dynamic_consistent import ConsistentDynamicAttention
from ropekit.model.extend.rerope import ReRopeAttention
from ropekit.model.extend.self_extend import SelfExtendAttention
from ropekit.rope import RopeConfig, canonical_rope_type, parse_spec


def _self_extend(p: dict) -> AttentionMethod:
    return SelfExtendAttention(group=p.pop("group", 4), window=p.pop("window", 1024),
                               chunk_size=p.pop("chunk", 512))


def _rerope(p: dict) -> AttentionMethod:
    return ReRopeAttention(window=p.pop("window", 512), logn=p.pop("logn", False),
                           chunk_size=p.pop("chunk", 512))


def _leaky_rerope(p: dict) -> AttentionMethod:
    return ReRopeAttention(window=p.pop("window", 512), leak=p.pop("k", 16), logn=p.pop("logn", False),
                           chunk_size=p.pop("chunk", 512))


# name -> (builder consuming its params, accepted keys)
ATTENTION_METHODS: dict[str, tuple[Callable[[dict], AttentionMethod], tuple[str, ...]]] = {
    "self-extend": (_self_extend, ("group", "window", "chunk")),
    "rerope": (_rerope, ("window", "logn", "chunk")),
    "leaky-rerope": (_leaky_rerope, ("window", "k", "logn", "chunk")),
}
ATTENTION_ALIASES = {"self_extend": "self-extend", "selfextend": "self-extend",
                     "leaky_rerope": "leaky-rerope"}

# A geometry used only to validate rope parts before a model is loaded.
_PROBE = RopeConfig(head_dim=64, rope_theta=10000.0, max_position_embeddings=8192)


@dataclass
class MethodSpec:
    """A parsed SPEC: ``rope`` (HF rope_parameters dict, or None = keep the model's) and ``attention``."""

    spec: str
    rope: dict[str, Any] | None = None
    attention: AttentionMethod = field(default_factory=AttentionMethod)

    @property
    def attention_name(self) -> str:
        return getattr(self.attention, "name", type(self.attention).__name__)


def parse_method(spec: str) -> MethodSpec:
    """Parse a SPEC (see the module docstring); bad specs raise ValueError naming the known types."""
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(f"a method spec must be 'TYPE[:key=value,...][+TYPE...]', got {spec!r}")
    out = MethodSpec(spec=spec.strip())
    seen_attention = False
    for part in (p.strip() for p in spec.split("+")):
        params = parse_spec(part)
        name = str(params.pop("rope_type")).strip().lower()
        name = ATTENTION_ALIASES.get(name, name)
        if name in ATTENTION_METHODS:
            if seen_attention:
                raise ValueError(f"method spec {spec!r}: at most one attention method")
            builder, keys = ATTENTION_METHODS[name]
            unknown = sorted(set(params) - set(keys))
            if unknown:
                raise ValueError(f"method spec {spec!r}: {name} takes {', '.join(keys)}; unknown {unknown}")
            out.attention, seen_attention = builder(params), True
            continue
        try:
            rope_type = canonical_rope_type(name)
        except ValueError as err:
            raise ValueError(f"{err}; attention methods: {', '.join(ATTENTION_METHODS)}") from None
        if out.rope is not None:
            raise ValueError(f"method spec {spec!r}: at most one rope type")
        consistent = params.pop("consistent", False)
        if consistent not in (True, False):
            raise ValueError(f"method spec {spec!r}: consistent must be true or false, got {consistent!r}")
        if consistent and rope_type not in ("dynamic", "dynamic_yarn"):
            raise ValueError(f"method spec {spec!r}: consistent=true applies to dynamic / dynamic_yarn only")
        out.rope = {"rope_type": rope_type, **params}
        _PROBE.with_method(out.rope)  # validate the parameters now (ValueError on bad ones)
        if consistent:
            if seen_attention:
                raise ValueError(f"method spec {spec!r}: attention methods are already cache-consistent; "
                                 "drop consistent=true")
            out.attention, seen_attention = ConsistentDynamicAttention(), True
    return out


def apply_method(model, spec: str | MethodSpec, base_rope: RopeConfig | None = None) -> MethodSpec:
    """Configure ``model`` (a ``LlamaModel``) for SPEC: set its rope and its attention method.

    ``base_rope`` is the model's own rope (used when the SPEC has no rope part); default: the
    model's current rope, so pass the loaded one when switching between several SPECs.
    """
    method = parse_method(spec) if isinstance(spec, str) else spec
    base = base_rope if base_rope is not None else model.config.rope
    model.set_rope(method.rope if method.rope is not None else base)
    model.set_attention(method.attention)
    return method
