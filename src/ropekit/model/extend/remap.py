"""Attention with remapped relative positions: the shared engine of Self-Extend and (Leaky) ReRoPE.

Both methods give each query-key pair one of two rotations:
- *near* pairs (relative position ``pos_q - pos_k < window``) use the normal RoPE rotation;
- *far* pairs use a second rotation of q and k at remapped positions (Self-Extend: grouped
  ``floor(p/G)`` positions; ReRoPE: q at ``w`` and k at 0, so the relative distance is ``w``).
Both score sets go into ONE softmax. Keys are cached UNROTATED and rotated on use (twice: near
and far) at the frequencies of the current length, so prefill and cached decode are exact and
length-dependent rope types (dynamic NTK / dynamic YaRN) stay consistent for every cached key.

Memory and speed: in a prefill whose positions are the slots (no cache, no padding: the
perplexity case) the far pairs (j <= i - W) form a causal attention shifted by W, run as one
fused SDPA (flash kernel, with its log-sum-exp), and the near pairs a sliding window run in
query chunks; the two partial softmaxes are merged exactly through their log-sum-exps. Any
other case (cache, padding, arbitrary positions) takes the general path: queries in chunks of
``chunk_size``, one ``[B, H, C, S]`` score block per chunk (near scores only on the band of key
slots that holds near pairs). Neither path materialises ``T x T``.
"""

from __future__ import annotations

import math

import torch

from ropekit.model.attention import AttentionContext, AttentionMethod
from ropekit.rope import apply_rotary

DEFAULT_CHUNK = 512


