"""Plain attention of several new queries on a cache (``sdpa`` with ``1 < T < S``, no mask).

It runs as two fused rectangles merged by log-sum-exp (``cached_causal_attention``): every backend of
the ``attention_lse`` op, and the masked-SDPA path it replaces (forced with the ``torch`` backend),
equal a float64 pair-by-pair causal-by-slot softmax; the fused path builds no ``[T, S]`` mask.
"""

from __future__ import annotations

import pytest
import torch

import ropekit.attention.base as base
from ropekit.attention import sdpa
from ropekit.dispatch import use_backend

D = 16
# (new queries T, keys S, query heads, KV heads)
SHAPES = [(2, 5, 4, 2), (17, 40, 6, 2), (40, 41, 3, 3), (33, 33, 4, 1), (600, 700, 4, 2), (9, 1000, 6, 3)]


def pair_by_pair(q, k, v, scale):
    """float64 causal-by-slot attention, one query at a time: query t (slot S - T + t) sees keys 0..S-T+t."""
    B, H, T, _ = q.shape
    S, g = k.shape[2], q.shape[1] // k.shape[1]
    out = torch.zeros(B, H, T, v.shape[-1], dtype=torch.float64)
    for h in range(H):
        kh, vh = k[:, h // g].double(), v[:, h // g].double()
        for t in range(T):
            last = S - T + t
            scores = torch.einsum("bd,bsd->bs", q[:, h, t].double(), kh[:, :last + 1]) * scale
            out[:, h, t] = torch.einsum("bs,bsd->bd", torch.softmax(scores, -1), vh[:, :last + 1])
    return out


def inputs(T, S, H, Hkv, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed + 7 * T + S)
    return (torch.randn(2, H, T, D, generator=g).to(dtype), torch.randn(2, Hkv, S, D, generator=g).to(dtype),
            torch.randn(2, Hkv, S, D, generator=g).to(dtype))


@pytest.mark.parametrize("backend", ["cpu-flash", "emulated-varlen", "torch"])
@pytest.mark.parametrize("T,S,H,Hkv", SHAPES)
def test_new_queries_on_a_cache_equal_pair_by_pair_attention(T, S, H, Hkv, backend):
    q, k, v = inputs(T, S, H, Hkv)
    with use_backend(backend, "attention_lse"):
        out = sdpa(q, k, v, scale=0.3)
    assert out.dtype == torch.float32 and out.shape == (2, H, T, D)
    torch.testing.assert_close(out.double(), pair_by_pair(q, k, v, 0.3), atol=2e-6, rtol=0)


def test_bfloat16_rounds_once_per_rectangle():
    """bfloat16 inputs: the merged result within bfloat16's rounding of the float64 answer."""
    q, k, v = inputs(50, 90, 4, 2, torch.bfloat16)
    out = sdpa(q, k, v)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.double(), pair_by_pair(q, k, v, D ** -0.5), atol=2e-2, rtol=0)


def test_the_fused_path_builds_no_mask_and_the_forced_fallback_does(monkeypatch):
    built = []
    original = base.causal_by_slot
    monkeypatch.setattr(base, "causal_by_slot", lambda *a, **kw: built.append(a) or original(*a, **kw))
    q, k, v = inputs(30, 100, 4, 2)
    fused = sdpa(q, k, v)
    assert built == []
    with use_backend("torch", "attention_lse"):
        masked = sdpa(q, k, v)
    assert [call[:2] for call in built] == [(30, 100)]
    torch.testing.assert_close(fused, masked, atol=2e-6, rtol=0)


def test_prefill_decode_and_explicit_masks_keep_their_paths(monkeypatch):
    """T == S (causal prefill), T == 1 (decode) and an explicit mask never reach the split."""
    monkeypatch.setattr(base, "cached_causal_attention", lambda *a, **kw: pytest.fail("split path taken"))
    q, k, v = inputs(12, 12, 4, 2)
    torch.testing.assert_close(sdpa(q, k, v).double(), pair_by_pair(q, k, v, D ** -0.5), atol=2e-6, rtol=0)
    q1, k1, v1 = inputs(1, 12, 4, 2)
    torch.testing.assert_close(sdpa(q1, k1, v1).double(), pair_by_pair(q1, k1, v1, D ** -0.5), atol=2e-6, rtol=0)
    q5, k5, v5 = inputs(5, 12, 4, 2)
    mask = base.causal_by_slot(5, 12)[None, None].expand(2, 1, 5, 12)
    torch.testing.assert_close(sdpa(q5, k5, v5, mask).double(), pair_by_pair(q5, k5, v5, D ** -0.5),
                               atol=2e-6, rtol=0)
