"""Attention variants (ropekit.attention) against slow references, in isolation and in the engine.

- Self-Extend equals the explicit two-matrix masked merge (neighbour scores where i - j < W,
  grouped scores elsewhere, one softmax) and the per-pair rotation by the remapped distance;
- ReRoPE / Leaky ReRoPE equal attention whose score for each (i, j) is computed the slow way:
  q_i rotated by the clipped (leaky) relative distance, dotted with the unrotated k_j;
- cache-consistent dynamic scaling equals recomputing from scratch at every step (exact for a
  one-layer model: deeper layers' keys come from hidden states computed at their own time), and
  transformers-compatible dynamic mode does not (transformers issue #25104);
- every method: prefill + cached decode (and chunked prefill) equals the full recomputation.
"""

from __future__ import annotations

import math

import pytest
import torch
from tiny_llama import tiny_model

from ropekit.attention import ConsistentDynamic, ReRope, SelfExtend
from ropekit.method import parse_method
from ropekit.model import KVCache, RopeAttention, VariantHook, patch
from ropekit.rope import RopeConfig, RotaryEmbedding

B, H, HKV, D = 2, 4, 2, 16


def qkv(T: int, seed: int = 0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, T, D, generator=g, dtype=dtype)
    k = torch.randn(B, HKV, T, D, generator=g, dtype=dtype)
    v = torch.randn(B, HKV, T, D, generator=g, dtype=dtype)
    return q, k, v


def rope_of(spec: str = "default", trained: int = 16) -> RotaryEmbedding:
    base = RopeConfig(head_dim=D, rope_theta=10000.0, max_position_embeddings=trained)
    return RotaryEmbedding(base.with_rope_type(spec))


def run_variant(variant, q, k, v, rope):
    """The variant's output for q, k, v at positions 0..T-1 (prefill, no cache), through its contract."""
    T = q.shape[2]
    positions = torch.arange(T).expand(B, T)
    return variant.attend(q, k, v, variant.tables(rope, positions, positions))


