"""Attention with remapped relative positions: the shared engine of Self-Extend and (Leaky) ReRoPE.

Both methods give each query-key pair one of two rotations:
- *near* pairs (relative position ``pos_q - pos_k < window``) use the normal RoPE rotation;
- *far* pairs use a second rotation of q and k at remapped positions (Self-Extend: grouped
  ``floor(p/G)`` positions; ReRoPE: q at ``w`` and k at 0, so the relative distance is ``w``).
Both score sets go into ONE softmax.

Memory and speed: in a prefill whose positions are the slots (no cache, no padding: the
perplexity case) on the CPU, the far pairs (j <= i - W) form a causal attention shifted by W,
run as one fused flash SDPA (with its log-sum-exp), and the near pairs a sliding window run in
query chunks; the two partial softmaxes are merged exactly through their log-sum-exps. Every
other case (cache, padding, arbitrary positions, other devices) takes the general path:
queries in chunks of ``chunk_size``, one ``[B, H, C, S]`` score block per chunk (near scores
only on the band of key slots that holds near pairs). Neither path materialises ``T x T``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ropekit.attention.base import AttentionVariant, current_length
from ropekit.rope import RotaryEmbedding, apply_rotary, rope_cos_sin

DEFAULT_CHUNK = 512
_FLASH_DTYPES = (torch.float32, torch.bfloat16)


def flash_with_lse(device: torch.device):
    """torch's flash-attention op returning (out, logsumexp) for ``device``, or None (then the
    general path runs). Only the CPU op has a usable contract here; it must never see a CUDA tensor."""
    if device.type != "cpu":
        return None
    return getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)


def _is_plain_prefill(q_pos: torch.Tensor, k_pos: torch.Tensor, mask: torch.Tensor | None) -> bool:
    """No cache, no padding, positions = slot + constant: the fast path applies."""
    if mask is not None or q_pos.shape != k_pos.shape or not torch.equal(q_pos, k_pos):
        return False
    steps = q_pos[:, 1:] - q_pos[:, :-1]
    return bool((steps == 1).all())


def block_allowed(mask: torch.Tensor | None, slots: torch.Tensor, past: int, a: int, b: int) -> torch.Tensor:
    """Which key slots queries a..b-1 may see: causal by slot (query t sits in slot past + t) without a
    mask, else the mask's rows. slots ``[S]`` -> ``[1 or B, b - a, past + b]`` bool."""
    kend = past + b
    if mask is None:
        return (slots[None, :kend] <= (past + torch.arange(a, b, device=slots.device))[:, None])[None]
    return mask[:, 0, a:b, :kend]


def first_band_slot(band: torch.Tensor, kend: int) -> int:
    """The first key slot any row of ``band`` ``[B, C, kend]`` (bool) holds, else ``kend``: where a block's
    band of specially rotated pairs starts."""
    cols = band.any(dim=1).any(dim=0).nonzero()
    return int(cols[0]) if len(cols) else kend


def merged_softmax_values(scores: torch.Tensor, allowed: torch.Tensor, v: torch.Tensor, scale: float,
                          softcap: float | None) -> torch.Tensor:
    """One softmax over a block's merged scores, then the values: the last step of every general path.

    scores ``[B, Hkv, g, C, S]`` (each pair's score from its own rotation, in q's dtype), allowed
    ``[B, C, S]`` bool, v ``[B, Hkv, S, Dv]`` -> ``[B, Hkv, g*C, Dv]`` in v's dtype. Scaled and soft-capped
    in float32; a row with no allowed key gives zeros.
    """
    B, Hkv, g, C, S = scores.shape
    scores = scores.float().mul_(scale)
    if softcap:
        scores = torch.tanh(scores / softcap).mul_(softcap)
    scores = scores.masked_fill_(~allowed[:, None, None], float("-inf"))
    probs = torch.softmax(scores, dim=-1).nan_to_num_(0.0)  # all-masked rows -> zeros
    return probs.to(v.dtype).view(B, Hkv, g * C, S) @ v


