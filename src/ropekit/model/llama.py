"""A minimal LLaMA in plain PyTorch: RMSNorm, grouped-query attention, SwiGLU MLP, RoPE from the core.

Parameter names follow Hugging Face's ``LlamaForCausalLM`` without the ``model.`` prefix
(``embed_tokens``, ``layers.{i}.self_attn.q_proj``, ..., ``norm``, ``lm_head``), so an HF state
dict loads after stripping that prefix. The weights use the "half" rope layout (HF's); the
GGUF loader un-permutes llama.cpp's interleaved q/k rows before they get here.

The forward pass computes the rope tables once from the position tensor (through the
attention's ``prepare``) and passes them to every layer in an ``AttentionContext``. Each layer is
written once, in the decode ops of ``ropekit.kernels.decode``: torch ops for a prefill, fused
C++ kernels for a one-token decode step on the CPU. Such a step keeps its activations in
float32 whatever the weights' dtype (bfloat16 weights are widened exactly inside the kernels).
``forward`` is always this plain pass. Every fused op a layer calls takes the context's
``recording`` (None in an ordinary pass): ``capture_decode`` (``ropekit.model.decode_graph``)
records one decode step through it and replays it, so a layer must call its fused ops through
the dispatch point with that argument for its decode steps to stay replayable.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ropekit.dispatch import Recording
from ropekit.kernels.decode import decode_path, linear_residual, norm_linear, norm_swiglu, rms_norm
from ropekit.model.attention import AttentionContext, EngineAttention, RopeAttention, build_mask
from ropekit.model.decode_graph import DecodeGraph
from ropekit.model.kv_cache import KVCache
from ropekit.rope import RopeConfig, RotaryEmbedding


@dataclass(frozen=True)
class LlamaConfig:
    """Architecture of a LLaMA-family decoder; ``rope`` holds everything about positions."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rope: RopeConfig
    rms_norm_eps: float = 1e-5
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    attention_bias: bool = False

    def __post_init__(self):
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                     "num_key_value_heads", "head_dim", "max_position_embeddings"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"LlamaConfig {name} must be an integer >= 1, got {value!r}")
        eps = self.rms_norm_eps
        if not isinstance(eps, (int, float)) or not math.isfinite(eps) or not 0 < eps <= 1:
            raise ValueError(f"LlamaConfig rms_norm_eps must be a finite number in (0, 1], got {eps!r}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(f"num_attention_heads={self.num_attention_heads} must be a multiple of "
                             f"num_key_value_heads={self.num_key_value_heads}")
        if self.rope.head_dim != self.head_dim:
            raise ValueError(f"rope head_dim {self.rope.head_dim} != model head_dim {self.head_dim}")

    @classmethod
    def from_hf(cls, hf: Mapping[str, Any]) -> LlamaConfig:
        """From an HF ``config.json`` dict (rope settings in ``rope_parameters`` or legacy keys)."""
        heads = int(hf["num_attention_heads"])
        head_dim = int(hf.get("head_dim") or hf["hidden_size"] // heads)
        return cls(
            vocab_size=int(hf["vocab_size"]), hidden_size=int(hf["hidden_size"]),
            intermediate_size=int(hf["intermediate_size"]), num_hidden_layers=int(hf["num_hidden_layers"]),
            num_attention_heads=heads,
            num_key_value_heads=heads if hf.get("num_key_value_heads") is None else int(hf["num_key_value_heads"]),
            head_dim=head_dim, rope=RopeConfig.from_hf({**hf, "head_dim": head_dim}),
            rms_norm_eps=float(hf.get("rms_norm_eps", 1e-5)),
            max_position_embeddings=int(hf.get("max_position_embeddings", 2048)),
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            attention_bias=bool(hf.get("attention_bias", False)),
        )

    def to_hf(self) -> dict[str, Any]:
        """An HF ``LlamaConfig``-compatible dict (transformers 5: rope in ``rope_parameters``)."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "rope"}
        rope = self.rope.to_hf()
        out["rope_parameters"] = rope["rope_parameters"]
        out["model_type"] = "llama"
        return out

    def with_rope(self, rope: RopeConfig) -> LlamaConfig:
        return dataclasses.replace(self, rope=rope)


class RMSNorm(nn.Module):
    """x / sqrt(mean(x^2) + eps) * weight, normalised in float32 (as HF's LlamaRMSNorm)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x ``[..., C]`` -> ``[..., C]`` in x's dtype."""
        return rms_norm(x, self.weight, self.eps)


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x)); the layer calls it as a residual branch with its norm fused in."""

    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x: torch.Tensor, norm: RMSNorm, recording: Recording | None = None) -> torch.Tensor:
        """x ``[B, T, C]`` -> ``x + mlp(norm(x))``, ``[B, T, C]`` (``recording``: see ``AttentionContext``)."""
        hidden = norm_swiglu(x, self.gate_proj.weight, self.up_proj.weight, norm.weight, norm.eps,
                             recording=recording)  # [B, T, I]
        return linear_residual(hidden, self.down_proj.weight, x, recording=recording)


class Attention(nn.Module):
    """Projections of one attention layer; the attention itself is the context's ``EngineAttention``."""

    def __init__(self, config: LlamaConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads, self.num_kv_heads, self.head_dim = (
            config.num_attention_heads, config.num_key_value_heads, config.head_dim)
        bias = config.attention_bias
        self.q_proj = nn.Linear(config.hidden_size, self.num_heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(config.hidden_size, self.num_kv_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(config.hidden_size, self.num_kv_heads * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, config.hidden_size, bias=bias)

    def forward(self, x: torch.Tensor, norm: RMSNorm, context: AttentionContext) -> torch.Tensor:
        """x ``[B, T, C]`` -> ``x + o_proj(attention(norm(x)))``, ``[B, T, C]``."""
        B, T, _ = x.shape
        projections = (self.q_proj, self.k_proj, self.v_proj)
        biases = [p.bias for p in projections] if self.q_proj.bias is not None else None
        q, k, v = norm_linear(x, [p.weight for p in projections], norm.weight, norm.eps, biases,
                              recording=context.recording)
        q = q.view(B, T, self.num_heads, self.head_dim).transpose(1, 2)  # [B, H, T, D]
        k = k.view(B, T, self.num_kv_heads, self.head_dim).transpose(1, 2)  # [B, Hkv, T, D]
        v = v.view(B, T, self.num_kv_heads, self.head_dim).transpose(1, 2)  # [B, Hkv, T, D]
        out = context.attention.attend(self.layer_idx, q, k, v, context)  # [B, H, T, D]
        out = out.transpose(1, 2).reshape(B, T, self.num_heads * self.head_dim)  # [B, T, H*D]
        return linear_residual(out, self.o_proj.weight, x, self.o_proj.bias, recording=context.recording)


class DecoderLayer(nn.Module):
    """Pre-norm residual block: x + attn(norm(x)), then x + mlp(norm(x)).

    Written once, in the decode ops of ``ropekit.kernels.decode``: a prefill runs them as torch
    ops, a one-token decode step of one sequence as fused C++ kernels (norm + projections in one
    weight stream, SwiGLU in one pass, residual adds fused).
    """

    def __init__(self, config: LlamaConfig, layer_idx: int):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config, layer_idx)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor, context: AttentionContext) -> torch.Tensor:
        x = self.self_attn(x, self.input_layernorm, context)
        return self.mlp(x, self.post_attention_layernorm, context.recording)


class LlamaModel(nn.Module):
    """Token ids in, next-token logits out.

    ``model(input_ids)`` with ``input_ids`` long ``[B, T]`` returns float32 logits ``[B, T, V]``.
    ``model.config`` is the ``LlamaConfig``; ``model.rope`` the ``RotaryEmbedding``;
    ``model.attention`` the ``EngineAttention`` every layer calls.
    """

    def __init__(self, config: LlamaConfig, attention: EngineAttention | None = None):
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self.rope = RotaryEmbedding(config.rope)
        self.attention = attention or RopeAttention()

    def set_rope(self, rope: RopeConfig | Mapping | str) -> None:
        """Switch the rope type at run time (a RopeConfig, HF rope_parameters dict, or spec string).

        Dicts and strings keep the model's geometry (head_dim, base, trained length). Any cache
        filled before the switch holds keys rotated the old way.
        """
        rope_config = self.config.rope.with_rope_type(rope)
        device = self.embed_tokens.weight.device
        self.rope = RotaryEmbedding(rope_config, device=device)
        self.config = self.config.with_rope(rope_config)

    def set_attention(self, attention: EngineAttention) -> None:
        """Install another attention (``VariantHook(SelfExtend(...))``, ...)."""
        self.attention = attention

    def new_cache(self, batch_size: int, max_len: int) -> KVCache:
        """A preallocated ``KVCache`` for this model."""
        return KVCache.for_model(self, batch_size, max_len)

    def decode_path(self) -> str:
        """One line naming the kernels a one-token decode step of one sequence runs here."""
        return decode_path(self.embed_tokens.weight)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor | None = None,
                cache: KVCache | None = None, attention_mask: torch.Tensor | None = None,
                *, logits_to_keep: int = 0, on_layer: Callable[[int], None] | None = None) -> torch.Tensor:
        """Logits for ``input_ids``.

        input_ids: long ``[B, T]``. positions: long ``[T]`` or ``[B, T]``; default: each row
        continues from its last cached position (``arange(past, past + T)`` without padding), and
        with ``attention_mask`` counts only real tokens (left padding: first real token at 0).
        cache: a ``KVCache`` that receives this step's keys/values. attention_mask: ``[B, T]``
        (or ``[B, past + T]``, HF style) with 1 for real tokens, 0 for padding.
        logits_to_keep: if > 0, only the last that many positions get logits.
        on_layer: called with i after layer i (progress of a long prefill).
        Returns float32 logits ``[B, T, V]`` (``[B, logits_to_keep, V]``).
        """
        return self._logits(input_ids, positions, cache, attention_mask, logits_to_keep, on_layer)

    def _logits(self, input_ids, positions, cache, attention_mask, logits_to_keep, on_layer,
                recording: Recording | None = None) -> torch.Tensor:
        x = self.hidden_states(input_ids, positions, cache, attention_mask, normed=False,
                               on_layer=on_layer, recording=recording)  # [B, T, C]
        if logits_to_keep > 0:
            x = x[:, -logits_to_keep:]
        (logits,) = norm_linear(x, [self.lm_head.weight], self.norm.weight, self.norm.eps, recording=recording)
        return logits.float()  # [B, T, V]

    def capture_decode(self, cache: KVCache) -> DecodeGraph:
        """A ``DecodeGraph`` for one-token steps on ``cache``: the first step runs this model's forward and
        records its fused ops, later steps replay them (see ``ropekit.model.decode_graph``)."""
        return DecodeGraph(self, cache)

    def hidden_states(self, input_ids: torch.Tensor, positions: torch.Tensor | None = None,
                      cache: KVCache | None = None, attention_mask: torch.Tensor | None = None, *,
                      normed: bool = True, on_layer: Callable[[int], None] | None = None,
                      recording: Recording | None = None) -> torch.Tensor:
        """The last layer's hidden states ``[B, T, C]`` (after the final norm unless ``normed=False``):
        ``forward`` without the output head. ``on_layer(i)`` is called after layer i (progress).
        ``recording``: run every fused op through its planner and keep its replay call there, with this
        pass's input buffers (``inputs["context"]``, ``inputs["embedding"]``); see ``DecodeGraph``."""
        context = self.attention_context(input_ids, positions, cache, attention_mask)
        context.recording = recording
        x = self.embed_tokens(input_ids)  # [B, T, C]
        if x.dtype != torch.float32 and input_ids.numel() == 1 and x.device.type == "cpu":
            x = x.float()  # a CPU decode step keeps its activations in float32 (the fused kernels' input)
        if recording is not None:
            recording.inputs.update(context=context, embedding=x)
        for i, layer in enumerate(self.layers):
            x = layer(x, context)
            if on_layer is not None:
                on_layer(i)
        return self.norm(x) if normed else x

    def attention_context(self, input_ids: torch.Tensor, positions: torch.Tensor | None,
                          cache: KVCache | None, attention_mask: torch.Tensor | None) -> AttentionContext:
        """Validate the inputs and build the per-forward ``AttentionContext`` (rope tables computed here once)."""
        B, T = check_input_ids(input_ids, self.config.vocab_size)
        past = 0
        if cache is not None:
            if cache.batch_size != B:
                raise ValueError(f"cache batch size {cache.batch_size} != input batch size {B}")
            cache.check_room(T)
            past = cache.length
        valid = _valid_mask(attention_mask, B, T, past)
        position_start = position_end = None  # unknown for positions the caller chose
        if positions is None:
            positions = default_positions(valid, cache, B, T, input_ids.device)
            base = 0 if cache is None else cache.position_end  # every position so far is below it
            position_end = base + T
            if valid is None and (cache is None or cache.batch_size == 1):
                position_start = base  # positions = base .. base + T - 1 (default_positions, read from no tensor)
        elif positions.shape not in ((T,), (B, T)):
            raise ValueError(f"positions must have shape ({T},) or ({B}, {T}), got {tuple(positions.shape)}")
        key_positions = positions.expand(B, T)
        if valid is not None:
            key_positions = key_positions.masked_fill(~valid, -1)
        context = AttentionContext(positions=positions, key_positions=key_positions, rope=self.rope,
                                   attention=self.attention, cache=cache, past=past, position_end=position_end,
                                   position_start=position_start,
                                   mask=build_mask(valid, cache, past, T))
        self.attention.prepare(context)
        return context


def check_input_ids(input_ids: torch.Tensor, vocab_size: int) -> tuple[int, int]:
    """Raise ValueError for anything but a non-empty long ``[B, T]`` of ids below ``vocab_size``."""
    if not isinstance(input_ids, torch.Tensor) or input_ids.dtype != torch.long or input_ids.dim() != 2:
        kind = getattr(input_ids, "dtype", type(input_ids).__name__)
        raise ValueError(f"input_ids must be a LongTensor [B, T], got {kind} "
                         f"of shape {tuple(getattr(input_ids, 'shape', ()))}")
    if input_ids.numel() == 0:
        raise ValueError(f"input_ids is empty (shape {tuple(input_ids.shape)}); need at least one token")
    in_range = ((input_ids >= 0) & (input_ids < vocab_size)).all()
    try:  # no host synchronisation: fails here on the CPU, at the device's next synchronisation elsewhere
        torch._assert_async(in_range, "token ids out of range")
    except RuntimeError:
        raise ValueError(f"token ids must lie in [0, {vocab_size}), got [{int(input_ids.min())}, "
                         f"{int(input_ids.max())}]") from None
    return input_ids.shape


def _valid_mask(attention_mask: torch.Tensor | None, B: int, T: int, past: int) -> torch.Tensor | None:
    """``[B, T]`` bool (True = real token) for the new tokens, or None when there is no mask."""
    if attention_mask is None:
        return None
    shape = tuple(attention_mask.shape)
    if len(shape) != 2 or shape[0] != B or shape[1] not in (T, past + T):
        raise ValueError(f"attention_mask must have shape ({B}, {T}) or ({B}, {past + T}), "
                         f"got {tuple(attention_mask.shape)}")
    return attention_mask[:, -T:].bool()


def default_positions(valid: torch.Tensor | None, cache: KVCache | None, B: int, T: int,
                      device: torch.device) -> torch.Tensor:
    """Positions continuing each row from the cache: ``[T]`` when rows agree, else ``[B, T]``.

    With a mask, only real tokens advance the count; padding gets a harmless position (masked).
    """
    if valid is None and (cache is None or cache.batch_size == 1):  # the start is a host int: nothing read
        return torch.arange(T, device=device) + (0 if cache is None else cache.position_end)  # [T]
    start = cache.next_positions() if cache is not None else torch.zeros(B, dtype=torch.long, device=device)
    if valid is None:
        if bool((start == start[0]).all()):
            return torch.arange(T, device=device) + start[0]  # [T]
        return start[:, None] + torch.arange(T, device=device)  # [B, T]
    offsets = valid.long().cumsum(dim=1) - 1  # [B, T]: index among real tokens
    return (start[:, None] + offsets).clamp(min=0)
