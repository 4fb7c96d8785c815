"""Graded Self-Extend (ropekit.attention.self_extend.GradedSelfExtend) against a pair-by-pair reference
written from its definition, against Self-Extend where it has one band, and in the engine and transformers.

The reference loops over every (query i, key j) pair in float64: distance ``d = i - j``; below the first
window both are rotated at their own positions; in band k (``windows[k] <= d``, the last band that
starts at or before d) the key at ``floor(j / G_k)`` and the query at ``floor(i / G_k) + c_k``, with
``c_0 = W_0 - floor(W_0 / G_0)`` and ``c_k = c_{k-1} + floor(W_k / G_{k-1}) - floor(W_k / G_k)``; one
softmax over all allowed keys. Tolerances are written at each call: the product's cos/sin tables are
float32 (differences ~1e-7 against float64 angles).
"""

from __future__ import annotations

import math

import pytest
import torch
from tiny_llama import tiny_model, to_transformers

from ropekit.attention import GradedSelfExtend, SelfExtend
from ropekit.attention.self_extend import graded_distance
from ropekit.convert.translate import TARGETS, translate
from ropekit.method import parse_method
from ropekit.rope import RopeConfig, RotaryEmbedding
from ropekit.rope.formats import Inexpressible

B, H, HKV, D = 2, 4, 2, 16
SETTINGS = [((4,), (3,)), ((3, 8), (2, 4)), ((2, 5, 11), (2, 3, 7)), ((5, 6), (4, 4))]


def rope_of(trained: int = 32) -> RotaryEmbedding:
    return RotaryEmbedding(RopeConfig(head_dim=D, rope_theta=10000.0, max_position_embeddings=trained))


