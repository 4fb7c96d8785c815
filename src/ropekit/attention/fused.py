"""``attention_lse``: one rectangle of attention with its log-sum-exp, the op the merge engine runs.

Contract: q ``[B, H, Tq, D]``, k/v ``[B, Hkv, Tk, D]`` (H a multiple of Hkv), ``window=(left, right)`` in
flash-attention's convention (query t faces key ``t + Tk - Tq``, bottom-right aligned, and sees keys
from ``left`` before to ``right`` after it; -1 = unbounded; (-1, -1) every key, (-1, 0) causal),
``scale`` the softmax scale -> (out ``[B, H, Tq, Dv]`` in q's dtype, lse ``[B, H, Tq]`` float32, the
natural log of each row's sum of exp(scaled scores)). Every query row sees at least one key (the
engine cuts the others).

Backends, registered on the one dispatch point (``ropekit.dispatch``; force one with ``backend=``,
``use_backend(name, "attention_lse")`` or ``ROPEKIT_ATTENTION_BACKEND``):

- ``cpu-flash``: torch's CPU flash op ``_scaled_dot_product_flash_attention_for_cpu``, which returns the
  log-sum-exp (SDPA does not). Grouped-query heads read the keys through a stride-0 view (no copy;
  a decoding step folds the query group into rows instead, so each key is read once); causal
  squares use the op's causal mode, reverse-causal ones the same on reversed rows; any other window
  gets an additive mask of the rectangle's size (the engine keeps those at ``block x (block + window)``).
- ``cuda-varlen``: ``torch.nn.attention.varlen.varlen_attn`` (flash attention in torch >= 2.11: the
  window, grouped-query heads and the log-sum-exp through ``return_aux``); chosen where the installed
  torch has it (checked at run time) for float16/bfloat16 CUDA tensors.
- ``emulated-varlen``: the ``cuda-varlen`` backend's layout code calling ``emulated_varlen_attn``, a
  masked computation with varlen_attn's documented signature and contract; never chosen
  automatically: it tests the CUDA backend's argument handling on any device.
- ``torch``: a masked computation in query blocks (materialises ``[block, Tk]`` scores); the fallback
  where no fused op applies.

torch's own ops were chosen over hand-written kernels and over FlexAttention: the CPU flash op ran
faster than FlexAttention on the CPU and FlexAttention refused to return the log-sum-exp there;
varlen_attn is flash attention with every feature the engine needs and no extra package.
"""

from __future__ import annotations

import inspect
import math

import torch

from ropekit.dispatch import define_op

ATTENTION_LSE = define_op(
    "attention_lse", "ROPEKIT_ATTENTION_BACKEND",
    "(q, k, v, *, window, scale) -> (out, lse); one rectangle of attention with its log-sum-exp")
CPU_FLASH_DTYPES = (torch.float32, torch.bfloat16)
CUDA_FLASH_DTYPES = (torch.float16, torch.bfloat16)
TORCH_BLOCK = 512
FOLD_ROWS = 16  # up to this many queries a full rectangle folds the query group into rows


def window_allowed(num_q: int, num_k: int, window: tuple[int, int], device=None) -> torch.Tensor:
    """``[Tq, Tk]`` bool: which keys each query sees under flash-attention's ``window`` (module docstring)."""
    left, right = window
    rel = torch.arange(num_k, device=device)[None, :] - (torch.arange(num_q, device=device)[:, None] + num_k - num_q)
    allowed = torch.ones(num_q, num_k, dtype=torch.bool, device=device)
    if left >= 0:
        allowed &= rel >= -left
    if right >= 0:
        allowed &= rel <= right
    return allowed


def _masked_lse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, allowed: torch.Tensor,
                scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention with its log-sum-exp from explicit scores. q ``[B, H, C, D]``, k/v ``[B, H, Tk, D]``
    (heads already matched), allowed ``[C, Tk]`` bool -> (out ``[B, H, C, Dv]``, lse ``[B, H, C]`` float32)."""
    scores = (q.float() @ k.float().transpose(-1, -2)) * scale
    scores = scores.masked_fill(~allowed, float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)
    probs = torch.exp(scores - lse[..., None].clamp(min=-1e30)).nan_to_num_(0.0)
    return (probs @ v.float()).to(q.dtype), lse


def _expand_heads(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """k, v ``[B, Hkv, Tk, D]`` repeated to q's H heads (grouped-query heads, as ``repeat_interleave``)."""
    g = q.shape[1] // k.shape[1]
    if g == 1:
        return k, v
    return k.repeat_interleave(g, dim=1), v.repeat_interleave(g, dim=1)


