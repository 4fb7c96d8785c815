"""The merge engine (ropekit.attention.engine, .fused) against the reference path and the definitions.

- every parts variant x {prefill, chunked prefill on a cache, one-token decode, left-padded batch,
  grouped-query heads, interleaved pairs, a position offset} x every fused backend (the CPU flash op,
  the emulation of CUDA varlen_attn's contract, the torch fallback) equals the reference path;
- the tiles of every part cover exactly the pairs the part's coverage names, each pair once, and no
  banded tile is larger than block x (block + window): the fused path never holds a [T, S] block;
- the attention_lse backends equal a float64 softmax with its log-sum-exp for every window shape;
- the CUDA backend equals the CPU one where CUDA exists (skipped visibly elsewhere).
"""

from __future__ import annotations

import math

import pytest
import torch

from ropekit.attention import DualChunk, GradedSelfExtend, ReRope, SelfExtend
from ropekit.attention.engine import Band, ChunkApart, RowGroup, consecutive_rows, part_tiles
from ropekit.attention.fused import (
    ATTENTION_LSE,
    attention_lse,
    emulated_varlen_attn,
    window_allowed,
)
from ropekit.rope import RopeConfig, RotaryEmbedding

D = 16
FUSED = ["cpu-flash", "emulated-varlen", "torch"]
VARIANTS = {
    "self-extend": lambda: SelfExtend(group=3, window=6, chunk_size=5),
    "self-extend-wide": lambda: SelfExtend(group=2, window=70, chunk_size=16),
    "rerope": lambda: ReRope(window=5, chunk_size=7),
    "leaky-rerope": lambda: ReRope(window=4, leak=3.0, chunk_size=4),
    "leaky-rerope-logn": lambda: ReRope(window=4, leak=3.0, logn=True, chunk_size=64),
    "dca": lambda: DualChunk(chunk=10, local=3, block=6),
    "dca-short-chunks": lambda: DualChunk(chunk=5, local=4, block=3),
    "graded-self-extend": lambda: GradedSelfExtend(windows=(4, 9, 21), groups=(2, 3, 5), chunk_size=6),
}
# (new queries T, cached keys before them, left padding per row, query heads, KV heads)
CASES = {
    "prefill": (37, 0, (0, 0), 4, 2),
    "long-prefill": (190, 0, (0, 3), 4, 2),
    "prefill-mha": (29, 0, (0, 0), 3, 3),
    "chunked-prefill": (11, 26, (0, 0), 4, 2),
    "decode": (1, 40, (0, 0), 4, 2),
    "left-padded-prefill": (33, 0, (5, 0), 4, 2),
    "left-padded-decode": (1, 30, (9, 2), 4, 1),
    "padded-chunk": (7, 20, (24, 3), 4, 2),
    "all-padding-row": (6, 4, (10, 0), 2, 2),
}


def rope_of(trained: int = 16) -> RotaryEmbedding:
    return RotaryEmbedding(RopeConfig(head_dim=D, rope_theta=10000.0, max_position_embeddings=trained))


def inputs(T: int, past: int, pads: tuple[int, ...], H: int, Hkv: int, seed: int = 0, dtype=torch.float32,
           start: int = 0):
    """q ``[B, H, T, D]``, k/v ``[B, Hkv, past + T, D]``, positions with -1 at each row's left padding."""
    g = torch.Generator().manual_seed(seed)
    S, B = past + T, len(pads)
    q = torch.randn(B, H, T, D, generator=g, dtype=dtype)
    k = torch.randn(B, Hkv, S, D, generator=g, dtype=dtype)
    v = torch.randn(B, Hkv, S, D, generator=g, dtype=dtype)
    slots = torch.arange(S)
    k_pos = torch.stack([torch.where(slots >= p, start + slots - p, -1) for p in pads])
    return q, k, v, k_pos[:, past:], k_pos


