"""Training-free context extension at the attention level, and the SPEC parser that selects it.

- ``self_extend``: Self-Extend (Jin et al. 2024); ``rerope``: ReRoPE / Leaky ReRoPE (Su 2023);
- ``dynamic_consistent``: dynamic NTK / YaRN with every cached key at the current frequencies;
- ``remap``: the chunked two-rotation attention that Self-Extend and ReRoPE share;
- ``spec``: ``parse_method("yarn:factor=2+self-extend:group=4,window=1024")`` and ``apply_method``.
All plug into the model through ``AttentionMethod`` (``model.set_attention``) and cache keys unrotated.
"""

from ropekit.model.extend.dynamic_consistent import ConsistentDynamicAttention
from ropekit.model.extend.remap import RemappedAttention, merged_attention
from ropekit.model.extend.rerope import ReRopeAttention
from ropekit.model.extend.self_extend import SelfExtendAttention
from ropekit.model.extend.spec import ATTENTION_METHODS, MethodSpec, apply_method, parse_method

__all__ = [
    "ATTENTION_METHODS", "ConsistentDynamicAttention", "MethodSpec", "ReRopeAttention", "RemappedAttention",
    "SelfExtendAttention", "apply_method", "merged_attention", "parse_method",
]
