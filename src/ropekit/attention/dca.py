"""Dual Chunk Attention, DCA (An et al. 2024, "Training-Free Long-Context Scaling of Large Language
Models", arXiv 2402.17463; repo HKUNLP/ChunkLlama, ``chunkllama_attn_replace.py``).

Chunk size S and local window W; chunk length ``CL = S - W``. Positions are cut into chunks of CL
tokens from position 0 (chunk of position p: ``floor(p / CL)``). Every key at position j is
rotated at ``j mod CL``; a query at position i is rotated at one of three positions, chosen per
query-key pair by how many chunks lie between them:

- **intra-chunk** (key in the query's own chunk): ``i mod CL``, so the relative distance is
  the true one, ``i - j``;
- **successive-chunk** (key in the previous chunk): ``min(i mod CL + CL, S)``: the true distance
  for the first W queries of a chunk, capped at S after them;
- **inter-chunk** (any older chunk): ``min(2 CL - 1, S)`` for every query.

The three score sets share ONE softmax (merged exactly), with no magnitude scaling; no relative
distance exceeds S, which stays inside the trained length L. The inter-chunk query position is the
one ChunkLlama's code uses (the successive table at ``CL - 1``: ``min(2 CL - 1, S)``), as did vLLM's
``DualChunkRotaryEmbedding`` (``qc_t`` clamped at ``chunk_size``, inter query at ``chunk_len - 1``);
the paper's text writes the inter-chunk query position as a constant one position away from it.

Defaults for a model trained on L tokens (``original_max_position_embeddings``, else
``max_position_embeddings`` of the rope config): ``S = 3L/4``, ``W = L/8`` (integer division).

Two paths, neither materialising ``T x T``: a plain CPU prefill (positions are consecutive slots,
the same in every row, no mask, no softcap) runs, per chunk of queries, the intra part as a causal
flash SDPA, the successive and inter parts as non-causal flash SDPAs, and merges the three by
their log-sum-exps; every other case (cache, padding, arbitrary positions, softcap, other
devices) takes the general path: queries in blocks of ``block`` with one ``[B, H, C, S]`` score
block each (intra and successive scores only on the band of key slots that holds such pairs).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ropekit.attention.base import AttentionVariant, current_length
from ropekit.attention.remap import (
    _FLASH_DTYPES,
    DEFAULT_CHUNK,
    _is_plain_prefill,
    block_allowed,
    first_band_slot,
    flash_with_lse,
    merged_softmax_values,
)
from ropekit.rope import RotaryEmbedding, apply_rotary, rope_cos_sin

INTRA, SUCCESSIVE, INTER = 0, 1, 2


def dca_sizes(trained: int | None, chunk: int | None = None, local: int | None = None) -> tuple[int, int]:
    """(S, W): ``chunk`` and ``local`` where given, else ``3L/4`` and ``L/8`` of the trained length L.

    ValueError naming the key when a size is out of range (``local >= 1``, ``chunk > local``) or when
    a default is needed and L is unknown.
    """
    if (chunk is None or local is None) and not trained:
        raise ValueError("dca needs 'chunk' and 'local' (integers, chunk > local >= 1) when the model's trained "
                         "length (original_max_position_embeddings or max_position_embeddings) is unknown")
    S = int(chunk) if chunk is not None else 3 * int(trained) // 4
    W = int(local) if local is not None else int(trained) // 8
    if W < 1:
        raise ValueError(f"dca key 'local'={W} is out of range [1, chunk - 1]"
                         + ("" if local is not None else f" (default L/8 of the trained length {trained})"))
    if S <= W:
        raise ValueError(f"dca key 'chunk'={S} is out of range [local + 1 = {W + 1}, inf): the chunk must be "
                         f"longer than the local window 'local'={W}")
    return S, W


def dca_query_positions(q_pos: torch.Tensor, chunk: int, local: int) -> tuple[torch.Tensor, torch.Tensor,
                                                                               torch.Tensor]:
    """A query's three rotation positions: (intra ``i mod CL``, successive ``min(i mod CL + CL, S)``,
    inter ``min(2 CL - 1, S)``), each shaped like q_pos ``[B, T]`` (long), ``CL = chunk - local``."""
    CL = chunk - local
    within = q_pos.clamp(min=0) % CL
    return within, (within + CL).clamp(max=chunk), torch.full_like(q_pos, min(2 * CL - 1, chunk))


def dca_key_positions(k_pos: torch.Tensor, chunk_len: int) -> torch.Tensor:
    """A key's rotation position ``j mod CL``; k_pos ``[B, S]`` long (negative = padding: rotated at 0)."""
    return k_pos.clamp(min=0) % chunk_len