@pytest.mark.parametrize("layout", ["half", "interleaved"])
@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("name", list(VARIANTS))
def test_fused_equals_the_reference_path(name, case, backend, layout):
    variant, rope = VARIANTS[name](), rope_of()
    q, k, v, q_pos, k_pos = inputs(*CASES[case], seed=len(name) + len(case))
    tables = variant.tables(rope, q_pos, k_pos)
    assert tables.groups is not None  # consecutive slots: the fused path applies
    expected = variant.attend(q, k, v, tables, layout=layout, backend="reference")
    got = variant.attend(q, k, v, tables, layout=layout, backend=backend)
    real = (q_pos >= 0)[:, None, :, None]  # padding queries: zeros on both paths
    torch.testing.assert_close(got * real, expected * real, atol=2e-6, rtol=0)  # float32, summation orders
    assert torch.equal(got[~real.expand_as(got)], torch.zeros_like(got[~real.expand_as(got)]))


@pytest.mark.parametrize("name", ["self-extend", "dca"])
def test_position_offset_and_bfloat16(name):
    """Positions starting at 13 (a cache that does not start at 0); bf16 within its rounding of the
    float32 reference (inputs of size ~1: 2^-8 per rounding, a few roundings)."""
    variant, rope = VARIANTS[name](), rope_of()
    q, k, v, q_pos, k_pos = inputs(19, 8, (0, 2), 4, 2, seed=3, start=13)
    tables = variant.tables(rope, q_pos, k_pos)
    expected = variant.attend(q, k, v, tables, backend="reference")
    torch.testing.assert_close(variant.attend(q, k, v, tables), expected, atol=2e-6, rtol=0)
    got = variant.attend(q.bfloat16(), k.bfloat16(), v.bfloat16(), tables)
    assert got.dtype == torch.bfloat16
    real = (q_pos >= 0)[:, None, :, None]
    torch.testing.assert_close(got.float() * real, expected * real, atol=3e-2, rtol=0)


def test_automatic_choice_fuses_only_where_it_applies(monkeypatch):
    """No mask, no softcap, consecutive slots: fused; a mask, a softcap or repeated positions: reference."""
    from ropekit.attention import remap

    calls = []
    fused = remap.fused_parts_attention
    monkeypatch.setattr(remap, "fused_parts_attention", lambda *a, **kw: calls.append(1) or fused(*a, **kw))
    variant, rope = VARIANTS["self-extend"](), rope_of()
    q, k, v, q_pos, k_pos = inputs(20, 0, (0, 0), 4, 2)
    tables = variant.tables(rope, q_pos, k_pos)
    variant.attend(q, k, v, tables)
    assert calls == [1]
    causal = torch.ones(20, 20, dtype=torch.bool).tril().expand(2, 1, 20, 20)
    variant.attend(q, k, v, tables, causal)
    variant.attend(q, k, v, tables, softcap=5.0)
    repeated = torch.arange(20).div(2, rounding_mode="floor").expand(2, 20)
    assert variant.tables(rope, repeated, repeated).groups is None
    assert calls == [1]
    with pytest.raises(ValueError, match="fused engine needs no mask"):
        variant.attend(q, k, v, tables, causal, backend="cpu-flash")
    with pytest.raises(ValueError, match="is not one of"):
        variant.attend(q, k, v, tables, backend="flash3")


def covered_by_tiles(tiles, num_parts: int, num_q: int, num_k: int) -> torch.Tensor:
    """``[P, Tq, Tk]`` int: how many times the tiles cover each (part, query, key)."""
    count = torch.zeros(num_parts, num_q, num_k, dtype=torch.int64)
    for tile in tiles:
        allowed = window_allowed(tile.qb - tile.qa, tile.kb - tile.ka, tile.window)
        assert allowed.any(dim=1).all(), f"{tile}: a query row sees no key"
        count[tile.part, tile.qa:tile.qb, tile.ka:tile.kb] += allowed.long()
    return count


@pytest.mark.parametrize("parts", [
    [Band(None, 5), Band(6, None)], [Band(None, 0), Band(1, None)], [Band(None, 99), Band(100, None)],
    [Band(None, 69), Band(70, None)], [Band(None, 63), Band(64, None)],
    [ChunkApart(7, None, 0), ChunkApart(7, 1, 1), ChunkApart(7, 2, None)],
    [ChunkApart(3, None, 0), ChunkApart(3, 1, 1), ChunkApart(3, 2, None)]])
@pytest.mark.parametrize("q_start,num_q,k_start,num_k", [(0, 40, 0, 40), (30, 10, 0, 40), (39, 1, 0, 40),
                                                         (12, 9, 5, 16), (0, 1, 0, 1), (0, 300, 0, 300),
                                                         (210, 90, 3, 297)])
