"""Deprecated home of the attention-level methods (one release): use ``ropekit.attention`` and
``ropekit.extension``.

Old name -> new name: ``parse_method`` -> ``ropekit.extension.parse_extension``, ``MethodSpec`` ->
``ExtensionSpec``, ``apply_method`` -> ``ropekit.model.apply_extension``, ``ATTENTION_METHODS`` ->
``ropekit.attention.ATTENTION_VARIANTS``, ``SelfExtendAttention(...)`` ->
``VariantAttention(SelfExtend(...))`` (likewise ``ReRopeAttention`` / ``ReRope``,
``ConsistentDynamicAttention`` / ``ConsistentDynamic``), ``merged_attention`` ->
``ropekit.attention.merged_attention``.
"""

from __future__ import annotations

import warnings
from typing import Any

from ropekit.attention import ATTENTION_VARIANTS, ConsistentDynamic, ReRope, SelfExtend, merged_attention
from ropekit.attention.remap import DEFAULT_CHUNK
from ropekit.extension import ExtensionSpec, parse_extension
from ropekit.model.attention import VariantAttention, apply_extension


class _SelfExtendAttention(VariantAttention):
    def __init__(self, group: int = 4, window: int = 1024, chunk_size: int = DEFAULT_CHUNK):
        super().__init__(SelfExtend(group, window, chunk_size))


class _ReRopeAttention(VariantAttention):
    def __init__(self, window: int = 512, leak: float | None = None, logn: bool = False,
                 chunk_size: int = DEFAULT_CHUNK):
        super().__init__(ReRope(window, leak, logn, chunk_size))


class _ConsistentDynamicAttention(VariantAttention):
    def __init__(self):
        super().__init__(ConsistentDynamic())


_RENAMED = {
    "parse_method": ("ropekit.extension.parse_extension", parse_extension),
    "MethodSpec": ("ropekit.extension.ExtensionSpec", ExtensionSpec),
    "apply_method": ("ropekit.model.apply_extension", apply_extension),
    "ATTENTION_METHODS": ("ropekit.attention.ATTENTION_VARIANTS", ATTENTION_VARIANTS),
    "merged_attention": ("ropekit.attention.merged_attention", merged_attention),
    "SelfExtendAttention": ("VariantAttention(ropekit.attention.SelfExtend(...))", _SelfExtendAttention),
    "ReRopeAttention": ("VariantAttention(ropekit.attention.ReRope(...))", _ReRopeAttention),
    "ConsistentDynamicAttention": ("VariantAttention(ropekit.attention.ConsistentDynamic())",
                                   _ConsistentDynamicAttention),
}


def __getattr__(name: str) -> Any:
    if name in _RENAMED:
        new, value = _RENAMED[name]
        warnings.warn(f"ropekit.model.extend.{name} is deprecated; use {new}", DeprecationWarning, stacklevel=2)
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
