"""``ATTENTION_VARIANTS``: every attention-level method by name, with its typed parameters.

Same shape as the rope types' ``ROPE_TYPES``: an entry has a ``name``, a ``params`` class whose
``parse(raw)`` validates a dict of keys (each named in its error with the allowed range), a
``build(params)`` that returns the ``AttentionVariant``, and a ``source``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

from ropekit.attention.base import AttentionVariant
from ropekit.attention.consistent_dynamic import ConsistentDynamic
from ropekit.attention.dca import DualChunk, dca_sizes
from ropekit.attention.remap import DEFAULT_CHUNK
from ropekit.attention.rerope import ReRope
from ropekit.attention.self_extend import GradedSelfExtend, SelfExtend, check_graded
from ropekit.rope.params import CountList, Flag, Number, Params
from ropekit.rope.registry import Registry

COUNT = Number(low=1, integer=True)


@dataclass(frozen=True)
class VariantParams(Params):
    """Base of an attention variant's parameters: every key is checked, unknown keys are errors."""

    NAME: ClassVar[str] = ""

    @classmethod
    def parse(cls, raw: Mapping, context: dict | None = None) -> VariantParams:
        return cls(**cls.check_keys(cls.NAME, raw, unknown="error"))


@dataclass(frozen=True)
class SelfExtendParams(VariantParams):
    """Group size G and neighbour window W (reach ~ (L - W) * G + W); ``chunk``: queries per block."""

    group: int = 4
    window: int = 1024
    chunk: int = DEFAULT_CHUNK

    NAME: ClassVar[str] = "self-extend"
    WHAT: ClassVar[str] = "self-extend key"
    KEYS: ClassVar[dict[str, Any]] = {"group": COUNT, "window": COUNT, "chunk": COUNT}


@dataclass(frozen=True)
class GradedSelfExtendParams(VariantParams):
    """Band starts ``windows`` (strictly increasing) and one group size per band ``groups``: distances
    below ``windows[0]`` exact, those in ``[windows[k], windows[k+1])`` grouped by ``groups[k]``;
    ``chunk``: queries per block."""

    windows: tuple[int, ...] = (1024, 4096)
    groups: tuple[int, ...] = (4, 16)
    chunk: int = DEFAULT_CHUNK

    NAME: ClassVar[str] = "graded-self-extend"
    WHAT: ClassVar[str] = "graded-self-extend key"
    KEYS: ClassVar[dict[str, Any]] = {"windows": CountList(increasing=True), "groups": CountList(), "chunk": COUNT}

    @classmethod
    def parse(cls, raw: Mapping, context: dict | None = None) -> GradedSelfExtendParams:
        params = cls(**cls.check_keys(cls.NAME, raw, unknown="error"))
        check_graded(params.windows, params.groups)
        return params


@dataclass(frozen=True)
class ReRopeParams(VariantParams):
    """Window w (relative distances clipped to w); ``logn``: log-n query scaling; ``chunk``: queries per block."""

    window: int = 512
    logn: bool = False
    chunk: int = DEFAULT_CHUNK

    NAME: ClassVar[str] = "rerope"
    WHAT: ClassVar[str] = "rerope key"
    KEYS: ClassVar[dict[str, Any]] = {"window": COUNT, "logn": Flag(), "chunk": COUNT}


@dataclass(frozen=True)
class LeakyReRopeParams(VariantParams):
    """Window w and leak k > 1 (distances past w grow as w + (r - w) / k)."""

    window: int = 512
    k: float = 16.0
    logn: bool = False
    chunk: int = DEFAULT_CHUNK

    NAME: ClassVar[str] = "leaky-rerope"
    WHAT: ClassVar[str] = "leaky-rerope key"
    KEYS: ClassVar[dict[str, Any]] = {"window": COUNT, "k": Number(low=1.0, low_open=True), "logn": Flag(),
                                      "chunk": COUNT}


@dataclass(frozen=True)
class ConsistentParams(VariantParams):
    """No parameters: the rope type's own (dynamic / dynamic_yarn) frequencies at the current length."""

    NAME: ClassVar[str] = "consistent"


@dataclass(frozen=True)
class DcaParams(VariantParams):
    """Chunk size S (``chunk``) and local window W (``local``), chunk length S - W; None = from the trained
    length L (S = 3L/4, W = L/8) or the model's ``dual_chunk_attention_config``; ``block``: queries per
    block on the general path (``chunk`` is S)."""

    chunk: int | None = None
    local: int | None = None
    block: int = DEFAULT_CHUNK

    NAME: ClassVar[str] = "dca"
    WHAT: ClassVar[str] = "dca key"
    KEYS: ClassVar[dict[str, Any]] = {"chunk": Number(low=2, integer=True), "local": COUNT, "block": COUNT}

    @classmethod
    def parse(cls, raw: Mapping, context: dict | None = None) -> DcaParams:
        values = cls.check_keys(cls.NAME, raw, unknown="error")
        if "chunk" in values and "local" in values:
            dca_sizes(None, values["chunk"], values["local"])  # chunk > local, named in the error
        return cls(**values)


@dataclass(frozen=True)
class AttentionVariantType:
    """A registry entry: the name, typed parameters, the builder, the source."""

    name: str
    params: type[VariantParams]
    build: Callable[[Any], AttentionVariant]
    source: str = ""


ATTENTION_VARIANTS: Registry[AttentionVariantType] = Registry("attention variant")
ATTENTION_VARIANTS.register(AttentionVariantType(
    "self-extend", SelfExtendParams, lambda p: SelfExtend(p.group, p.window, p.chunk),
    source="Self-Extend (Jin et al. 2024, arXiv 2401.01325), Sec. 3"), aliases=("self_extend", "selfextend"))
ATTENTION_VARIANTS.register(AttentionVariantType(
    "graded-self-extend", GradedSelfExtendParams, lambda p: GradedSelfExtend(p.windows, p.groups, p.chunk),
    source="Self-Extend (Jin et al. 2024, arXiv 2401.01325) with one group size per band of distances"),
    aliases=("graded_self_extend",))
ATTENTION_VARIANTS.register(AttentionVariantType(
    "rerope", ReRopeParams, lambda p: ReRope(p.window, None, p.logn, p.chunk),
    source="ReRoPE (Su 2023, kexue.fm/archives/9708)"))
ATTENTION_VARIANTS.register(AttentionVariantType(
    "leaky-rerope", LeakyReRopeParams, lambda p: ReRope(p.window, p.k, p.logn, p.chunk),
    source="Leaky ReRoPE (Su 2023, kexue.fm/archives/9708)"), aliases=("leaky_rerope",))
ATTENTION_VARIANTS.register(AttentionVariantType(
    "consistent", ConsistentParams, lambda p: ConsistentDynamic(),
    source="cache-consistent dynamic scaling (transformers issue 25104: keys re-rotated at the current length)"))

ATTENTION_VARIANTS.register(AttentionVariantType(
    "dca", DcaParams, lambda p: DualChunk(p.chunk, p.local, p.block),
    source="Dual Chunk Attention (An et al. 2024, arXiv 2402.17463, Sec. 3; positions as in HKUNLP/ChunkLlama's "
           "chunkllama_attn_replace.py)"), aliases=("dual-chunk",))


def build_variant(name: str, raw: Mapping | None = None) -> AttentionVariant:
    """The variant called ``name`` with parameters ``raw`` (validated; ValueError on bad ones)."""
    entry = ATTENTION_VARIANTS[name]
    return entry.build(entry.params.parse(raw or {}))
