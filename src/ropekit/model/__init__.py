"""The LLaMA model, its KV cache, the attention extension point, and generation."""

from ropekit.model.attention import AttentionContext, AttentionMethod
from ropekit.model.kv_cache import KVCache
from ropekit.model.llama import LlamaConfig, LlamaModel

__all__ = ["AttentionContext", "AttentionMethod", "KVCache", "LlamaConfig", "LlamaModel"]
