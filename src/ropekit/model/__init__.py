"""The engine: the LLaMA model, its KV cache, the attention extension point, and generation."""

from ropekit.model.attention import (
    AttentionContext,
    EngineAttention,
    RopeAttention,
    VariantHook,
    patch,
)
from ropekit.model.kv_cache import KVCache
from ropekit.model.llama import LlamaConfig, LlamaModel

__all__ = ["AttentionContext", "EngineAttention", "KVCache", "LlamaConfig", "LlamaModel", "RopeAttention",
           "VariantHook", "patch"]