def torch_attention_lse(q, k, v, *, window=(-1, -1), scale=None):
    """The ``torch`` backend: masked scores in blocks of ``TORCH_BLOCK`` queries (float32)."""
    B, H, Tq, D = q.shape
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    k, v = _expand_heads(q, k, v)
    allowed = window_allowed(Tq, k.shape[2], window, q.device)
    out = q.new_empty(B, H, Tq, v.shape[-1])
    lse = torch.empty(B, H, Tq, dtype=torch.float32, device=q.device)
    for a in range(0, Tq, TORCH_BLOCK):
        b = min(a + TORCH_BLOCK, Tq)
        out[:, :, a:b], lse[:, :, a:b] = _masked_lse(q[:, :, a:b], k, v, allowed[a:b], scale)
    return out, lse


def _cpu_flash_op():
    return getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)


def cpu_flash_attention_lse(q, k, v, *, window=(-1, -1), scale=None):
    """The ``cpu-flash`` backend (module docstring). Grouped-query heads are a stride-0 view of the keys
    (the op reads strided tensors), so no key is copied; a reverse-causal square (window (0, -1)) runs
    as a causal one on the queries and keys in reverse order."""
    op = _cpu_flash_op()
    B, H, Tq, D = q.shape
    Hkv, Tk = k.shape[1], k.shape[2]
    g = H // Hkv
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    if window == (-1, -1) and Tq <= FOLD_ROWS:  # decoding: a KV head's g queries are rows of one batch
        out, lse = op(q.reshape(B, Hkv, g * Tq, D), k, v, 0.0, False, scale=scale)[:2]
        return out.reshape(B, H, Tq, -1), lse.reshape(B, H, Tq).float()
    reverse = window == (0, -1) and Tq == Tk
    if reverse:
        q, k, v = q.flip(2), k.flip(2), v.flip(2)
    rows = q.reshape(B * Hkv, g, Tq, D)
    keys = k.reshape(B * Hkv, 1, Tk, D).expand(-1, g, -1, -1)
    values = v.reshape(B * Hkv, 1, Tk, v.shape[-1]).expand(-1, g, -1, -1)
    if window == (-1, -1):
        out, lse = op(rows, keys, values, 0.0, False, scale=scale)[:2]
    elif reverse or (window == (-1, 0) and Tq == Tk):
        out, lse = op(rows, keys, values, 0.0, True, scale=scale)[:2]
    else:
        bias = torch.zeros(Tq, Tk, dtype=q.dtype, device=q.device)
        bias.masked_fill_(~window_allowed(Tq, Tk, window, q.device), float("-inf"))
        out, lse = op(rows, keys, values, 0.0, False, attn_mask=bias, scale=scale)[:2]
    out, lse = out.reshape(B, H, Tq, -1), lse.reshape(B, H, Tq).float()
    if reverse:
        out, lse = out.flip(2), lse.flip(-1)
    return out, lse


def _supports_cpu_flash(q, k, v, **kwargs) -> bool:
    return q.device.type == "cpu" and q.dtype in CPU_FLASH_DTYPES and _cpu_flash_op() is not None \
        and k.dtype == q.dtype


