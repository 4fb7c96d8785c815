"""A fast one-sequence decode loop for ``LlamaModel``: static cache, fused matvecs, no per-token allocation.

Decoding one token on a CPU reads every weight once: it is bound by memory bandwidth, and the
plain model spends its time in ``F.linear`` (far from that bound) and in Python between small
ops. ``FastDecoder`` runs the same maths per token as ``model(token[:, None], cache=cache)`` with:

- the decode kernels of ``ropekit.kernels.gemv`` (C++, one weight stream per thread; a pure-torch
  twin when the extension cannot be built): q/k/v in one pass with the input RMSNorm fused in,
  gate/up/SiLU*mul in one pass, o_proj and down_proj added straight into the residual;
- one ``apply_rotary(..., out=)`` per layer, on q and k together (they are adjacent in the fused
  q/k/v output), with cos/sin rows read from a table computed once;
- a static float32 KV cache ``[L, Hkv, S_max, D]`` and preallocated activation buffers.

Prefill (``T > 1`` tokens) runs the model's own batched forward and copies its cache in.
Weights are read in place (no copy; ``load_model`` already puts them in one huge-page buffer, see
``ropekit.model.arena``) unless ``weight_dtype`` asks for a conversion, done once:
``torch.bfloat16`` halves the bytes streamed per token (activations stay float32). Converted (or,
with ``pack=True``, copied) weights go into one buffer backed by 2 MiB pages, in the order a
step reads them: fewer TLB misses while streaming.

Scope: batch 1, the model's plain rope attention (``AttentionMethod``), no padding.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace

import torch

from ropekit.kernels.gemv import backend as gemv_backend
from ropekit.model.arena import huge_page_copies
from ropekit.model.attention import AttentionMethod
from ropekit.model.kv_cache import KVCache
from ropekit.rope import apply_rotary

WEIGHT_DTYPES = (torch.float32, torch.bfloat16)


@dataclass(frozen=True)
class _Layer:
    """One decoder layer's tensors as the kernels take them (weights read-only, caches written)."""

    qkv: tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # [H*D, C], [Hkv*D, C], [Hkv*D, C]
    qkv_bias: torch.Tensor | None  # [(H + 2 Hkv) * D] or None
    input_norm: torch.Tensor  # [C] float32
    o: torch.Tensor  # [C, H*D]
    o_bias: torch.Tensor | None
    post_norm: torch.Tensor  # [C] float32
    gate: torch.Tensor  # [I, C]
    up: torch.Tensor  # [I, C]
    down: torch.Tensor  # [C, I]
    keys: torch.Tensor  # [Hkv, S_max, D] float32 view of the static cache
    values: torch.Tensor


