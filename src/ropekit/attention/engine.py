"""The merge engine of remapped-position attention: a variant declares its parts, the engine runs each
part through a fused attention op that returns its log-sum-exp and merges the parts exactly.

A *part* is one rotation of q and k (a ``(cos, sin)`` table for each) and the query-key pairs it
covers, a ``Coverage`` over positions (``i`` the query's, ``j`` the key's):

- ``Band(low, high)``: ``low <= i - j <= high`` (None = unbounded): Self-Extend's and ReRoPE's near
  pairs ``Band(None, W - 1)`` and far pairs ``Band(W, None)``;
- ``ChunkApart(chunk_len, low, high)``: ``low <= floor(i/CL) - floor(j/CL) <= high``: Dual Chunk
  Attention's intra (0, 0), successive (1, 1) and inter (2, None) parts.

The parts of a variant cover every pair exactly once; each pair is scored with its own part's
rotations and all scores share ONE softmax. Two ways to compute that:

- **fused** (``fused_parts_attention``): where each row's positions are consecutive slots (query
  and key positions are ``slot + offset`` with one offset per row, padding keys at position -1 on
  the left, padding queries at -1: prefill, chunked prefill on a cache, one-token decoding, a
  left-padded batch), every part becomes a few rectangles of (queries, keys): *full* (every pair
  covered), *causal* (a square, query t sees keys 0..t), *reverse-causal* (a square, query t sees
  keys t..) or, at the edges of the keys and for windows narrower than 64, *banded* (masked, at most
  ``block x (block + window)``). Each rectangle runs through the ``attention_lse`` op of the
  dispatch point (``ropekit.attention.fused``: torch's CPU flash op, or on CUDA
  ``torch.nn.attention.varlen.varlen_attn``) and its output merges into a float32 accumulator by
  log-sum-exp. No ``[T, S]`` or ``[chunk, S]`` tensor exists; memory is linear in the length.
- **reference** (``reference_parts_attention``): queries in blocks, one ``[B, H, C, S]`` score block
  per block with each pair's score from its part's rotation, then one softmax. It runs where the
  fused one cannot (an arbitrary mask, positions that are not consecutive slots, a softcap) and is
  the slow path the tests compare the fused one with.

Contract of both: q per part ``[B, H, T, D]`` (rotated), k per part ``[B, Hkv, S, D]`` (rotated), v
``[B, Hkv, S, Dv]``, H a multiple of Hkv; q_pos ``[B, T]``, k_pos ``[B, S]`` long. ``mask`` ``[B, 1, T, S]``
bool (True = may attend) or None: causality by slot (query t sits in slot ``S - T + t``), keys at a
negative position are padding (never attended), a query at a negative position returns zeros. Rows
with no allowed key return zeros. Returns ``[B, H, T, Dv]`` in v's dtype.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

DEFAULT_BLOCK = 512
MIN_SPLIT_WIDTH = 64  # windows at least this wide run as squares and a full middle, narrower ones masked


@dataclass(frozen=True)
class Band:
    """Pairs with ``low <= i - j <= high`` (positions; None = unbounded on that side)."""

    low: int | None = None
    high: int | None = None

    def covers(self, rel: torch.Tensor, q_pos: torch.Tensor, k_pos: torch.Tensor) -> torch.Tensor:
        """rel = i - j ``[B, C, K]`` -> bool ``[B, C, K]``."""
        inside = torch.ones_like(rel, dtype=torch.bool)
        if self.low is not None:
            inside &= rel >= self.low
        if self.high is not None:
            inside &= rel <= self.high
        return inside


@dataclass(frozen=True)
class ChunkApart:
    """Pairs whose chunks (``floor(p / chunk_len)``, positions from 0) lie ``low..high`` apart (None =
    unbounded); a key in a later chunk counts as 0 apart (causality masks it)."""

    chunk_len: int
    low: int | None = None
    high: int | None = None

    def covers(self, rel: torch.Tensor, q_pos: torch.Tensor, k_pos: torch.Tensor) -> torch.Tensor:
        """q_pos ``[B, C, 1]``, k_pos ``[B, 1, K]`` -> bool ``[B, C, K]``."""
        apart = (q_pos.clamp(min=0) // self.chunk_len - k_pos.clamp(min=0) // self.chunk_len).clamp(min=0)
        inside = torch.ones_like(apart, dtype=torch.bool)
        if self.low is not None:
            inside &= apart >= self.low
        if self.high is not None:
            inside &= apart <= self.high
        return inside


Coverage = Band | ChunkApart


@dataclass(frozen=True)
class Part:
    """One rotation of a variant: q and k rotated with their own ``(cos, sin)`` tables (float32, shaped
    like the positions + ``(R/2,)``), covering the pairs of ``coverage``."""

    q_table: tuple[torch.Tensor, torch.Tensor]
    k_table: tuple[torch.Tensor, torch.Tensor]
    coverage: Coverage


# ---------------------------------------------------------------------------------------------- layout


@dataclass(frozen=True)
class RowGroup:
    """Rows whose positions are consecutive slots with the same offsets: the fused path's unit.

    rows: the batch rows (a list of ints, or None for all rows). First real query: slot ``q_first``
    (of the T new queries) at position ``q_start``; first real key: slot ``k_first`` at ``k_start``.
    Query t >= q_first sits at ``q_start + t - q_first``; key s >= k_first at ``k_start + s - k_first``.
    """

    rows: tuple[int, ...] | None
    q_first: int
    q_start: int
    k_first: int
    k_start: int


def consecutive_rows(q_pos: torch.Tensor, k_pos: torch.Tensor) -> list[RowGroup] | None:
    """The rows grouped by layout when every row is consecutive slots (see ``RowGroup``), else None.

    q_pos ``[B, T]``, k_pos ``[B, S]`` long, ``T <= S`` (queries in the last T slots). A row qualifies when
    its keys are -1 then ``k_start, k_start + 1, ...`` and its queries -1 then consecutive positions equal
    to those of the last T key slots. One host synchronisation (the rows' offsets); computed once per
    forward, shared by every layer.
    """
    B, T = q_pos.shape
    S = k_pos.shape[1]
    if T == 0 or T > S or k_pos.shape[0] != B:
        return None
    k_first = (k_pos < 0).sum(dim=1)  # [B] padding keys, a prefix if the row qualifies
    slots = torch.arange(S, device=k_pos.device)
    k_start = k_pos.gather(1, k_first.clamp(max=S - 1)[:, None])[:, 0]
    expected_k = torch.where(slots[None] >= k_first[:, None], k_start[:, None] + slots[None] - k_first[:, None], -1)
    qualifies = (k_pos == expected_k).all() & (q_pos == k_pos[:, S - T:]).all()
    q_first = (q_pos < 0).sum(dim=1)
    read = torch.cat([qualifies.long().view(1), torch.stack([q_first, k_first, k_start], dim=1).flatten()])
    read = read.tolist()  # the one synchronisation
    if not read[0]:
        return None
    layout = [read[1 + 3 * row: 4 + 3 * row] for row in range(B)]
    groups: dict[tuple[int, int, int], list[int]] = {}
    for row, (qf, kf, ks) in enumerate(layout):
        groups.setdefault((qf, kf, ks), []).append(row)
    if len(groups) == 1:
        (qf, kf, ks), = groups
        return [RowGroup(None, qf, ks + (S - T + qf - kf), kf, ks)]
    return [RowGroup(tuple(rows), qf, ks + (S - T + qf - kf), kf, ks) for (qf, kf, ks), rows in groups.items()]


# ---------------------------------------------------------------------------------------------- tiles


@dataclass(frozen=True)
class Tile:
    """A rectangle of one part: queries ``qa..qb-1``, keys ``ka..kb-1`` (indices into the group's real
    queries and keys) and which of its pairs count: ``window=(left, right)`` in flash-attention's
    convention (query t aligned with key ``t + (kb - ka) - (qb - qa)``, keys from ``left`` before to
    ``right`` after it; -1 = unbounded): (-1, -1) full, (-1, 0) causal."""

    part: int
    qa: int
    qb: int
    ka: int
    kb: int
    window: tuple[int, int] = (-1, -1)


def _band_tiles(part: int, qa: int, qb: int, ka: int, kb: int, offset: int, low: int, high: int | None,
                block: int) -> list[Tile]:
    """Tiles of ``low <= (t + offset) - s <= high`` over queries qa..qb-1 and keys ka..kb-1 (t, s indices
    of the group's queries and keys, ``t + offset - s`` the relative position). ``low >= 0``."""
    tiles: list[Tile] = []
    if qb <= qa or kb <= ka:
        return tiles
    if high is None:  # keys s <= t + offset - low: full columns, then a causal square, then full rows
        d = offset - low
        t0 = max(qa, ka - d)  # first query that sees a key
        if t0 >= qb:
            return tiles
        c0 = t0 + d  # the key query t0 sees last
        if c0 > ka:
            tiles.append(Tile(part, t0, qb, ka, min(c0, kb)))  # keys every query from t0 sees
        if c0 >= kb:
            return tiles
        n = min(qb - t0, kb - c0)
        tiles.append(Tile(part, t0, t0 + n, c0, c0 + n, (-1, 0)))  # the diagonal: causal square
        if t0 + n < qb:
            tiles.append(Tile(part, t0 + n, qb, c0, c0 + n))  # queries past the last key see all of them
        return tiles
    width = high - low  # a window: per block of queries, the keys any of them sees
    split = width >= MIN_SPLIT_WIDTH
    step = min(block, width) if split else block
    for a in range(qa, qb, step):
        b = min(a + step, qb)
        first, last = a + offset - high, b + offset - low  # keys first..last-1 hold the block's band
        if split and first >= ka and last <= kb:  # reverse-causal square, full middle, causal square
            tiles.append(Tile(part, a, b, first, first + b - a, (0, -1)))
            if last - (b - a) > first + (b - a):
                tiles.append(Tile(part, a, b, first + b - a, last - (b - a)))
            tiles.append(Tile(part, a, b, last - (b - a), last, (-1, 0)))
            continue
        lo, hi = max(ka, first), min(kb, last)  # at the edges of the keys: one masked tile
        a, b = max(a, lo - offset + low), min(b, hi - offset + high)  # queries that see at least one key
        if hi > lo and b > a:
            tiles.append(Tile(part, a, b, lo, hi, _window_of(a, b, hi, offset, low, high)))
    return tiles


def _window_of(a: int, b: int, hi: int, offset: int, low: int, high: int) -> tuple[int, int]:
    """(left, right) of flash-attention's window for queries a..b-1, keys ..hi-1 and the band
    ``low <= t + offset - s <= high``: bottom-right aligned, query t faces key ``t + hi - b`` and sees keys
    ``t + offset - high .. t + offset - low``. Both are >= 0 once the queries that see no key are cut."""
    shift = hi - b  # the key query t faces is t + shift
    right = (offset - low) - shift
    left = shift - (offset - high)
    return left, right


def _chunk_tiles(part: int, coverage: ChunkApart, q_start: int, num_q: int, k_start: int, num_k: int,
                 block: int) -> list[Tile]:
    """Tiles of a ``ChunkApart`` part for consecutive positions: per chunk of queries, the keys of the
    chunks ``low..high`` before it (full), or of its own chunk (causal)."""
    CL = coverage.chunk_len
    low = coverage.low or 0
    tiles: list[Tile] = []
    first, last = q_start // CL, (q_start + num_q - 1) // CL
    for c in range(first, last + 1):
        qa, qb = max(0, c * CL - q_start), min(num_q, (c + 1) * CL - q_start)
        far = 0 if coverage.high is None else max(0, (c - coverage.high) * CL)  # first key position covered
        near = (c - low + 1) * CL  # one past the last key position covered
        ka, kb = max(0, far - k_start), min(num_k, near - k_start)
        if kb <= ka:
            continue
        if low == 0:  # own chunk (and, unbounded, older ones): keys up to the query's own position
            tiles += _band_tiles(part, qa, qb, ka, kb, q_start - k_start, 0, None, block)
        else:
            tiles.append(Tile(part, qa, qb, ka, kb))
    return tiles


def part_tiles(parts: list[Coverage], group: RowGroup, num_q: int, num_k: int,
               block: int = DEFAULT_BLOCK) -> list[Tile]:
    """Every part's tiles for one row group with ``num_q`` real queries and ``num_k`` real keys."""
    offset = group.q_start - group.k_start  # relative position of query index 0 and key index 0
    tiles: list[Tile] = []
    for index, coverage in enumerate(parts):
        if isinstance(coverage, Band):
            low = max(coverage.low or 0, 0)  # causality: i >= j
            if coverage.high is not None and coverage.high < low:
                continue
            tiles += _band_tiles(index, 0, num_q, 0, num_k, offset, low, coverage.high, block)
        else:
            tiles += _chunk_tiles(index, coverage, group.q_start, num_q, group.k_start, num_k, block)
    return tiles


# ---------------------------------------------------------------------------------------------- merge


def _by_query_range(tiles: list[Tile]) -> dict[tuple[int, int], list[Tile]]:
    """The tiles grouped by their query range (first-seen order): each group merges in one pass."""
    groups: dict[tuple[int, int], list[Tile]] = {}
    for tile in tiles:
        groups.setdefault((tile.qa, tile.qb), []).append(tile)
    return groups


def merge_into(out: torch.Tensor, lse: torch.Tensor, parts: list[tuple[torch.Tensor, torch.Tensor]],
               fresh: bool) -> None:
    """Merge partial softmaxes over disjoint keys into the running one, in place, by their log-sum-exps.

    out ``[..., C, Dv]`` float32 and lse ``[..., C]`` float32 (-inf = no key yet) hold the running result;
    ``parts`` (out ``[..., C, Dv]`` any dtype, lse ``[..., C]``) are added; ``fresh``: out/lse hold nothing
    yet for these rows (skips reading them). Rows with no key at all keep lse -inf and output 0.
    """
    lses = ([] if fresh else [lse]) + [part_lse for _, part_lse in parts]
    if fresh and len(parts) == 1:
        out.copy_(parts[0][0])
        lse.copy_(parts[0][1])
        return
    top = torch.stack(lses).amax(dim=0)
    top = torch.where(torch.isinf(top), torch.zeros_like(top), top)  # rows with no key: weights 0
    weights = [torch.exp(x - top) for x in lses]
    total = torch.stack(weights).sum(dim=0)
    norm = torch.where(total > 0, total, torch.ones_like(total))
    if fresh:
        out.zero_()
    else:
        out.mul_((weights.pop(0) / norm)[..., None])
    for (part_out, _), weight in zip(parts, weights, strict=True):
        out.add_(part_out.float() * (weight / norm)[..., None])
    lse.copy_(top + torch.log(total))


def fused_parts_attention(qs: list[torch.Tensor], ks: list[torch.Tensor], v: torch.Tensor, parts: list[Coverage],
                          groups: list[RowGroup], scale: float | None = None, block: int = DEFAULT_BLOCK,
                          backend: str | None = None) -> torch.Tensor:
    """The parts' one softmax through the ``attention_lse`` op, rectangle by rectangle (module docstring).

    qs[p] ``[B, H, T, D]``, ks[p] ``[B, Hkv, S, D]`` (part p's rotations; the same tensor object may
    serve several parts), v ``[B, Hkv, S, Dv]``; ``groups`` from ``consecutive_rows``. Returns
    ``[B, H, T, Dv]`` in v's dtype; padding queries give zeros.
    """
    from ropekit.attention.fused import attention_lse

    B, H, T, D = qs[0].shape
    S = ks[0].shape[2]
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    out = torch.zeros(B, H, T, v.shape[-1], dtype=v.dtype, device=v.device)
    for group in groups:
        rows = slice(None) if group.rows is None else list(group.rows)
        qf, kf = group.q_first, group.k_first
        num_q, num_k = T - qf, S - kf
        if num_q <= 0 or num_k <= 0:  # rows of padding only: zeros
            continue
        acc = torch.zeros(B if group.rows is None else len(group.rows), H, num_q, v.shape[-1],
                          dtype=torch.float32, device=v.device)
        acc_lse = torch.full(acc.shape[:-1], float("-inf"), dtype=torch.float32, device=v.device)
        gq = [q[rows, :, qf:] for q in qs]
        gk = [k[rows, :, kf:] for k in ks]
        gv = v[rows, :, kf:]
        written: list[tuple[int, int]] = []  # query ranges that hold a result already
        for (qa, qb), tiles in _by_query_range(part_tiles(parts, group, num_q, num_k, block)).items():
            results = [attention_lse(gq[t.part][:, :, qa:qb], gk[t.part][:, :, t.ka:t.kb], gv[:, :, t.ka:t.kb],
                                     window=t.window, scale=scale, backend=backend) for t in tiles]
            fresh = not any(a < qb and qa < b for a, b in written)
            merge_into(acc[:, :, qa:qb], acc_lse[:, :, qa:qb], results, fresh)
            written.append((qa, qb))
        if group.rows is None:
            out[:, :, qf:] = acc.to(v.dtype)
        else:
            out[list(group.rows), :, qf:] = acc.to(v.dtype)
    return out


# ---------------------------------------------------------------------------------------------- reference


def block_allowed(mask: torch.Tensor | None, q_pos: torch.Tensor, k_pos: torch.Tensor, past: int, a: int,
                  b: int) -> torch.Tensor:
    """Which key slots queries a..b-1 may see: the mask's rows, else causal by slot (query t sits in slot
    past + t) with padding keys (negative position) and padding queries excluded.
    q_pos ``[B, T]``, k_pos ``[B, S]`` -> ``[B, b - a, past + b]`` bool (batch 1 for a mask of batch 1)."""
    kend = past + b
    if mask is not None:
        return mask[:, 0, a:b, :kend]
    slots = torch.arange(kend, device=k_pos.device)
    causal = slots[None, :] <= (past + torch.arange(a, b, device=k_pos.device))[:, None]  # [C, kend]
    return causal[None] & (k_pos[:, None, :kend] >= 0) & (q_pos[:, a:b, None] >= 0)


def first_band_slot(band: torch.Tensor, kend: int) -> int:
    """The first key slot any row of ``band`` ``[B, C, kend]`` (bool) holds, else ``kend``."""
    cols = band.any(dim=1).any(dim=0).nonzero()
    return int(cols[0]) if len(cols) else kend


def merged_softmax_values(scores: torch.Tensor, allowed: torch.Tensor, v: torch.Tensor, scale: float,
                          softcap: float | None) -> torch.Tensor:
    """One softmax over a block's merged scores, then the values.

    scores ``[B, Hkv, g, C, S]`` (each pair's score from its own rotation), allowed ``[B, C, S]`` bool, v
    ``[B, Hkv, S, Dv]`` -> ``[B, Hkv, g*C, Dv]`` in v's dtype. Scaled and soft-capped in float32; a row with
    no allowed key gives zeros.
    """
    B, Hkv, g, C, S = scores.shape
    scores = scores.float().mul_(scale)
    if softcap:
        scores = torch.tanh(scores / softcap).mul_(softcap)
    scores = scores.masked_fill_(~allowed[:, None, None], float("-inf"))
    probs = torch.softmax(scores, dim=-1).nan_to_num_(0.0)  # all-masked rows -> zeros
    return probs.to(v.dtype).view(B, Hkv, g * C, S) @ v


def reference_parts_attention(qs: list[torch.Tensor], ks: list[torch.Tensor], v: torch.Tensor,
                              parts: list[Coverage], q_pos: torch.Tensor, k_pos: torch.Tensor,
                              mask: torch.Tensor | None = None, block: int = DEFAULT_BLOCK,
                              scale: float | None = None, softcap: float | None = None) -> torch.Tensor:
    """The parts' one softmax, queries in blocks of ``block`` with a ``[B, H, block, S]`` score block each
    (module docstring). A pair no part covers is not attended. The first part scores every allowed pair
    before the band where later parts take over, so a part whose pairs are all far needs no band."""
    B, H, T, D = qs[0].shape
    Hkv, S = ks[0].shape[1], ks[0].shape[2]
    g = H // Hkv
    past = S - T
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    out = v.new_empty(B, H, T, v.shape[-1])
    for a in range(0, T, block):
        b = min(a + block, T)
        C, kend = b - a, past + b
        allowed = block_allowed(mask, q_pos, k_pos, past, a, b)  # [B|1, C, kend]
        qp, kp = q_pos[:, a:b, None], k_pos[:, None, :kend]
        rel = qp - kp
        scores = torch.zeros(B, Hkv, g, C, kend, dtype=qs[0].dtype, device=v.device)
        covered = torch.zeros(max(B, allowed.shape[0]), C, kend, dtype=torch.bool, device=v.device)
        for q, k, coverage in zip(qs, ks, parts, strict=True):
            inside = coverage.covers(rel, qp, kp) & allowed & ~covered  # [B, C, kend]
            lo = first_band_slot(inside, kend)
            if lo == kend:
                continue
            part = (q[:, :, a:b].reshape(B, Hkv, g * C, D) @ k[:, :, lo:kend].transpose(-1, -2))
            part = part.view(B, Hkv, g, C, kend - lo)
            scores[..., lo:] = torch.where(inside[:, None, None, :, lo:], part, scores[..., lo:])
            covered |= inside
        ctx = merged_softmax_values(scores, covered, v[:, :, :kend], scale, softcap)
        out[:, :, a:b] = ctx.view(B, H, C, -1)
    return out