@pytest.mark.parametrize("block", [4, 32, 512])
def test_tiles_cover_each_pair_of_each_part_exactly_once(parts, q_start, num_q, k_start, num_k, block):
    """Against the definition: pair (i, j), i = q_start + t, j = k_start + s, is in part p iff j <= i and p's
    coverage holds, and no part's tiles count a pair twice."""
    group = RowGroup(None, 0, q_start, 0, k_start)
    count = covered_by_tiles(part_tiles(parts, group, num_q, num_k, block), len(parts), num_q, num_k)
    i = (q_start + torch.arange(num_q))[None, :, None]
    j = (k_start + torch.arange(num_k))[None, None, :]
    for p, coverage in enumerate(parts):
        expected = coverage.covers(i - j, i, j)[0] & (j <= i)[0]
        assert torch.equal(count[p], expected.long()), f"part {p}: {coverage}"
    assert int(count.sum(dim=0).max()) <= 1


def test_banded_tiles_stay_block_by_block_plus_window():
    """Memory: the only masked tiles are the near window's, block x (block + window) at most; every other
    tile is full or a causal square (no mask at all)."""
    tiles = part_tiles([Band(None, 1023), Band(1024, None)], RowGroup(None, 0, 0, 0, 0), 32768, 32768, 512)
    assert sum(tile.window not in ((-1, -1), (-1, 0), (0, -1)) for tile in tiles) <= 3  # masked: the first blocks
    for tile in tiles:
        if tile.window not in ((-1, -1), (-1, 0)):
            assert (tile.qb - tile.qa) <= 512 and (tile.kb - tile.ka) <= 512 + 1024
        if tile.window in ((-1, 0), (0, -1)):
            assert tile.qb - tile.qa == tile.kb - tile.ka


def test_consecutive_rows_reads_padding_and_refuses_other_layouts():
    slots = torch.arange(8)
    k_pos = torch.stack([torch.where(slots >= 3, slots - 3, -1), slots])
    groups = consecutive_rows(k_pos[:, 5:], k_pos)
    assert groups == [RowGroup((0,), 0, 2, 3, 0), RowGroup((1,), 0, 5, 0, 0)]
    assert consecutive_rows(k_pos, k_pos)[0] == RowGroup((0,), 3, 0, 3, 0)
    gap = slots.clone()
    gap[4] = 9
    assert consecutive_rows(gap[None, 6:], gap[None]) is None  # a jump in the keys' positions
    assert consecutive_rows(slots[None, 6:] + 1, slots[None]) is None  # queries not at their slots' positions
    middle = slots.clone()
    middle[3] = -1
    assert consecutive_rows(middle[None, 6:], middle[None]) is None  # padding inside a row


def float64_lse(q, k, v, allowed, scale):
    g = q.shape[1] // k.shape[1]
    k, v = k.double().repeat_interleave(g, 1), v.double().repeat_interleave(g, 1)
    scores = (q.double() @ k.transpose(-1, -2) * scale).masked_fill(~allowed, float("-inf"))
    lse = torch.logsumexp(scores, -1)
    return torch.softmax(scores, -1) @ v, lse


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("Tq,Tk,window", [(9, 40, (-1, -1)), (9, 9, (-1, 0)), (5, 12, (4, 0)), (5, 12, (4, 3)),
                                          (1, 30, (-1, -1)), (6, 6, (2, 0)), (7, 3, (-1, 5))])
def test_attention_lse_backends_equal_a_float64_softmax(backend, Tq, Tk, window):
    g = torch.Generator().manual_seed(Tq * Tk)
    q, k, v = (torch.randn(2, 6, Tq, D, generator=g), torch.randn(2, 2, Tk, D, generator=g),
               torch.randn(2, 2, Tk, D, generator=g))
    allowed = window_allowed(Tq, Tk, window)
    assert allowed.any(dim=1).all()  # the op's contract: every query row sees a key
    out, lse = attention_lse(q, k, v, window=window, scale=0.3, backend=backend)
    ref_out, ref_lse = float64_lse(q, k, v, allowed, 0.3)
    torch.testing.assert_close(out.double(), ref_out, atol=2e-6, rtol=0)
    torch.testing.assert_close(lse.double(), ref_lse, atol=2e-6, rtol=0)