def cos_sin_at(inv_freq: torch.Tensor, positions: torch.Tensor, attention_factor: float = 1.0,
               dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin at real-valued positions (Leaky ReRoPE needs fractional ones), angles in float64.

    inv_freq ``(R/2,)``, positions ``(T,)`` or ``(B, T)`` (any dtype) -> ``positions.shape + (R/2,)``.
    """
    angles = positions.to(torch.float64).unsqueeze(-1) * inv_freq.to(torch.float64, copy=False)
    angles = torch.remainder(angles, 2 * math.pi)
    return (torch.cos(angles) * attention_factor).to(dtype), (torch.sin(angles) * attention_factor).to(dtype)


def all_key_positions(context: AttentionContext) -> torch.Tensor:
    """``[B, S]`` long: the positions of every key this pass attends to (cached + new; -1 = padding)."""
    B = context.key_positions.shape[0]
    new = context.key_positions.expand(B, -1)
    if context.cache is None or context.past == 0:
        return new
    return torch.cat([context.cache.key_positions[:, : context.past], new], dim=1)


def _flash_with_lse():
    """torch's CPU flash-attention op returning (out, logsumexp), or None where unavailable."""
    op = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    return op


def _is_plain_prefill(q_pos: torch.Tensor, k_pos: torch.Tensor, mask: torch.Tensor | None) -> bool:
    """No cache, no padding, positions = slot + constant: the fast path applies."""
    if mask is not None or q_pos.shape != k_pos.shape or not torch.equal(q_pos, k_pos):
        return False
    steps = q_pos[:, 1:] - q_pos[:, :-1]
    return bool((steps == 1).all())


def _window_attention(q, k, v, window: int, chunk_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Causal attention restricted to ``0 <= i - j < window`` (slots), with its log-sum-exp.

    q ``[B, H, T, D]``, k/v ``[B, H, T, D]`` -> (out ``[B, H, T, Dv]``, lse ``[B, H, T]``).
    """
    B, H, T, D = q.shape
    op = _flash_with_lse()
    out = q.new_empty(B, H, T, v.shape[-1])
    lse = q.new_empty(B, H, T, dtype=torch.float32)
    for a in range(0, T, chunk_size):
        b = min(a + chunk_size, T)
        lo = max(0, a - window + 1)
        rel = torch.arange(a, b, device=q.device)[:, None] - torch.arange(lo, b, device=q.device)[None, :]
        bias = torch.zeros(rel.shape, dtype=q.dtype, device=q.device)
        bias.masked_fill_(~((rel >= 0) & (rel < window)), float("-inf"))  # [C, b-lo] additive mask
        o, part_lse = op(q[:, :, a:b].contiguous(), k[:, :, lo:b].contiguous(), v[:, :, lo:b].contiguous(),
                         0.0, False, attn_mask=bias)
        out[:, :, a:b], lse[:, :, a:b] = o, part_lse.float()
    return out, lse


def fast_prefill_attention(q_near, k_near, q_far, k_far, v, window: int, chunk_size: int = DEFAULT_CHUNK):
    """``merged_attention`` for a plain prefill (positions = slots): shifted-causal flash SDPA for
    the far pairs + chunked sliding window for the near pairs, merged by log-sum-exp."""
    op = _flash_with_lse()
    B, H, T, D = q_near.shape
    g = H // k_near.shape[1]
    if g > 1:  # [B, Hkv, T, D] -> [B, H, T, D]
        k_near, k_far, v = (x.repeat_interleave(g, dim=1) for x in (k_near, k_far, v))
    out, lse = _window_attention(q_near, k_near, v, window, chunk_size)
    if T <= window:
        return out
    # far pairs: query i sees keys j <= i - W, i.e. queries W.. vs keys ..T-W, causal top-left
    far_out, far_lse = op(q_far[:, :, window:].contiguous(), k_far[:, :, : T - window].contiguous(),
                          v[:, :, : T - window].contiguous(), 0.0, True)
    near_lse = lse[:, :, window:]
    total = torch.logaddexp(near_lse, far_lse.float())
    w_near = torch.exp(near_lse - total)[..., None].to(out.dtype)
    w_far = torch.exp(far_lse.float() - total)[..., None].to(out.dtype)
    out[:, :, window:] = w_near * out[:, :, window:] + w_far * far_out
    return out


def merged_attention(q_near: torch.Tensor, k_near: torch.Tensor, q_far: torch.Tensor, k_far: torch.Tensor,
                     v: torch.Tensor, q_pos: torch.Tensor, k_pos: torch.Tensor, window: int,
                     mask: torch.Tensor | None = None, chunk_size: int = DEFAULT_CHUNK) -> torch.Tensor:
    """One softmax over near scores (``q_pos - k_pos < window``) and far scores (all other pairs).

    q_near/q_far ``[B, H, T, D]`` (rotated two ways), k_near/k_far/v ``[B, Hkv, S, D]``, H a multiple
    of Hkv (grouped-query heads, as ``repeat_interleave``). q_pos ``[B, T]``, k_pos ``[B, S]`` long.
    mask ``[B, 1, T, S]`` bool (True = may attend) or None for plain causality by slot (query t
    sits in slot ``S - T + t``). Rows with no allowed key return zeros. Returns ``[B, H, T, D]``.
    """
    if (_flash_with_lse() is not None and q_near.dtype in (torch.float32, torch.bfloat16)
            and _is_plain_prefill(q_pos, k_pos, mask)):
        return fast_prefill_attention(q_near, k_near, q_far, k_far, v, window, chunk_size)
    B, H, T, D = q_near.shape
    Hkv, S = k_near.shape[1], k_near.shape[2]
    g = H // Hkv
    past = S - T
    scale = 1.0 / math.sqrt(D)
    out = q_near.new_empty(B, H, T, v.shape[-1])
    slots = torch.arange(S, device=q_near.device)
    for a in range(0, T, chunk_size):
        b = min(a + chunk_size, T)
        C, kend = b - a, past + b  # causality by slot: no query of this chunk sees a key slot >= kend
        qn = q_near[:, :, a:b].reshape(B, Hkv, g * C, D)  # [B, H, C, D] -> [B, Hkv, g*C, D]
        qf = q_far[:, :, a:b].reshape(B, Hkv, g * C, D)
        if mask is None:
            allowed = (slots[None, :kend] <= (past + torch.arange(a, b, device=slots.device))[:, None])[None]
        else:
            allowed = mask[:, 0, a:b, :kend]  # [B, C, kend]
        near = (q_pos[:, a:b, None] - k_pos[:, None, :kend]) < window  # [B, C, kend]
        near = near & allowed
        cols = near.any(dim=1).any(dim=0).nonzero()
        lo = int(cols[0]) if len(cols) else kend  # first key slot holding any near pair
        scores = (qf @ k_far[:, :, :kend].transpose(-1, -2)).view(B, Hkv, g, C, kend)
        if lo < kend:
            band = (qn @ k_near[:, :, lo:kend].transpose(-1, -2)).view(B, Hkv, g, C, kend - lo)
            scores[..., lo:] = torch.where(near[:, None, None, :, lo:], band, scores[..., lo:])
        scores = scores.float().mul_(scale).masked_fill_(~allowed[:, None, None], float("-inf"))
        probs = torch.softmax(scores, dim=-1).nan_to_num_(0.0)  # all-masked rows -> zeros
        ctx = probs.to(v.dtype).view(B, Hkv, g * C, kend) @ v[:, :, :kend]  # [B, Hkv, g*C, Dv]
        out[:, :, a:b] = ctx.view(B, H, C, -1)
    return out


class RemappedAttention(AttentionMethod):
    """Base class: near pairs at their true relative positions, far pairs at ``far_positions``.

    Subclasses set ``window`` and implement ``far_positions(q_pos, k_pos) -> (q_far, k_far)``
    (float or long tensors of the same shapes). Keys are cached unrotated.
    """

    window: int
    chunk_size: int = DEFAULT_CHUNK
    stores_rotated_keys = False

    def far_positions(self, q_pos: torch.Tensor, k_pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def query_scale(self, q_pos: torch.Tensor, context: AttentionContext) -> torch.Tensor | None:
        """Optional ``[B, T]`` multiplier on the queries (ReRoPE's log-n scaling); None = none."""
        return None

    def prepare(self, context: AttentionContext) -> None:
        """Rotation tables (near and far, queries and every key) at the current length's frequencies."""
        B = context.key_positions.shape[0]
        q_pos = context.positions.expand(B, -1)  # [B, T]
        k_pos = all_key_positions(context)  # [B, S]
        seq_len = int(max(int(k_pos.max()), int(q_pos.max()))) + 1
        inv_freq, factor = context.rope.frequencies(seq_len)
        k_safe = k_pos.clamp(min=0)  # padding keys are masked; any rotation will do
        q_far, k_far = self.far_positions(q_pos, k_safe)
        context.cos, context.sin = cos_sin_at(inv_freq, q_pos, factor)
        context.extra["remap"] = {
            "q_pos": q_pos, "k_pos": k_pos,
            "q_near": (context.cos, context.sin), "k_near": cos_sin_at(inv_freq, k_safe, factor),
            "q_far": cos_sin_at(inv_freq, q_far, factor), "k_far": cos_sin_at(inv_freq, k_far, factor),
            "q_scale": self.query_scale(q_pos, context),
        }

    def attend(self, layer_idx: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               context: AttentionContext) -> torch.Tensor:
        """q ``[B, H, T, D]``, k/v ``[B, Hkv, T, D]`` unrotated -> ``[B, H, T, D]``."""
        if context.cache is not None:
            k, v = context.cache.update(layer_idx, k, v, context.key_positions)  # unrotated keys
        t = context.extra["remap"]
        if t["q_scale"] is not None:
            q = q * t["q_scale"][:, None, :, None].to(q.dtype)
        return merged_attention(
            apply_rotary(q, *t["q_near"]), apply_rotary(k, *t["k_near"]),
            apply_rotary(q, *t["q_far"]), apply_rotary(k, *t["k_far"]), v,
            t["q_pos"], t["k_pos"], self.window, context.mask, self.chunk_size)