def dca_parts(q_pos: torch.Tensor, k_pos: torch.Tensor, chunk_len: int) -> torch.Tensor:
    """``[B, T, S]`` long: INTRA (0), SUCCESSIVE (1) or INTER (2) for each pair, from the chunk distance
    ``floor(i / CL) - floor(j / CL)`` (0, 1, >= 2); a key in a later chunk counts as INTRA (causality
    masks it). q_pos ``[B, T]``, k_pos ``[B, S]`` long."""
    apart = q_pos.clamp(min=0)[:, :, None] // chunk_len - k_pos.clamp(min=0)[:, None, :] // chunk_len
    return apart.clamp(min=0, max=INTER)


def _merge_by_lse(parts: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """One softmax from partial ones: parts of (out ``[B, H, C, Dv]``, lse ``[B, H, C]``) over disjoint keys."""
    if len(parts) == 1:
        return parts[0][0]
    lses = torch.stack([lse.float() for _, lse in parts])  # [P, B, H, C]
    weights = torch.softmax(lses, dim=0)[..., None]  # exp(lse_p - logsumexp_p lse_p)
    out = sum(w * o.float() for w, (o, _) in zip(weights, parts, strict=True))
    return out.to(parts[0][0].dtype)


def fast_dca_prefill(q_intra: torch.Tensor, q_succ: torch.Tensor, q_inter: torch.Tensor, k: torch.Tensor,
                     v: torch.Tensor, start: int, chunk_len: int, scale: float | None = None) -> torch.Tensor:
    """DCA for a plain prefill on the CPU: the query at slot t has position ``start + t`` in every row.

    q_* ``[B, H, T, D]`` (rotated three ways), k/v ``[B, Hkv, T, D]`` (k rotated at ``j mod CL``). Per
    position chunk: intra = causal flash SDPA over the chunk's own keys, successive = flash SDPA over
    the previous chunk's keys, inter = flash SDPA over all older keys; merged by log-sum-exp.
    Returns ``[B, H, T, Dv]``.
    """
    op = flash_with_lse(q_intra.device)
    if op is None:
        raise ValueError(f"fast_dca_prefill runs on CPU tensors only, got {q_intra.device}")
    B, H, T, D = q_intra.shape
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    g = H // k.shape[1]
    if g > 1:  # [B, Hkv, T, D] -> [B, H, T, D]
        k, v = k.repeat_interleave(g, dim=1), v.repeat_interleave(g, dim=1)
    out = q_intra.new_empty(B, H, T, v.shape[-1])
    for c in range(start // chunk_len, (start + T - 1) // chunk_len + 1):
        a, b = max(0, c * chunk_len - start), min(T, (c + 1) * chunk_len - start)  # this chunk's slots
        prev = max(0, (c - 1) * chunk_len - start)  # the previous chunk starts here (slots)
        parts = [op(q_intra[:, :, a:b].contiguous(), k[:, :, a:b].contiguous(), v[:, :, a:b].contiguous(),
                    0.0, True, scale=scale)[:2]]
        for q, lo, hi in ((q_succ, prev, a), (q_inter, 0, prev)):  # previous chunk, older chunks
            if hi > lo:
                parts.append(op(q[:, :, a:b].contiguous(), k[:, :, lo:hi].contiguous(), v[:, :, lo:hi].contiguous(),
                                0.0, False, scale=scale)[:2])
        out[:, :, a:b] = _merge_by_lse(parts)
    return out


def _scores(q: torch.Tensor, k: torch.Tensor, groups: int) -> torch.Tensor:
    """Raw scores of grouped queries q ``[B, Hkv, g*C, D]`` against k ``[B, Hkv, K, D]`` -> ``[B, Hkv, g, C, K]``."""
    B, Hkv, rows, _ = q.shape
    return (q @ k.transpose(-1, -2)).view(B, Hkv, groups, rows // groups, k.shape[2])


def dca_attention(q_intra: torch.Tensor, q_succ: torch.Tensor, q_inter: torch.Tensor, k: torch.Tensor,
                  v: torch.Tensor, q_pos: torch.Tensor, k_pos: torch.Tensor, chunk_len: int,
                  mask: torch.Tensor | None = None, block: int = DEFAULT_CHUNK, scale: float | None = None,
                  softcap: float | None = None) -> torch.Tensor:
    """One softmax over intra, successive and inter scores (``dca_parts`` picks each pair's).

    q_* ``[B, H, T, D]`` (the queries rotated at their three positions), k/v ``[B, Hkv, S, D]`` (k
    rotated at ``j mod CL``), H a multiple of Hkv. q_pos ``[B, T]``, k_pos ``[B, S]`` long. mask
    ``[B, 1, T, S]`` bool (True = may attend) or None for causality by slot (query t sits in slot
    ``S - T + t``). ``scale`` (default 1/sqrt(D)), ``softcap`` (scores capped as ``c * tanh(s / c)``).
    Rows with no allowed key return zeros. Returns ``[B, H, T, Dv]``.
    """
    B, H, T, D = q_intra.shape
    if (not softcap and q_intra.dtype in _FLASH_DTYPES and flash_with_lse(q_intra.device) is not None
            and _is_plain_prefill(q_pos, k_pos, mask) and T > 0 and bool((q_pos[:, 0] == q_pos[0, 0]).all())
            and int(q_pos[0, 0]) >= 0):
        return fast_dca_prefill(q_intra, q_succ, q_inter, k, v, int(q_pos[0, 0]), chunk_len, scale)
    Hkv, S = k.shape[1], k.shape[2]
    g = H // Hkv
    past = S - T
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    out = q_intra.new_empty(B, H, T, v.shape[-1])
    slots = torch.arange(S, device=q_intra.device)
    for a in range(0, T, block):
        b = min(a + block, T)
        C, kend = b - a, past + b  # causality by slot: no query of this block sees a key slot >= kend
        allowed = block_allowed(mask, slots, past, a, b)  # [B|1, C, kend]
        parts = dca_parts(q_pos[:, a:b], k_pos[:, :kend], chunk_len)  # [B, C, kend]
        lo = first_band_slot((parts < INTER) & allowed, kend)  # first key slot of an intra or successive pair

        blocks = [x[:, :, a:b].reshape(B, Hkv, g * C, D) for x in (q_intra, q_succ, q_inter)]
        scores = _scores(blocks[INTER], k[:, :, :kend], g)  # [B, Hkv, g, C, kend]
        if lo < kend:
            band = parts[:, None, None, :, lo:]
            keys = k[:, :, lo:kend]
            scores[..., lo:] = torch.where(band == INTRA, _scores(blocks[INTRA], keys, g), torch.where(
                band == SUCCESSIVE, _scores(blocks[SUCCESSIVE], keys, g), scores[..., lo:]))
        ctx = merged_softmax_values(scores, allowed, v[:, :, :kend], scale, softcap)  # [B, Hkv, g*C, Dv]
        out[:, :, a:b] = ctx.view(B, H, C, -1)
    return out


@dataclass
class DcaTables:
    """Per-forward tables: positions, the chunk length, (cos, sin) of the three query rotations and the keys."""

    q_pos: torch.Tensor  # [B, T]
    k_pos: torch.Tensor  # [B, S], -1 = padding
    chunk_len: int
    q_intra: tuple[torch.Tensor, torch.Tensor]
    q_succ: tuple[torch.Tensor, torch.Tensor]
    q_inter: tuple[torch.Tensor, torch.Tensor]
    k: tuple[torch.Tensor, torch.Tensor]


class DualChunk(AttentionVariant):
    """DCA with chunk size ``chunk`` (S) and local window ``local`` (W); None = the default from the
    trained length (S = 3L/4, W = L/8). ``block``: queries per block on the general path."""

    name = "dca"

    def __init__(self, chunk: int | None = None, local: int | None = None, block: int = DEFAULT_CHUNK):
        self.chunk = None if chunk is None else int(chunk)
        self.local = None if local is None else int(local)
        self.block = int(block)
        if self.chunk is not None and self.local is not None:
            dca_sizes(None, self.chunk, self.local)

    def sizes(self, rope: RotaryEmbedding) -> tuple[int, int]:
        """(S, W) for a model with this rope (defaults from its trained length)."""
        return dca_sizes(rope.config.original_max_position_embeddings, self.chunk, self.local)

    def with_model_config(self, config) -> DualChunk:
        """The sizes a model config declares in ``dual_chunk_attention_config`` (``chunk_size``,
        ``local_size``, ``original_max_position_embeddings``, as Qwen2.5-1M's) for the keys not given;
        self when it declares none."""
        declared = getattr(config, "dual_chunk_attention_config", None)
        if not isinstance(declared, dict) or (self.chunk is not None and self.local is not None):
            return self
        trained = declared.get("original_max_position_embeddings")
        chunk = self.chunk if self.chunk is not None else declared.get("chunk_size")
        local = self.local if self.local is not None else declared.get("local_size")
        if trained and (chunk is None or local is None):
            chunk, local = dca_sizes(int(trained), chunk, local)
        return DualChunk(chunk, local, self.block)

    def tables(self, rope: RotaryEmbedding, q_pos: torch.Tensor, k_pos: torch.Tensor) -> DcaTables:
        """Rotation tables at the current length's frequencies: three per query, one per key."""
        S, W = self.sizes(rope)
        inv_freq, factor = rope.frequencies(current_length(q_pos, k_pos, rope))
        intra, succ, inter = dca_query_positions(q_pos, S, W)
        return DcaTables(
            q_pos=q_pos, k_pos=k_pos, chunk_len=S - W, q_intra=rope_cos_sin(inv_freq, intra, factor),
            q_succ=rope_cos_sin(inv_freq, succ, factor), q_inter=rope_cos_sin(inv_freq, inter, factor),
            k=rope_cos_sin(inv_freq, dca_key_positions(k_pos, S - W), factor))

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, tables: DcaTables,
               mask: torch.Tensor | None = None, scale: float | None = None, softcap: float | None = None,
               layout: str = "half") -> torch.Tensor:
        """q ``[B, H, T, D]``, k/v ``[B, Hkv, S, D]`` unrotated -> ``[B, H, T, D]``."""

        def rotate(x, table):  # float32 angles; rounded once, to the cache's dtype (q may come in float32)
            return apply_rotary(x, *table, layout=layout).to(v.dtype)

        return dca_attention(
            rotate(q, tables.q_intra), rotate(q, tables.q_succ), rotate(q, tables.q_inter), rotate(k, tables.k), v,
            tables.q_pos, tables.k_pos, tables.chunk_len, mask, self.block, scale, softcap)

    def __repr__(self) -> str:
        return f"DualChunk(chunk={self.chunk}, local={self.local})"