def _window_attention(op, q, k, v, window: int, chunk_size: int, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Causal attention restricted to ``0 <= i - j < window`` (slots), with its log-sum-exp.

    q ``[B, H, T, D]``, k/v ``[B, H, T, D]`` -> (out ``[B, H, T, Dv]``, lse ``[B, H, T]``).
    """
    B, H, T, D = q.shape
    out = q.new_empty(B, H, T, v.shape[-1])
    lse = q.new_empty(B, H, T, dtype=torch.float32)
    for a in range(0, T, chunk_size):
        b = min(a + chunk_size, T)
        lo = max(0, a - window + 1)
        rel = torch.arange(a, b, device=q.device)[:, None] - torch.arange(lo, b, device=q.device)[None, :]
        bias = torch.zeros(rel.shape, dtype=q.dtype, device=q.device)
        bias.masked_fill_(~((rel >= 0) & (rel < window)), float("-inf"))  # [C, b-lo] additive mask
        o, part_lse = op(q[:, :, a:b].contiguous(), k[:, :, lo:b].contiguous(), v[:, :, lo:b].contiguous(),
                         0.0, False, attn_mask=bias, scale=scale)
        out[:, :, a:b], lse[:, :, a:b] = o, part_lse.float()
    return out, lse


def fast_prefill_attention(q_near, k_near, q_far, k_far, v, window: int, chunk_size: int = DEFAULT_CHUNK,
                           scale: float | None = None):
    """``merged_attention`` for a plain prefill on the CPU (positions = slots): shifted-causal flash SDPA
    for the far pairs + chunked sliding window for the near pairs, merged by log-sum-exp."""
    op = flash_with_lse(q_near.device)
    if op is None:
        raise ValueError(f"fast_prefill_attention runs on CPU tensors only, got {q_near.device}")
    B, H, T, D = q_near.shape
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    g = H // k_near.shape[1]
    if g > 1:  # [B, Hkv, T, D] -> [B, H, T, D]
        k_near, k_far, v = (x.repeat_interleave(g, dim=1) for x in (k_near, k_far, v))
    out, lse = _window_attention(op, q_near, k_near, v, window, chunk_size, scale)
    if T <= window:
        return out
    # far pairs: query i sees keys j <= i - W, i.e. queries W.. vs keys ..T-W, causal top-left
    far_out, far_lse = op(q_far[:, :, window:].contiguous(), k_far[:, :, : T - window].contiguous(),
                          v[:, :, : T - window].contiguous(), 0.0, True, scale=scale)
    near_lse = lse[:, :, window:]
    total = torch.logaddexp(near_lse, far_lse.float())
    w_near = torch.exp(near_lse - total)[..., None].to(out.dtype)
    w_far = torch.exp(far_lse.float() - total)[..., None].to(out.dtype)
    out[:, :, window:] = w_near * out[:, :, window:] + w_far * far_out
    return out


def merged_attention(q_near: torch.Tensor, k_near: torch.Tensor, q_far: torch.Tensor, k_far: torch.Tensor,
                     v: torch.Tensor, q_pos: torch.Tensor, k_pos: torch.Tensor, window: int,
                     mask: torch.Tensor | None = None, chunk_size: int = DEFAULT_CHUNK,
                     scale: float | None = None, softcap: float | None = None) -> torch.Tensor:
    """One softmax over near scores (``q_pos - k_pos < window``) and far scores (all other pairs).

    q_near/q_far ``[B, H, T, D]`` (rotated two ways), k_near/k_far/v ``[B, Hkv, S, D]``, H a multiple
    of Hkv (grouped-query heads, as ``repeat_interleave``). q_pos ``[B, T]``, k_pos ``[B, S]`` long.
    mask ``[B, 1, T, S]`` bool (True = may attend) or None for plain causality by slot (query t
    sits in slot ``S - T + t``). ``scale``: softmax scale (default 1/sqrt(D)); ``softcap``: scores
    capped as ``c * tanh(s / c)`` (Gemma 2). Rows with no allowed key return zeros. Returns ``[B, H, T, D]``.
    """
    if (not softcap and q_near.dtype in _FLASH_DTYPES and flash_with_lse(q_near.device) is not None
            and _is_plain_prefill(q_pos, k_pos, mask)):
        return fast_prefill_attention(q_near, k_near, q_far, k_far, v, window, chunk_size, scale)
    B, H, T, D = q_near.shape
    Hkv, S = k_near.shape[1], k_near.shape[2]
    g = H // Hkv
    past = S - T
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    out = q_near.new_empty(B, H, T, v.shape[-1])
    slots = torch.arange(S, device=q_near.device)
    for a in range(0, T, chunk_size):
        b = min(a + chunk_size, T)
        C, kend = b - a, past + b  # causality by slot: no query of this chunk sees a key slot >= kend
        qn = q_near[:, :, a:b].reshape(B, Hkv, g * C, D)  # [B, H, C, D] -> [B, Hkv, g*C, D]
        qf = q_far[:, :, a:b].reshape(B, Hkv, g * C, D)
        allowed = block_allowed(mask, slots, past, a, b)  # [B|1, C, kend]
        near = ((q_pos[:, a:b, None] - k_pos[:, None, :kend]) < window) & allowed  # [B, C, kend]
        lo = first_band_slot(near, kend)  # first key slot holding any near pair
        scores = (qf @ k_far[:, :, :kend].transpose(-1, -2)).view(B, Hkv, g, C, kend)
        if lo < kend:
            band = (qn @ k_near[:, :, lo:kend].transpose(-1, -2)).view(B, Hkv, g, C, kend - lo)
            scores[..., lo:] = torch.where(near[:, None, None, :, lo:], band, scores[..., lo:])
        ctx = merged_softmax_values(scores, allowed, v[:, :, :kend], scale, softcap)  # [B, Hkv, g*C, Dv]
        out[:, :, a:b] = ctx.view(B, H, C, -1)
    return out


@dataclass
class RemapTables:
    """Per-forward tables of a remapped variant: positions, (cos, sin) near and far for q and k, q scale."""

    q_pos: torch.Tensor  # [B, T]
    k_pos: torch.Tensor  # [B, S], -1 = padding
    q_near: tuple[torch.Tensor, torch.Tensor]
    k_near: tuple[torch.Tensor, torch.Tensor]
    q_far: tuple[torch.Tensor, torch.Tensor]
    k_far: tuple[torch.Tensor, torch.Tensor]
    q_scale: torch.Tensor | None  # [B, T] multiplier on the queries, or None


class RemappedVariant(AttentionVariant):
    """Base class: near pairs at their true relative positions, far pairs at ``far_positions``.

    Subclasses set ``window`` and ``chunk_size`` and implement ``far_positions(q_pos, k_pos) ->
    (q_far, k_far)`` (float or long tensors of the same shapes).
    """

    window: int
    chunk_size: int = DEFAULT_CHUNK

    def far_positions(self, q_pos: torch.Tensor, k_pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def query_scale(self, q_pos: torch.Tensor, rope: RotaryEmbedding) -> torch.Tensor | None:
        """Optional ``[B, T]`` multiplier on the queries (ReRoPE's log-n scaling); None = none."""
        return None

    def tables(self, rope: RotaryEmbedding, q_pos: torch.Tensor, k_pos: torch.Tensor) -> RemapTables:
        """Rotation tables (near and far, queries and every key) at the current length's frequencies."""
        inv_freq, factor = rope.frequencies(current_length(q_pos, k_pos, rope))
        k_safe = k_pos.clamp(min=0)  # padding keys are masked; any rotation will do
        q_far, k_far = self.far_positions(q_pos, k_safe)
        return RemapTables(
            q_pos=q_pos, k_pos=k_pos, q_near=rope_cos_sin(inv_freq, q_pos, factor),
            k_near=rope_cos_sin(inv_freq, k_safe, factor), q_far=rope_cos_sin(inv_freq, q_far, factor),
            k_far=rope_cos_sin(inv_freq, k_far, factor), q_scale=self.query_scale(q_pos, rope))

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, tables: RemapTables,
               mask: torch.Tensor | None = None, scale: float | None = None, softcap: float | None = None,
               layout: str = "half") -> torch.Tensor:
        """q ``[B, H, T, D]``, k/v ``[B, Hkv, S, D]`` unrotated -> ``[B, H, T, D]``."""
        if tables.q_scale is not None:
            q = q * tables.q_scale[:, None, :, None].to(q.dtype)

        def rotate(x, table):  # float32 angles; rounded once, to the cache's dtype (q may come in float32)
            return apply_rotary(x, *table, layout=layout).to(v.dtype)

        return merged_attention(
            rotate(q, tables.q_near), rotate(k, tables.k_near), rotate(q, tables.q_far), rotate(k, tables.k_far), v,
            tables.q_pos, tables.k_pos, self.window, mask, self.chunk_size, scale, softcap)
