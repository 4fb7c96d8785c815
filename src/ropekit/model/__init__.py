"""The engine: the LLaMA model, its KV cache, the attention extension point, and generation."""

from typing import Any

from ropekit.model.attention import (
    AttentionContext,
    EngineAttention,
    RopeAttention,
    VariantAttention,
    apply_extension,
)
from ropekit.model.kv_cache import KVCache
from ropekit.model.llama import LlamaConfig, LlamaModel

__all__ = ["AttentionContext", "EngineAttention", "KVCache", "LlamaConfig", "LlamaModel", "RopeAttention",
           "VariantAttention", "apply_extension"]


def __getattr__(name: str) -> Any:
    """Deprecated (one release): ``AttentionMethod`` is ``RopeAttention``."""
    if name == "AttentionMethod":
        from ropekit.model import attention

        return attention.__getattr__(name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