def _weight(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A contiguous, autograd-free ``dtype`` version of a parameter: the same storage when possible."""
    return t.detach().to(dtype).contiguous()


class FastDecoder:
    """Greedy-speed decoding of one sequence with ``model``'s weights.

    ``prefill(ids) -> logits [V]`` starts a sequence; ``step(token) -> logits [V]`` appends one
    token at the next position; ``generate(ids, n)`` is greedy decoding. Logits are float32 and
    equal the plain engine's (``model(token[:, None], cache=cache)[0, -1]``) up to float32
    summation order. The tensor ``step`` returns is a buffer reused by the next step: clone it
    to keep it.

    model: a ``LlamaModel`` using plain rope attention. max_len: cache capacity in tokens
    (default: the model's ``max_position_embeddings``). weight_dtype: float32 or bfloat16 for the
    decode matvecs (default: bfloat16 if the model is bfloat16, else float32); a dtype other than
    the model's is a one-time copy. backend: "cpp" or "torch" for the kernels (default: C++ when
    it builds here; see ``ropekit.kernels.gemv.backend``). pack: copy the matrices into one
    huge-page buffer (default: only when ``weight_dtype`` converts them anyway; ``True`` with
    float32 weights costs a second copy of the model's matrices).
    """

    def __init__(self, model, max_len: int | None = None, *, weight_dtype: torch.dtype | None = None,
                 backend: str | None = None, pack: bool | None = None):
        if type(model.attention_method) is not AttentionMethod:
            raise ValueError(f"FastDecoder runs plain rope attention only; the model uses "
                             f"{model.attention_method!r} (decode with the model itself)")
        cfg = model.config
        param_dtype = model.embed_tokens.weight.dtype
        if weight_dtype is None:
            weight_dtype = torch.bfloat16 if param_dtype == torch.bfloat16 else torch.float32
        if weight_dtype not in WEIGHT_DTYPES:
            raise ValueError(f"weight_dtype must be one of {WEIGHT_DTYPES}, got {weight_dtype}")
        if model.embed_tokens.weight.device.type != "cpu":
            raise ValueError("FastDecoder runs on CPU tensors only")
        self.max_len = int(max_len or cfg.max_position_embeddings)
        if self.max_len < 1:
            raise ValueError(f"max_len must be >= 1, got {self.max_len}")
        self.model, self.config, self.weight_dtype = model, cfg, weight_dtype
        self.ops = gemv_backend(backend)
        self.num_heads, self.num_kv_heads, self.head_dim = (cfg.num_attention_heads, cfg.num_key_value_heads,
                                                            cfg.head_dim)
        self.eps, self.scale = cfg.rms_norm_eps, cfg.head_dim**-0.5
        H, Hkv, D, C = self.num_heads, self.num_kv_heads, self.head_dim, cfg.hidden_size

        f32 = torch.float32
        shape = (cfg.num_hidden_layers, Hkv, self.max_len, D)
        self.keys, self.values = torch.zeros(shape, dtype=f32), torch.zeros(shape, dtype=f32)
        pack = pack if pack is not None else weight_dtype != param_dtype
        matrix_dtype = param_dtype if pack else weight_dtype  # packing converts while it copies
        self.layers = [self._layer(block, i, matrix_dtype) for i, block in enumerate(model.layers)]
        self.embed = model.embed_tokens.weight.detach()  # [V, C], rows copied into x (any dtype)
        self.final_norm = _weight(model.norm.weight, f32)
        self.lm_head = _weight(model.lm_head.weight, matrix_dtype)
        self._arena = None
        if pack:
            self._pack(weight_dtype)

        # Activations: the residual stream, fused q/k/v, attention output, MLP hidden, logits.
        self.x = torch.zeros(C, dtype=f32)
        self.qkv = torch.zeros((H + 2 * Hkv) * D, dtype=f32)
        self.qk = self.qkv[: (H + Hkv) * D].view(1, H + Hkv, 1, D)  # [B=1, heads, T=1, D] for apply_rotary
        self.attn = torch.zeros(H * D, dtype=f32)
        self.hidden = torch.zeros(cfg.intermediate_size, dtype=f32)
        self.logits = torch.zeros(cfg.vocab_size, dtype=f32)

        # Rope tables, one row per position (lengths-dependent rope types recompute per step).
        self.dynamic_rope = model.rope.config.is_dynamic
        if not self.dynamic_rope:
            self.cos, self.sin = model.rope(torch.arange(self.max_len))  # [S_max, R/2] each
        self.length = 0

    def _layer(self, block, index: int, dtype: torch.dtype) -> _Layer:
        f32 = torch.float32
        attn, mlp = block.self_attn, block.mlp
        projections = (attn.q_proj, attn.k_proj, attn.v_proj)
        bias = None
        if attn.q_proj.bias is not None:
            bias = torch.cat([p.bias.detach() for p in projections]).to(f32)
        o_bias = attn.o_proj.bias.detach().to(f32) if attn.o_proj.bias is not None else None
        return _Layer(
            qkv=tuple(_weight(p.weight, dtype) for p in projections), qkv_bias=bias,
            input_norm=_weight(block.input_layernorm.weight, f32), o=_weight(attn.o_proj.weight, dtype),
            o_bias=o_bias, post_norm=_weight(block.post_attention_layernorm.weight, f32),
            gate=_weight(mlp.gate_proj.weight, dtype), up=_weight(mlp.up_proj.weight, dtype),
            down=_weight(mlp.down_proj.weight, dtype), keys=self.keys[index], values=self.values[index])

    def _pack(self, dtype: torch.dtype) -> None:
        """Move every matrix into one huge-page buffer, in the order ``step`` reads them."""
        names = ("o", "gate", "up", "down")
        matrices = [m for layer in self.layers for m in (*layer.qkv, *(getattr(layer, n) for n in names))]
        packed, self._arena = huge_page_copies([*matrices, self.lm_head], dtype)
        per_layer = 3 + len(names)
        for i, layer in enumerate(self.layers):
            mine = packed[i * per_layer : (i + 1) * per_layer]
            self.layers[i] = replace(layer, qkv=tuple(mine[:3]), **dict(zip(names, mine[3:], strict=True)))
        self.lm_head = packed[-1]

    @property
    def weight_bytes(self) -> int:
        """Bytes of weights one decode step reads (matvec weights, norms and one embedding row)."""
        tensors = [self.lm_head, self.final_norm, self.embed[0]]
        for layer in self.layers:
            tensors += [*layer.qkv, layer.o, layer.gate, layer.up, layer.down, layer.input_norm,
                        layer.post_norm]
        return sum(t.numel() * t.element_size() for t in tensors)

    def reset(self) -> None:
        """Forget the sequence (buffers stay allocated; stale cache slots are never read)."""
        self.length = 0

    @torch.no_grad()
    def prefill(self, ids: Sequence[int] | torch.Tensor) -> torch.Tensor:
        """Start a new sequence with ``ids`` (``[T]`` or ``[1, T]``, T >= 1); returns the last logits ``[V]``.

        Runs the model's batched forward (positions 0..T-1) and copies its keys/values into the
        static cache; with float32 weights this is the same computation as the plain engine's prefill.
        """
        ids = torch.as_tensor(ids, dtype=torch.long).reshape(1, -1)  # [1, T]
        T = ids.shape[1]
        if T == 0:
            raise ValueError("empty prompt: prefill needs at least one token")
        if T > self.max_len:
            raise ValueError(f"prompt of {T} tokens is longer than the FastDecoder cache "
                             f"({self.max_len} tokens)")
        self.reset()
        cache = KVCache.for_model(self.model, 1, T)
        logits = self.model(ids, cache=cache, logits_to_keep=1)[0, -1]  # [V]
        self.keys[:, :, :T] = cache.keys[:, 0]  # [L, Hkv, T, D]
        self.values[:, :, :T] = cache.values[:, 0]
        self.length = T
        self.logits.copy_(logits)
        return self.logits

    @torch.no_grad()
    def step(self, token: int) -> torch.Tensor:
        """Append ``token`` at position ``length``; returns its next-token logits ``[V]`` (reused buffer)."""
        pos = self.length
        if pos >= self.max_len:
            raise ValueError(f"FastDecoder cache overflow: {pos} tokens cached, capacity {self.max_len}; "
                             "create it with a larger max_len")
        token = int(token)
        if not 0 <= token < self.config.vocab_size:
            raise ValueError(f"token id {token} outside [0, {self.config.vocab_size})")
        if self.dynamic_rope:
            cos, sin = self.model.rope(torch.tensor([pos]))  # [1, R/2]: frequencies depend on length
        else:
            cos, sin = self.cos[pos : pos + 1], self.sin[pos : pos + 1]  # [1, R/2]
        ops, eps, H, scale = self.ops, self.eps, self.num_heads, self.scale
        x, qkv, qk, attn, hidden = self.x, self.qkv, self.qk, self.attn, self.hidden
        x.copy_(self.embed[token])
        for layer in self.layers:
            ops.gemv(layer.qkv, x, qkv, False, layer.input_norm, eps)  # q|k|v = W_qkv rmsnorm(x)
            if layer.qkv_bias is not None:
                qkv.add_(layer.qkv_bias)
            apply_rotary(qk, cos, sin, out=qk)  # q and k heads, in place
            ops.decode_attention(qkv, layer.keys, layer.values, pos, H, attn, scale)
            ops.gemv((layer.o,), attn, x, True, None, eps)  # x += W_o attn
            if layer.o_bias is not None:
                x.add_(layer.o_bias)
            ops.gemv_swiglu(layer.gate, layer.up, x, hidden, layer.post_norm, eps)
            ops.gemv((layer.down,), hidden, x, True, None, eps)  # x += W_down hidden
        ops.gemv((self.lm_head,), x, self.logits, False, self.final_norm, eps)
        self.length = pos + 1
        return self.logits

    def generate(self, ids: Sequence[int] | torch.Tensor, max_new_tokens: int,
                 stop_ids: Iterable[int] = ()) -> list[int]:
        """Greedy continuation of ``ids``: up to ``max_new_tokens`` new ids, ending at the first stop id
        (included) or when the cache is full."""
        if max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
        stop = set(stop_ids)
        out: list[int] = []
        if max_new_tokens == 0:
            return out
        logits = self.prefill(ids)
        while True:
            token = int(logits.argmax())
            out.append(token)
            if token in stop or len(out) == max_new_tokens or self.length == self.max_len:
                return out
            logits = self.step(token)