def qkv(T: int, S: int | None = None, seed: int = 0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    S = T if S is None else S
    return (torch.randn(B, H, T, D, generator=g, dtype=dtype), torch.randn(B, HKV, S, D, generator=g, dtype=dtype),
            torch.randn(B, HKV, S, D, generator=g, dtype=dtype))


def rotate_at(x: torch.Tensor, position: int, inv_freq: torch.Tensor) -> torch.Tensor:
    """x ``[D]`` turned by angle position * inv_freq in float64 (half-split pairs)."""
    angle = float(position) * inv_freq.double()
    c, s = torch.cos(angle), torch.sin(angle)
    a, b = x[: D // 2], x[D // 2:]
    return torch.cat([a * c - b * s, b * c + a * s])


def pair_positions(i: int, j: int, windows, groups) -> tuple[int, int]:
    """(query position, key position) of the pair (i, j) by the definition."""
    shift = windows[0] - windows[0] // groups[0]
    chosen = None
    for k, (start, G) in enumerate(zip(windows, groups, strict=True)):
        if k:
            shift += start // groups[k - 1] - start // G
        if i - j >= start:
            chosen = (i // G + shift, j // G)
    return chosen or (i, j)


def reference(q, k, v, q_pos, k_pos, allowed, windows, groups, rope) -> torch.Tensor:
    """Graded Self-Extend pair by pair in float64. q ``[B, H, T, D]``, k/v ``[B, Hkv, S, D]``, q_pos
    ``[B, T]``, k_pos ``[B, S]``, allowed ``[B, T, S]`` bool."""
    inv_freq, _ = rope.frequencies()
    q, k, v = q.double(), k.double(), v.double()
    g = q.shape[1] // k.shape[1]
    out = torch.zeros(q.shape, dtype=torch.float64)
    for b in range(q.shape[0]):
        for h in range(q.shape[1]):
            for t in range(q.shape[2]):
                scores = torch.full((k.shape[2],), float("-inf"), dtype=torch.float64)
                for s in range(k.shape[2]):
                    if allowed[b, t, s]:
                        qp, kp = pair_positions(int(q_pos[b, t]), int(k_pos[b, s]), windows, groups)
                        scores[s] = rotate_at(q[b, h, t], qp, inv_freq) @ rotate_at(k[b, h // g, s], kp, inv_freq)
                out[b, h, t] = torch.softmax(scores / math.sqrt(D), 0) @ v[b, h // g]
    return out


def causal(T: int, start: int = 0):
    pos = (start + torch.arange(T)).expand(B, T)
    return pos, pos, (torch.arange(T)[None, :] <= torch.arange(T)[:, None]).expand(B, T, T)


def run(variant, q, k, v, q_pos, k_pos, rope, mask=None, **kwargs):
    return variant.attend(q, k, v, variant.tables(rope, q_pos, k_pos), mask, **kwargs)


# ---- the maths against the reference -------------------------------------------------------------


@pytest.mark.parametrize(("windows", "groups"), SETTINGS)
@pytest.mark.parametrize("start", [0, 7])
def test_reference_path_equals_the_pair_by_pair_definition(windows, groups, start):
    """float64 takes the reference path: every band, near and far, with a position offset."""
    rope, (q, k, v) = rope_of(), qkv(31)
    q_pos, k_pos, allowed = causal(31, start)
    out = run(GradedSelfExtend(windows, groups, chunk_size=6), q, k, v, q_pos, k_pos, rope)
    expected = reference(q, k, v, q_pos, k_pos, allowed, windows, groups, rope)
    torch.testing.assert_close(out, expected, atol=1e-6, rtol=0)  # float32 angle tables vs float64


@pytest.mark.parametrize(("windows", "groups"), SETTINGS)
def test_fused_cpu_prefill_equals_the_pair_by_pair_definition(windows, groups):
    """float32 plain prefill: one flash tile set per band, merged by log-sum-exp."""
    rope, (q, k, v) = rope_of(), qkv(40, dtype=torch.float32, seed=1)
    q_pos, k_pos, allowed = causal(40, 3)
    out = run(GradedSelfExtend(windows, groups, chunk_size=8), q, k, v, q_pos, k_pos, rope)
    expected = reference(q, k, v, q_pos, k_pos, allowed, windows, groups, rope)
    torch.testing.assert_close(out.double(), expected, atol=2e-6, rtol=0)  # float32 attention, ~1e-7 each step


def test_masked_cached_call_equals_the_definition():
    """5 new queries over 29 keys, row 0 left-padded (positions -1, masked): the reference path with a mask."""
    T, S = 5, 29
    rope, (q, k, v) = rope_of(), qkv(T, S, seed=3)
    k_pos = torch.stack([torch.arange(S) - 6, torch.arange(S)])
    k_pos[0, :6] = -1
    q_pos = k_pos[:, -T:]
    allowed = (k_pos[:, None, :] >= 0) & (torch.arange(S)[None, None, :] <= (S - T + torch.arange(T))[None, :, None])
    windows, groups = (3, 9), (2, 5)
    out = run(GradedSelfExtend(windows, groups, chunk_size=2), q, k, v, q_pos, k_pos, rope, allowed[:, None])
    expected = reference(q, k, v, q_pos, k_pos, allowed, windows, groups, rope)
    torch.testing.assert_close(out[0], expected[0], atol=1e-6, rtol=0)
    torch.testing.assert_close(out[1], expected[1], atol=1e-6, rtol=0)


@pytest.mark.parametrize(("group", "window"), [(3, 4), (2, 9), (5, 1)])
def test_one_band_is_self_extend(group, window):
    """One band (W, G) is Self-Extend with group G and window W, on both paths."""
    rope = rope_of()
    for dtype in (torch.float64, torch.float32):
        q, k, v = qkv(35, dtype=dtype, seed=2)
        q_pos, k_pos, _ = causal(35)
        graded = run(GradedSelfExtend((window,), (group,), chunk_size=5), q, k, v, q_pos, k_pos, rope)
        plain = run(SelfExtend(group, window, chunk_size=5), q, k, v, q_pos, k_pos, rope)
        torch.testing.assert_close(graded, plain, atol=1e-12, rtol=0)  # the same tables and tiles


def test_graded_distance_is_the_definition_and_grows_with_distance():
    """graded_distance == the pair positions' difference; inside a band it never falls and grows by at
    most 1 a step; at a band's start it moves by -1..2 (floors); the far band grows as d / G_last."""
    windows, groups = (4, 12, 40), (2, 4, 8)
    for i in range(0, 120, 7):
        previous = None
        for d in range(i + 1):
            qp, kp = pair_positions(i, i - d, windows, groups)
            assert graded_distance(d, i, windows, groups) == qp - kp
            if previous is not None:
                step = qp - kp - previous
                assert (-1 <= step <= 2) if d in windows else (0 <= step <= 1), (i, d, step)
            previous = qp - kp
    assert graded_distance(119, 119, windows, groups) == 119 // 8 + 10  # c = 4 - 2, 2 + 6 - 3, 5 + 10 - 5


# ---- the method string ---------------------------------------------------------------------------


def test_parse_method_and_defaults():
    parsed = parse_method("graded-self-extend:windows=[4096,12288],groups=[4,16]")
    variant = parsed.variant()
    assert isinstance(variant, GradedSelfExtend) and variant.windows == (4096, 12288) and variant.groups == (4, 16)
    assert parse_method("graded-self-extend").variant().windows == (1024, 4096)
    assert parse_method("yarn:factor=2+graded_self_extend:windows=[8],groups=[2]").rope is not None


@pytest.mark.parametrize(("method", "message"), [
    ("graded-self-extend:windows=[4,8],groups=[2]", "'windows' and 'groups' must have the same length"),
    ("graded-self-extend:windows=[8,4],groups=[2,3]", "'windows' must be strictly increasing"),
    ("graded-self-extend:windows=[4,4],groups=[2,3]", "'windows' must be strictly increasing"),
    ("graded-self-extend:windows=4,groups=[2]", "'windows' must be a list of 1 to 8"),
    ("graded-self-extend:windows=[],groups=[]", "'windows' must be a list of 1 to 8"),
    ("graded-self-extend:windows=[4],groups=[0]", r"'groups\[0\]'=0 is out of range"),
    ("graded-self-extend:windows=[4.5],groups=[2]", r"'windows\[0\]' must be an integer"),
    ("graded-self-extend:window=4", r"unknown \['window'\]"),
])
def test_bad_keys_raise_value_errors_naming_the_key(method, message):
    with pytest.raises(ValueError, match=message):
        parse_method(method)


def test_every_convert_target_refuses_it():
    base = RopeConfig(head_dim=64, rope_theta=1e5, max_position_embeddings=8192)
    for target in TARGETS:
        with pytest.raises(Inexpressible, match="exists only in ropekit"):
            translate("graded-self-extend:windows=[1024,4096],groups=[4,16]", base, target)


# ---- in the engine and in transformers -------------------------------------------------------------


def test_engine_and_transformers_give_the_same_logits():
    """A tiny llama over 48 tokens: engine == transformers to 1e-5 (float32, two layers), without a mask
    (fused) and with one (reference path)."""
    from ropekit import hf
    from ropekit import model as engine

    method = "graded-self-extend:windows=[4,12],groups=[2,4],chunk=5"
    model = tiny_model(max_position_embeddings=16)
    ours, theirs = engine.patch(model, method), hf.patch(to_transformers(model), method)
    x = torch.randint(0, 200, (1, 48), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(ours(x), theirs(x).logits, atol=1e-5, rtol=0)
        torch.testing.assert_close(ours(x), theirs(x, attention_mask=torch.ones_like(x)).logits, atol=1e-5, rtol=0)


def test_engine_cached_decode_and_chunked_prefill_equal_full_recompute():
    from ropekit.model import patch

    model = patch(tiny_model(max_position_embeddings=16), "graded-self-extend:windows=[3,10],groups=[2,5],chunk=4")
    ids = torch.randint(0, 200, (1, 48), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        full = model(ids)
        cache = model.new_cache(1, 48)
        parts = [model(ids[:, :20], cache=cache), model(ids[:, 20:33], cache=cache)]
        parts += [model(ids[:, t:t + 1], cache=cache) for t in range(33, 48)]
    torch.testing.assert_close(torch.cat(parts, dim=1), full, rtol=0, atol=1e-5)  # float32, two layers