def installed_varlen_attn():
    """torch's ``varlen_attn`` where the installed torch has it (torch >= 2.11), else None."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    return varlen_attn


def emulated_varlen_attn(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, return_aux=None, scale=None,
                         window_size=(-1, -1), enable_gqa=False, seqused_k=None, block_table=None,
                         num_splits=None):
    """``varlen_attn``'s documented contract computed with masks: packed query ``(Tq, Hq, D)``, key/value
    ``(Tk, Hkv, D)``, cumulative lengths ``(N+1,)``; returns output ``(Tq, Hq, D)`` and, when
    ``return_aux.lse``, the log-sum-exp ``(Tq, Hq)``. Hq != Hkv needs ``enable_gqa``; ``window_size``
    bottom-right aligned within each sequence."""
    if block_table is not None:
        raise ValueError("emulated_varlen_attn: block_table is not emulated")
    Hq, Hkv, D = query.shape[1], key.shape[1], query.shape[2]
    if Hq != Hkv and not enable_gqa:
        raise ValueError(f"varlen_attn: {Hq} query heads and {Hkv} key heads need enable_gqa=True")
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    out = torch.empty(query.shape[0], Hq, value.shape[-1], dtype=query.dtype, device=query.device)
    lse = torch.empty(query.shape[0], Hq, dtype=torch.float32, device=query.device)
    starts_q, starts_k = cu_seq_q.tolist(), cu_seq_k.tolist()
    for n in range(len(starts_q) - 1):
        qa, qb, ka, kb = starts_q[n], starts_q[n + 1], starts_k[n], starts_k[n + 1]
        if seqused_k is not None:
            kb = ka + int(seqused_k[n])
        if qb - qa > max_q or kb - ka > max_k:
            raise ValueError("varlen_attn: a sequence is longer than max_q/max_k")
        q = query[qa:qb].transpose(0, 1)[None]  # [1, Hq, Tq, D]
        k, v = key[ka:kb].transpose(0, 1)[None], value[ka:kb].transpose(0, 1)[None]
        k, v = _expand_heads(q, k, v)
        o, l = _masked_lse(q, k, v, window_allowed(qb - qa, kb - ka, tuple(window_size), query.device), scale)
        out[qa:qb], lse[qa:qb] = o[0].transpose(0, 1), l[0].transpose(0, 1)
    if return_aux is not None and getattr(return_aux, "lse", False):
        return out, lse
    return out


def varlen_attention_lse(q, k, v, *, window=(-1, -1), scale=None, varlen_attn=None):
    """The ``cuda-varlen`` backend: the batch packed as B sequences of Tq queries and Tk keys, one
    ``varlen_attn`` call (``varlen_attn`` defaults to torch's)."""
    from torch.nn.attention.varlen import AuxRequest

    varlen_attn = varlen_attn or installed_varlen_attn()
    B, H, Tq, D = q.shape
    Hkv, Tk = k.shape[1], k.shape[2]
    packed_q = q.transpose(1, 2).reshape(B * Tq, H, D)
    packed_k = k.transpose(1, 2).reshape(B * Tk, Hkv, D)
    packed_v = v.transpose(1, 2).reshape(B * Tk, Hkv, v.shape[-1])
    cu_q = torch.arange(0, (B + 1) * Tq, Tq, dtype=torch.int32, device=q.device)
    cu_k = torch.arange(0, (B + 1) * Tk, Tk, dtype=torch.int32, device=q.device)
    options = {"return_aux": AuxRequest(lse=True), "scale": scale, "window_size": tuple(window)}
    if H != Hkv:
        if "enable_gqa" in inspect.signature(varlen_attn).parameters:
            options["enable_gqa"] = True
        else:  # an older varlen_attn: heads matched by copying
            g = H // Hkv
            packed_k, packed_v = packed_k.repeat_interleave(g, dim=1), packed_v.repeat_interleave(g, dim=1)
    out, lse = varlen_attn(packed_q, packed_k, packed_v, cu_q, cu_k, Tq, Tk, **options)
    if lse.shape != (B * Tq, H) and lse.shape == (H, B * Tq):  # flash's own layout, should a torch return it
        lse = lse.T
    return (out.view(B, Tq, H, -1).transpose(1, 2),
            lse.reshape(B, Tq, H).transpose(1, 2).float())


def emulated_varlen_attention_lse(q, k, v, *, window=(-1, -1), scale=None):
    """The ``emulated-varlen`` backend: ``varlen_attention_lse`` over ``emulated_varlen_attn``."""
    return varlen_attention_lse(q, k, v, window=window, scale=scale, varlen_attn=emulated_varlen_attn)


def _supports_cuda_varlen(q, k, v, **kwargs) -> bool:
    return q.device.type == "cuda" and q.dtype in CUDA_FLASH_DTYPES and installed_varlen_attn() is not None


ATTENTION_LSE.register("torch", torch_attention_lse, priority=0)
ATTENTION_LSE.register("emulated-varlen", emulated_varlen_attention_lse, priority=-10)
ATTENTION_LSE.register("cpu-flash", cpu_flash_attention_lse, _supports_cpu_flash, priority=10)
ATTENTION_LSE.register("cuda-varlen", varlen_attention_lse, _supports_cuda_varlen, priority=10)


def attention_lse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, window: tuple[int, int] = (-1, -1),
                  scale: float | None = None, backend: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """One rectangle of attention with its log-sum-exp through the selected backend (module docstring)."""
    return ATTENTION_LSE(q, k, v, window=window, scale=scale, backend=backend)