def rotate_by(x: torch.Tensor, distance: float, inv_freq: torch.Tensor, factor: float) -> torch.Tensor:
    """x ``[..., D]`` (half layout) turned by angle distance * inv_freq, in float64."""
    angle = float(distance) * inv_freq.double()
    c, s = torch.cos(angle) * factor, torch.sin(angle) * factor
    a, b = x[..., : D // 2], x[..., D // 2:]
    return torch.cat([a * c - b * s, b * c + a * s], dim=-1)


def pairwise_reference(q, k, v, rope, distance) -> torch.Tensor:
    """Causal attention whose (i, j) score is rot(q_i, distance(i, j)) . rot(k_j, 0), pair by pair.

    (The product's cos/sin tables are float32, hence differences of ~1e-7.)
    """
    T = q.shape[2]
    inv_freq, factor = rope.frequencies(T)
    g = H // HKV
    out = torch.zeros_like(q)
    for b in range(B):
        for h in range(H):
            for i in range(T):
                scores = torch.full((T,), float("-inf"), dtype=torch.float64)
                for j in range(i + 1):
                    qi = rotate_by(q[b, h, i], distance(i, j), inv_freq, factor)
                    kj = rotate_by(k[b, h // g, j], 0.0, inv_freq, factor)
                    scores[j] = qi @ kj / math.sqrt(D)
                out[b, h, i] = torch.softmax(scores, dim=0) @ v[b, h // g]
    return out


def two_matrix_self_extend(q, k, v, rope, group: int, window: int) -> torch.Tensor:
    """LongLM's formulation: full neighbour and grouped score matrices, merged by a mask, one softmax."""
    T = q.shape[2]
    pos = torch.arange(T)
    inv_freq, factor = rope.frequencies(T)

    def rot(x, p):
        ang = p.double()[:, None] * inv_freq.double()
        c, s = torch.cos(ang) * factor, torch.sin(ang) * factor
        a, b = x[..., : D // 2], x[..., D // 2:]
        return torch.cat([a * c - b * s, b * c + a * s], dim=-1)

    kk, vv = k.repeat_interleave(H // HKV, 1), v.repeat_interleave(H // HKV, 1)
    neighbour = rot(q, pos) @ rot(kk, pos).transpose(-1, -2)
    grouped = rot(q, pos // group + window - window // group) @ rot(kk, pos // group).transpose(-1, -2)
    rel = pos[:, None] - pos[None, :]
    scores = torch.where(rel < window, neighbour, grouped) / math.sqrt(D)
    scores = scores.masked_fill(rel < 0, float("-inf"))
    return torch.softmax(scores, dim=-1) @ vv


@pytest.mark.parametrize("group,window,chunk", [(2, 4, 5), (3, 5, 64), (4, 2, 1), (5, 30, 7)])
@pytest.mark.parametrize("spec", ["default", "yarn:factor=2"])
def test_self_extend_equals_two_matrix_merge(group, window, chunk, spec):
    q, k, v = qkv(23)
    rope = rope_of(spec)
    got = run_variant(SelfExtend(group, window, chunk_size=chunk), q, k, v, rope)
    ref = two_matrix_self_extend(q, k, v, rope, group, window)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=2e-6)


def test_self_extend_equals_per_pair_remapped_distance():
    q, k, v = qkv(13, seed=1)
    rope, G, W = rope_of(), 3, 4

    def distance(i, j):
        return i - j if i - j < W else (i // G + W - W // G) - j // G

    got = run_variant(SelfExtend(G, W, chunk_size=4), q, k, v, rope)
    torch.testing.assert_close(got, pairwise_reference(q, k, v, rope, distance), rtol=1e-5, atol=2e-6)


@pytest.mark.parametrize("window,leak", [(4, None), (1, None), (5, 3.0), (3, 16)])
def test_rerope_equals_clipped_distance_computed_pair_by_pair(window, leak):
    q, k, v = qkv(14, seed=2)
    rope = rope_of()

    def distance(i, j):
        r = i - j
        if r < window:
            return r
        return window if leak is None else window + (r - window) / leak

    got = run_variant(ReRope(window, leak=leak, chunk_size=5), q, k, v, rope)
    torch.testing.assert_close(got, pairwise_reference(q, k, v, rope, distance), rtol=1e-5, atol=2e-6)


@pytest.mark.parametrize("variant", [SelfExtend(4, 100), ReRope(100), ReRope(100, leak=4)])
def test_window_longer_than_text_is_plain_rope(variant):
    model = tiny_model()
    ids = torch.randint(0, 200, (2, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = model(ids)
        model.set_attention(VariantHook(variant))
        torch.testing.assert_close(model(ids), ref, rtol=1e-5, atol=1e-5)


CACHED_SPECS = ["self-extend:group=3,window=6,chunk=7", "rerope:window=5",
                "leaky-rerope:window=4,k=3,chunk=3",
                "yarn:factor=4+self-extend:group=4,window=8", "self-extend:group=2,window=4+linear:factor=2",
                "ntk:factor=2+rerope:window=6"]


@pytest.mark.parametrize("spec", CACHED_SPECS)
def test_prefill_and_decode_with_cache_equal_full_recompute(spec):
    """Non-dynamic rope: every token's logits are the same whether computed in one pass, in
    chunks, or one by one from the cache (keys cached unrotated, rotated on use)."""
    model = tiny_model(max_position_embeddings=16)
    patch(model, spec)
    ids = torch.randint(0, 200, (1, 48), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        full = model(ids)
        cache = model.new_cache(1, 48)
        parts = [model(ids[:, :20], cache=cache), model(ids[:, 20:33], cache=cache)]
        parts += [model(ids[:, t:t + 1], cache=cache) for t in range(33, 48)]
    torch.testing.assert_close(torch.cat(parts, dim=1), full, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("spec", ["self-extend:group=2,window=4", "leaky-rerope:window=3,k=2"])
def test_left_padded_batch_equals_each_row_alone(spec):
    model = tiny_model()
    patch(model, spec)
    gen = torch.Generator().manual_seed(2)
    short, long = torch.randint(0, 200, (1, 20), generator=gen), torch.randint(0, 200, (1, 29), generator=gen)
    batch = torch.cat([torch.cat([torch.zeros(1, 9, dtype=torch.long), short], 1), long])
    mask = torch.ones(2, 29, dtype=torch.long)
    mask[0, :9] = 0
    with torch.no_grad():
        both = model(batch, attention_mask=mask)
        torch.testing.assert_close(both[0, 9:], model(short)[0], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(both[1], model(long)[0], rtol=1e-5, atol=1e-5)


def decode_vs_scratch(model, ids, prompt: int):
    """(cached decode logits of each new token, from-scratch last-token logits at each step)."""
    cache = model.new_cache(1, ids.shape[1])
    with torch.no_grad():
        cached = [model(ids[:, :prompt], cache=cache)[:, -1]]
        cached += [model(ids[:, t:t + 1], cache=cache)[:, -1] for t in range(prompt, ids.shape[1])]
        scratch = [model(ids[:, :t + 1])[:, -1] for t in range(prompt - 1, ids.shape[1])]
    return torch.cat(cached), torch.cat(scratch)


@pytest.mark.parametrize("rope", ["dynamic:factor=2", "dynamic_yarn",
                                  "dynamic_yarn+self-extend:group=2,window=4"])
def test_consistent_dynamic_equals_recompute_from_scratch_each_step(rope):
    model = tiny_model(num_hidden_layers=1, max_position_embeddings=16)
    patch(model, rope if "+" in rope else f"{rope}+consistent")
    assert "+" in rope or isinstance(model.attention.variant, ConsistentDynamic)
    ids = torch.randint(0, 200, (1, 40), generator=torch.Generator().manual_seed(3))
    cached, scratch = decode_vs_scratch(model, ids, prompt=10)  # crosses 16: the base changes each step
    torch.testing.assert_close(cached, scratch, rtol=1e-5, atol=1e-5)


def test_transformers_dynamic_mode_keeps_stale_keys_issue_25104():
    """The transformers-compatible mode (plain dynamic rope type) differs from the recomputation
    once the cache crosses the trained length: cached keys keep their old rotation."""
    model = tiny_model(num_hidden_layers=1, max_position_embeddings=16)
    patch(model, "dynamic:factor=2")
    ids = torch.randint(0, 200, (1, 40), generator=torch.Generator().manual_seed(3))
    cached, scratch = decode_vs_scratch(model, ids, prompt=10)
    torch.testing.assert_close(cached[:7], scratch[:7], rtol=1e-5, atol=1e-5)  # within 16: identical
    assert (cached[-1] - scratch[-1]).abs().max() > 1e-3


def test_consistent_dynamic_uses_current_frequencies_for_every_key():
    """Raw q/k/v through the engine's cache: after a cached prefix, the step's output equals SDPA with
    all keys rotated at the frequencies of the current length (the variant run from scratch)."""
    rope = rope_of("dynamic:factor=2", trained=8)
    attention = VariantHook(ConsistentDynamic())
    q, k, v = qkv(30, seed=4, dtype=torch.float32)
    from ropekit.model.attention import AttentionContext, build_mask

    cache = KVCache(1, B, HKV, D, 30)
    for a, b in [(0, 12), (12, 29), (29, 30)]:
        pos = torch.arange(a, b)
        ctx = AttentionContext(positions=pos, key_positions=pos.expand(B, -1), rope=rope, attention=attention,
                               cache=cache, past=a, mask=build_mask(None, cache, a, b - a))
        attention.prepare(ctx)
        out = attention.attend(0, q[:, :, a:b], k[:, :, a:b], v[:, :, a:b], ctx)
    ref = run_variant(ConsistentDynamic(), q, k, v, rope)  # from scratch at length 30
    torch.testing.assert_close(out, ref[:, :, 29:], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("spec,rope,attention", [
    ("none", "default", "rope"),
    ("yarn:factor=2", "yarn", "rope"),
    ("self-extend:group=8,window=1024", None, "self-extend"),
    ("yarn:factor=2+self-extend:group=4,window=1024", "yarn", "self-extend"),
    ("self_extend:group=4 + ntk:factor=2", "ntk", "self-extend"),
    ("dynamic:factor=2+consistent", "dynamic", "consistent"),
    ("rerope:window=512", None, "rerope"),
    ("leaky-rerope:window=512,k=16", None, "leaky-rerope"),
])
def test_parse_method(spec, rope, attention):
    m = parse_method(spec)
    assert (m.rope or {}).get("rope_type") == rope
    assert m.attention_name == attention


@pytest.mark.parametrize(("spec", "message"), [
    ("", "a method must be"),
    ("bogus", "unknown name 'bogus'; rope types: default"),
    ("yarn:factor=2+linear:factor=2", "at most one rope type"),
    ("rerope+self-extend", "at most one attention variant"),
    ("yarn:factor=2+consistent", "consistent applies to dynamic / dynamic_yarn rope types only"),
    ("self-extend:grp=4", r"'self-extend' takes group, window, chunk; unknown \['grp'\]"),
    ("self-extend:group=0", r"self-extend key 'group'=0 is out of range \[1"),
    ("leaky-rerope:k=1", r"leaky-rerope key 'k'=1 is out of range \(1.0"),
    ("dynamic:factor=2,consistent=true", r"'dynamic' takes .*; unknown \['consistent'\]"),
    ("dynamic:factor=2+consistent+rerope", "at most one attention variant"),
    ("yarn:factor=-1", r"rope key 'factor'=-1 is out of range \[1.0"),
    ("yarn:facter=2", "'yarn' takes factor"),
    # these ran and returned uninitialised attention output (ReRoPE's was exactly 0.0)
    ("self-extend:group=4,window=64,chunk=-1", r"self-extend key 'chunk'=-1 is out of range \[1"),
    ("rerope:window=64,chunk=-3", r"rerope key 'chunk'=-3 is out of range \[1"),
    ("rerope:window=64,logn=maybe", "'logn' must be true or false"),
    ("yarn:factor=2,factor=3", "key 'factor' is given twice"),
    ("yarn:factor=2,beta_fast=0", r"'beta_fast'=0 is out of range \(0.0"),
    ("ntk:factor=1e308", r"'factor'=1e\+308 is out of range \[1.0, 1048576.0\]"),  # finite, but no NTK base would be
    ("ntk:factor=1e400", "'factor' must be finite"),
    ("yarn:factor=2+", "empty part"),
])
def test_parse_method_rejects_with_a_message_naming_the_key(spec, message):
    if message is None:
        parse_method(spec)
        return
    with pytest.raises(ValueError, match=message):
        parse_method(spec)


@pytest.mark.parametrize(("text", "expected"), [("no", False), ("false", False), ("0", False), ("yes", True),
                                                ("true", True), ("1", True)])
def test_rerope_logn_flag_means_what_it_says(text, expected):
    """``rerope:logn=no`` used to mean logn=True (any non-empty string was truthy)."""
    assert parse_method(f"rerope:window=8,logn={text}").variant().logn is expected


def test_rope_part_is_validated_against_the_model_not_a_made_up_geometry():
    """The rope part used to be checked against a fixed probe (head_dim 64, trained 8192): a valid longrope
    spec for a head_dim-16 model was rejected, and key checks that need the model came too early."""
    model = tiny_model(max_position_embeddings=32)  # head_dim 16: longrope lists of 8 factors
    short, long = [1.0] * 8, [2.0] * 8
    spec = parse_method(f"longrope:short_factor={short},long_factor={long},original_max_position_embeddings=16")
    patch(model, spec)
    assert model.config.rope.rope_type == "longrope" and model.config.rope.params.long_factor == tuple(long)
    yarn = parse_method("yarn:factor=2,original_max_position_embeddings=16384")
    big = RopeConfig(head_dim=128, rope_theta=1e6, max_position_embeddings=32768)
    assert yarn.rope_config(big).original_max_position_embeddings == 16384
    wrong = parse_method(f"longrope:short_factor={[1.0] * 4},long_factor={[1.0] * 4}")  # grammar is fine
    with pytest.raises(ValueError, match="'short_factor' must have length 8"):
        patch(model, wrong)


def test_patch_resets_to_base_rope():
    model = tiny_model()
    base = model.config.rope
    patch(model, "yarn:factor=2", base)
    assert model.config.rope.rope_type == "yarn" and isinstance(model.attention, RopeAttention)
    patch(model, "self-extend:group=2,window=4", base)
    assert model.config.rope == base and isinstance(model.attention.variant, SelfExtend)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="GPU test: needs CUDA")
@pytest.mark.parametrize("spec", ["self-extend:group=3,window=6", "leaky-rerope:window=4,k=3",
                                  "dynamic:factor=2+consistent"])
def test_variants_on_cuda_equal_cpu(spec):
    model = tiny_model(max_position_embeddings=16)
    patch(model, spec)
    ids = torch.randint(0, 200, (2, 40), generator=torch.Generator().manual_seed(8))
    with torch.no_grad():
        cpu = model(ids)
        gpu = model.to("cuda")(ids.cuda()).cpu()
    torch.testing.assert_close(gpu, cpu, rtol=1e-4, atol=1e-4)