def test_the_varlen_emulation_keeps_sequences_apart_and_checks_heads():
    """Two packed sequences of different lengths equal each run alone; 4 query heads on 2 KV heads need
    enable_gqa (as varlen_attn documents)."""
    from torch.nn.attention.varlen import AuxRequest

    g = torch.Generator().manual_seed(1)
    q, k, v = torch.randn(7, 4, D, generator=g), torch.randn(11, 2, D, generator=g), torch.randn(11, 2, D, generator=g)
    cu_q, cu_k = torch.tensor([0, 3, 7], dtype=torch.int32), torch.tensor([0, 5, 11], dtype=torch.int32)
    out, lse = emulated_varlen_attn(q, k, v, cu_q, cu_k, 4, 6, return_aux=AuxRequest(lse=True), window_size=(-1, 0),
                                    enable_gqa=True)
    assert out.shape == (7, 4, D) and lse.shape == (7, 4)
    for (qa, qb), (ka, kb) in (((0, 3), (0, 5)), ((3, 7), (5, 11))):
        alone, alone_lse = float64_lse(q[qa:qb].transpose(0, 1)[None], k[ka:kb].transpose(0, 1)[None],
                                       v[ka:kb].transpose(0, 1)[None], window_allowed(qb - qa, kb - ka, (-1, 0)),
                                       1 / math.sqrt(D))
        torch.testing.assert_close(out[qa:qb].double(), alone[0].transpose(0, 1), atol=2e-6, rtol=0)
        torch.testing.assert_close(lse[qa:qb].double(), alone_lse[0].transpose(0, 1), atol=2e-6, rtol=0)
    with pytest.raises(ValueError, match="enable_gqa"):
        emulated_varlen_attn(q, k, v, cu_q, cu_k, 4, 6)


def test_backends_are_chosen_at_the_one_dispatch_point():
    x = torch.zeros(1, 1, 1, D)
    assert ATTENTION_LSE.select(x, x, x) == "cpu-flash"
    assert ATTENTION_LSE.select(x.double(), x.double(), x.double()) == "torch"  # the CPU op: float32/bf16
    assert "emulated-varlen" not in ATTENTION_LSE.available(x, x, x)[:1]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="GPU test: needs CUDA")
@pytest.mark.parametrize("name", list(VARIANTS))
@pytest.mark.parametrize("case", ["prefill", "chunked-prefill", "decode", "left-padded-prefill"])
def test_cuda_fused_equals_the_reference_path(name, case):
    variant, rope = VARIANTS[name](), rope_of()
    q, k, v, q_pos, k_pos = (x.cuda() for x in inputs(*CASES[case], dtype=torch.bfloat16))
    tables = variant.tables(rope, q_pos, k_pos)
    expected = variant.attend(q.float(), k.float(), v.float(), tables, backend="reference")
    got = variant.attend(q, k, v, tables)
    real = (q_pos >= 0)[:, None, :, None]
    torch.testing.assert_close(got.float() * real, expected * real, atol=3e-2, rtol=0)  # bf16 rounding


@pytest.mark.parametrize("spec", ["self-extend:group=2,window=4", "dca:chunk=10,local=3", "leaky-rerope:window=4,k=2"])
def test_the_cache_keeps_each_rotated_key_once_and_forks_copy_them(spec):
    """Decoding with a cache rotates each key once per key rotation (kept beside the keys): logits equal the
    full recomputation step by step, from the cache and from a fork of it, and every layer's store ends
    filled to the cache's length."""
    from tiny_llama import tiny_model

    from ropekit.model import patch

    model = patch(tiny_model(max_position_embeddings=16), spec)
    ids = torch.randint(0, 200, (1, 30), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        full = model(ids)
        cache = model.new_cache(1, 40)
        model(ids[:, :20], cache=cache)
        fork = cache.fork()
        for source in (cache, fork):
            for t in range(20, 30):
                step = model(ids[:, t:t + 1], cache=source)
                torch.testing.assert_close(step[:, -1], full[:, t], atol=1e-4, rtol=0)  # float32, other sum orders
    for source in (cache, fork):
        (buffers, filled), = source._derived.values()
        assert filled == [30] * model.config.num_hidden_layers
    cache.reset()
    assert not cache._derived
