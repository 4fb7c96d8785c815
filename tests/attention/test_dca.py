"""Dual Chunk Attention (ropekit.attention.dca) against a pair-by-pair reference written from its definition.

The reference loops over every (query i, key j) pair in float64: chunk length CL = S - W, the key
rotated at ``j mod CL``, the query at ``i mod CL`` (same chunk), ``min(i mod CL + CL, S)``
(previous chunk) or ``min(2 CL - 1, S)`` (older chunks), one softmax over all allowed keys. Both
paths are checked against it (the fused CPU prefill path in float32/bfloat16, the general blocked
path in float64 and with masks, offsets, softcap), then the variant in the engine and in
transformers (cache, padding, engine == transformers, dual_chunk_attention_config), its keys, and
``convert``'s refusal. Tolerances are written at each call: the product's cos/sin tables are
float32 (differences ~1e-7 against float64 angles).
"""

from __future__ import annotations

import math

import pytest
import torch
from tiny_llama import tiny_model, to_transformers

from ropekit.attention import DualChunk
from ropekit.attention.dca import dca_sizes
from ropekit.method import parse_method
from ropekit.rope import RopeConfig, RotaryEmbedding

B, H, HKV, D = 2, 4, 2, 16


def qkv(T: int, S: int | None = None, heads: tuple[int, int] = (H, HKV), seed: int = 0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    S = T if S is None else S
    return (torch.randn(B, heads[0], T, D, generator=g, dtype=dtype),
            torch.randn(B, heads[1], S, D, generator=g, dtype=dtype),
            torch.randn(B, heads[1], S, D, generator=g, dtype=dtype))


def rope_of(trained: int = 32) -> RotaryEmbedding:
    return RotaryEmbedding(RopeConfig(head_dim=D, rope_theta=10000.0, max_position_embeddings=trained))


def rotate_at(x: torch.Tensor, position: int, inv_freq: torch.Tensor, layout: str) -> torch.Tensor:
    """x ``[D]`` turned by angle position * inv_freq, float64 (half or interleaved pairs)."""
    angle = float(position) * inv_freq.double()
    c, s = torch.cos(angle), torch.sin(angle)
    if layout == "half":
        a, b = x[: D // 2], x[D // 2:]
        return torch.cat([a * c - b * s, b * c + a * s])
    a, b = x[0::2], x[1::2]
    return torch.stack([a * c - b * s, b * c + a * s], dim=-1).flatten()


def reference(q, k, v, q_pos, k_pos, allowed, chunk: int, local: int, rope, *, scale=None, softcap=None,
              layout="half", frequencies=None) -> torch.Tensor:
    """DCA pair by pair in float64. q ``[B, H, T, D]``, k/v ``[B, Hkv, S, D]``, q_pos ``[B, T]``, k_pos
    ``[B, S]``, allowed ``[B, T, S]`` bool. ``frequencies``: (inv_freq, attention factor) from elsewhere
    (the factor multiplies both rotated vectors), else the plain rope's."""
    CL = chunk - local
    inv_freq, factor = frequencies or (rope.frequencies()[0], 1.0)
    q, k, v = q.double(), k.double(), v.double()
    Bq, Hq, T, _ = q.shape
    g = Hq // k.shape[1]
    scale = 1 / math.sqrt(D) if scale is None else scale
    out = torch.zeros(Bq, Hq, T, D, dtype=torch.float64)
    for b in range(Bq):
        for h in range(Hq):
            for t in range(T):
                i = int(q_pos[b, t])
                scores = torch.full((k.shape[2],), float("-inf"), dtype=torch.float64)
                for s in range(k.shape[2]):
                    if not allowed[b, t, s]:
                        continue
                    j = int(k_pos[b, s])
                    apart = i // CL - j // CL
                    if apart <= 0:
                        qp = i % CL
                    elif apart == 1:
                        qp = min(i % CL + CL, chunk)
                    else:
                        qp = min(2 * CL - 1, chunk)
                    score = rotate_at(q[b, h, t], qp, inv_freq, layout) @ rotate_at(k[b, h // g, s], j % CL, inv_freq,
                                                                                     layout) * scale * factor**2
                    scores[s] = softcap * math.tanh(score / softcap) if softcap else score
                out[b, h, t] = torch.softmax(scores, 0) @ v[b, h // g]
    return out


def causal(T: int, start: int = 0):
    pos = (start + torch.arange(T)).expand(B, T)
    return pos, pos, (torch.arange(T)[None, :] <= torch.arange(T)[:, None]).expand(B, T, T)


def run(variant, q, k, v, q_pos, k_pos, rope, mask=None, **kwargs):
    return variant.attend(q, k, v, variant.tables(rope, q_pos, k_pos), mask, **kwargs)


# ---- the maths against the reference -------------------------------------------------------------


@pytest.mark.parametrize(("chunk", "local", "T", "block"), [(8, 3, 23, 512), (6, 2, 30, 7), (5, 4, 17, 4),
                                                             (12, 2, 40, 9)])
def test_general_path_equals_the_pair_by_pair_reference(chunk, local, T, block):
    """float64 takes the general path: every regime (intra, successive, inter, clamped or not) appears."""
    rope, (q, k, v) = rope_of(), qkv(T)
    q_pos, k_pos, allowed = causal(T)
    out = run(DualChunk(chunk, local, block), q, k, v, q_pos, k_pos, rope)
    expected = reference(q, k, v, q_pos, k_pos, allowed, chunk, local, rope)
    torch.testing.assert_close(out, expected, atol=1e-6, rtol=0)  # float32 angle tables vs float64


@pytest.mark.parametrize(("chunk", "local", "T", "start"), [(8, 3, 23, 0), (6, 2, 30, 4), (5, 4, 17, 0),
                                                             (12, 2, 40, 13)])
def test_fast_cpu_prefill_path_equals_the_reference(chunk, local, T, start):
    """float32 plain prefill (positions start + slot) runs the three flash SDPAs merged by log-sum-exp."""
    rope, (q, k, v) = rope_of(), qkv(T, dtype=torch.float32)
    q_pos, k_pos, allowed = causal(T, start)
    out = run(DualChunk(chunk, local), q, k, v, q_pos, k_pos, rope)
    expected = reference(q, k, v, q_pos, k_pos, allowed, chunk, local, rope)
    torch.testing.assert_close(out.double(), expected, atol=2e-6, rtol=0)  # float32 attention, ~1e-7 each step


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_yarn_frequencies_and_attention_factor_equal_the_reference(dtype):
    """``yarn:factor=4+dca``: DCA's positions turned by YaRN's frequencies, q and k scaled by YaRN's
    attention factor; the reference takes both from transformers (float64: reference path, float32: fused)."""
    from rope_reference import transformers_inv_freq

    parameters = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32, "rope_theta": 10000.0}
    rope = RotaryEmbedding(RopeConfig(head_dim=D, rope_theta=10000.0, max_position_embeddings=128).with_rope_type(
        parameters))
    inv_freq, factor = transformers_inv_freq({"head_dim": D, "max_position_embeddings": 128,
                                              "rope_parameters": parameters})
    assert factor > 1.1  # YaRN's 0.1 ln(4) + 1: the factor is exercised
    q, k, v = qkv(41, dtype=dtype, seed=7)
    q_pos, k_pos, allowed = causal(41)
    out = run(DualChunk(10, 3, block=6), q, k, v, q_pos, k_pos, rope)
    expected = reference(q, k, v, q_pos, k_pos, allowed, 10, 3, rope, frequencies=(inv_freq, factor))
    torch.testing.assert_close(out.double(), expected, atol=2e-6, rtol=0)  # float32 tables (and attention)


def test_fast_path_is_taken_and_equals_the_general_path(monkeypatch):
    from ropekit.attention import remap

    calls = []
    fused = remap.fused_parts_attention
    monkeypatch.setattr(remap, "fused_parts_attention", lambda *a, **kw: calls.append(1) or fused(*a, **kw))
    rope, (q, k, v) = rope_of(), qkv(50, dtype=torch.float32)
    q_pos, k_pos, allowed = causal(50)
    variant = DualChunk(16, 4, block=8)
    fast = run(variant, q, k, v, q_pos, k_pos, rope)
    assert calls == [1]
    general = run(variant, q, k, v, q_pos, k_pos, rope, mask=allowed[:, None])  # a mask: the general path
    assert calls == [1]
    torch.testing.assert_close(fast, general, atol=1e-6, rtol=0)  # float32, two summation orders


def test_mask_offsets_gqa_interleaved_softcap_and_scale_equal_the_reference():
    """Cached-style call: 5 new queries over 29 keys, row 0 left-padded (keys -1, masked), positions from 0 at
    each row's first real token, no GQA (H == Hkv), interleaved pairs, softcap 3 and scale 0.2."""
    T, S = 5, 29
    rope, (q, k, v) = rope_of(), qkv(T, S, heads=(2, 2), seed=3)
    k_pos = torch.stack([torch.arange(S) - 6, torch.arange(S)])
    k_pos[0, :6] = -1
    q_pos = k_pos[:, -T:]
    allowed = (k_pos[:, None, :] >= 0) & (torch.arange(S)[None, None, :] <= (S - T + torch.arange(T))[None, :, None])
    out = run(DualChunk(9, 3, block=2), q, k, v, q_pos, k_pos, rope, allowed[:, None], scale=0.2, softcap=3.0,
              layout="interleaved")
    expected = reference(q, k, v, q_pos, k_pos, allowed, 9, 3, rope, scale=0.2, softcap=3.0, layout="interleaved")
    torch.testing.assert_close(out, expected, atol=1e-6, rtol=0)


@pytest.mark.parametrize("layout", ["half", "interleaved"])
def test_softcap_and_layouts_in_prefill(layout):
    rope, (q, k, v) = rope_of(), qkv(26, seed=4)
    q_pos, k_pos, allowed = causal(26)
    out = run(DualChunk(10, 3, block=6), q, k, v, q_pos, k_pos, rope, softcap=2.0, layout=layout)
    expected = reference(q, k, v, q_pos, k_pos, allowed, 10, 3, rope, softcap=2.0, layout=layout)
    torch.testing.assert_close(out, expected, atol=1e-6, rtol=0)


@pytest.mark.parametrize("fast", [True, False])
def test_bfloat16_within_bfloat16_rounding(fast):
    """bf16 inputs, rotated in float32 and rounded once: within 2e-2 of the float64 reference on the same
    (rounded) inputs, outputs of size ~1 (bf16 keeps 8 bits: 2^-8 ~ 4e-3 per rounding, a few roundings)."""
    rope, (q, k, v) = rope_of(), qkv(33, dtype=torch.bfloat16, seed=5)
    q_pos, k_pos, allowed = causal(33)
    mask = None if fast else allowed[:, None]
    out = run(DualChunk(10, 3), q, k, v, q_pos, k_pos, rope, mask)
    assert out.dtype == torch.bfloat16
    expected = reference(q, k, v, q_pos, k_pos, allowed, 10, 3, rope)
    torch.testing.assert_close(out.double(), expected, atol=2e-2, rtol=0)


def test_decode_and_chunked_prefill_equal_the_full_prefill():
    """Keys unrotated, positions given: the last rows of a full prefill equal a call with only those queries."""
    rope, (q, k, v) = rope_of(), qkv(37, dtype=torch.float32, seed=6)
    q_pos, k_pos, _ = causal(37)
    variant = DualChunk(11, 4, block=5)
    full = run(variant, q, k, v, q_pos, k_pos, rope)
    for a, b in [(36, 37), (20, 31), (0, 9)]:
        part = run(variant, q[:, :, a:b], k[:, :, :b], v[:, :, :b], q_pos[:, a:b], k_pos[:, :b], rope)
        torch.testing.assert_close(part, full[:, :, a:b], atol=1e-6, rtol=0)


def test_shorter_than_a_chunk_is_plain_rope():
    from ropekit.attention import ConsistentDynamic

    rope, (q, k, v) = rope_of(), qkv(12, dtype=torch.float32)
    q_pos, k_pos, _ = causal(12)
    plain = ConsistentDynamic()
    torch.testing.assert_close(run(DualChunk(20, 4), q, k, v, q_pos, k_pos, rope),
                               run(plain, q, k, v, q_pos, k_pos, rope), atol=1e-6, rtol=0)


# ---- sizes, keys -----------------------------------------------------------------------------------


def test_default_sizes_come_from_the_trained_length():
    assert dca_sizes(4096) == (3072, 512)
    assert DualChunk().sizes(rope_of(8192)) == (6144, 1024)
    assert DualChunk(local=100).sizes(rope_of(8192)) == (6144, 100)
    rope = RotaryEmbedding(RopeConfig(head_dim=D, rope_theta=1e4, max_position_embeddings=4096).with_rope_type(
        {"rope_type": "yarn", "factor": 2.0, "original_max_position_embeddings": 2048}))
    assert DualChunk().sizes(rope) == (1536, 256)  # L = original_max_position_embeddings


@pytest.mark.parametrize("method", ["dca", "dca:chunk=6144,local=1024", "yarn:factor=2+dca",
                                    "dca:chunk=12,local=4,block=3+linear:factor=2"])
def test_parse_method(method):
    parsed = parse_method(method)
    assert parsed.attention == "dca" and isinstance(parsed.variant(), DualChunk)
    assert (parsed.rope is not None) == ("+" in method)


@pytest.mark.parametrize(("method", "message"), [
    ("dca:local=0", "'local'=0 is out of range"),
    ("dca:chunk=1", "'chunk'=1 is out of range"),
    ("dca:chunk=8,local=8", r"'chunk'=8 is out of range \[local \+ 1 = 9"),
    ("dca:chunk=8.5", "'chunk' must be an integer"),
    ("dca:block=0", "'block'=0 is out of range"),
    ("dca:window=4", r"unknown \['window'\]"),
    ("dca+self-extend", "at most one attention variant"),
])
def test_bad_keys_raise_value_errors_naming_the_key(method, message):
    with pytest.raises(ValueError, match=message):
        parse_method(method)


def test_a_default_that_meets_an_explicit_size_is_checked_when_the_model_is_known():
    with pytest.raises(ValueError, match=r"'chunk'=100 is out of range \[local \+ 1 = 1025"):
        DualChunk(chunk=100).sizes(rope_of(8192))  # W = L/8 = 1024


# ---- in the engine and in transformers -------------------------------------------------------------


def engine_and_hf(method: str, **changes):
    from ropekit import hf
    from ropekit import model as engine

    model = tiny_model(**changes)
    reference = to_transformers(model)
    return engine.patch(model, method), hf.patch(reference, method)


@pytest.mark.parametrize("method", ["dca:chunk=12,local=4", "dca", "yarn:factor=2+dca:chunk=9,local=2,block=5"])
def test_engine_and_transformers_give_the_same_logits(method):
    """A tiny llama (trained length 16: plain dca is S=12, W=2) over 48 tokens: engine == transformers to
    1e-5 (float32, two layers)."""
    ours, theirs = engine_and_hf(method, max_position_embeddings=16)
    x = torch.randint(0, 200, (1, 48), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(ours(x), theirs(x).logits, atol=1e-5, rtol=0)
        mask = torch.ones_like(x)  # a mask: transformers builds one and the general path runs
        torch.testing.assert_close(ours(x), theirs(x, attention_mask=mask).logits, atol=1e-5, rtol=0)


def test_engine_cached_decode_and_chunked_prefill_equal_full_recompute():
    from ropekit.model import patch

    model = patch(tiny_model(max_position_embeddings=16), "dca:chunk=10,local=3,block=4")
    ids = torch.randint(0, 200, (1, 48), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        full = model(ids)
        cache = model.new_cache(1, 48)
        parts = [model(ids[:, :20], cache=cache), model(ids[:, 20:33], cache=cache)]
        parts += [model(ids[:, t:t + 1], cache=cache) for t in range(33, 48)]
    torch.testing.assert_close(torch.cat(parts, dim=1), full, rtol=0, atol=1e-5)  # float32, two layers


def test_engine_left_padded_batch_equals_each_row_alone():
    from ropekit.model import patch

    model = patch(tiny_model(), "dca:chunk=7,local=2")
    gen = torch.Generator().manual_seed(2)
    short, long = torch.randint(0, 200, (1, 20), generator=gen), torch.randint(0, 200, (1, 29), generator=gen)
    batch = torch.cat([torch.cat([torch.zeros(1, 9, dtype=torch.long), short], 1), long])
    mask = torch.ones(2, 29, dtype=torch.long)
    mask[0, :9] = 0
    with torch.no_grad():
        both = model(batch, attention_mask=mask)
        torch.testing.assert_close(both[0, 9:], model(short)[0], rtol=0, atol=1e-5)
        torch.testing.assert_close(both[1], model(long)[0], rtol=0, atol=1e-5)


def test_transformers_cache_padding_and_generate():
    """HF tiny llama: generate with the cache == greedy recomputation; a left-padded row == the row alone."""
    _, model = engine_and_hf("dca:chunk=9,local=3", max_position_embeddings=16)
    gen = torch.Generator().manual_seed(3)
    short, long = torch.randint(3, 200, (1, 20), generator=gen), torch.randint(3, 200, (1, 29), generator=gen)
    batch = torch.cat([torch.cat([torch.zeros(1, 9, dtype=torch.long), short], 1), long])
    mask = torch.ones(2, 29, dtype=torch.long)
    mask[0, :9] = 0
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        both = model(batch, attention_mask=mask, position_ids=positions).logits
        torch.testing.assert_close(both[0, 9:], model(short).logits[0], atol=1e-5, rtol=0)
        torch.testing.assert_close(both[1], model(long).logits[0], atol=1e-5, rtol=0)
        model.generation_config.eos_token_id = None
        cached = model.generate(long, attention_mask=torch.ones_like(long), max_new_tokens=6, do_sample=False,
                                pad_token_id=0)
        x = long
        for _ in range(6):
            x = torch.cat([x, model(x).logits[:, -1:].argmax(-1)], dim=1)
    assert cached.tolist() == x.tolist()


def test_transformers_honours_dual_chunk_attention_config():
    from ropekit import hf

    _, model = engine_and_hf("dca", max_position_embeddings=32)
    x = torch.randint(0, 200, (1, 40), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        explicit = hf.patch(model, "dca:chunk=12,local=4")(x).logits
        default = hf.patch(model, "dca")(x).logits  # S = 24, W = 4 from the trained length 32
        model.config.dual_chunk_attention_config = {"chunk_size": 12, "local_size": 4,
                                                    "original_max_position_embeddings": 32}
        declared = hf.patch(model, "dca")(x).logits
        partly = hf.patch(model, "dca:local=5")(x).logits  # a key given in the method wins
        model.config.dual_chunk_attention_config = {"original_max_position_embeddings": 16}
        from_length = hf.patch(model, "dca")(x).logits  # S = 12, W = 2 from the declared length 16
        two = hf.patch(model, "dca:chunk=12,local=2")(x).logits
        five = hf.patch(model, "dca:chunk=12,local=5")(x).logits
    torch.testing.assert_close(declared, explicit, atol=0, rtol=0)
    torch.testing.assert_close(from_length, two, atol=0, rtol=0)
    torch.testing.assert_close(partly, five, atol=0, rtol=0)
    assert (default - explicit).abs().max() > 1e-3


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="GPU test: needs CUDA")
def test_dca_on_cuda_equals_cpu():
    """CUDA takes the general path, the CPU the fused prefill: 1e-4 (float32, two layers, other kernels)."""
    from ropekit.model import patch

    model = patch(tiny_model(max_position_embeddings=16), "dca:chunk=9,local=3")
    ids = torch.randint(0, 200, (2, 40), generator=torch.Generator().manual_seed(8))
    with torch.no_grad():
        cpu = model(ids)
        gpu = model.to("cuda")(ids.cuda()).cpu()
    torch.testing.assert_close(gpu, cpu, rtol=1e-4, atol=1e-4)


# ---- convert ---------------------------------------------------------------------------------------


def test_every_convert_target_refuses_dca_with_the_reason():
    from ropekit.convert import Inexpressible, translate, translate_all
    from ropekit.convert.translate import TARGETS

    base = RopeConfig(head_dim=64, rope_theta=1e4, max_position_embeddings=4096)
    for method in ("dca", "yarn:factor=2+dca:chunk=3072,local=512"):
        for target in TARGETS:
            with pytest.raises(Inexpressible, match=f"{target}: Dual Chunk Attention .* runs in no runtime"):
                translate(method, base, target)
        rows = translate_all(method, base)
        assert all(text.startswith("cannot:") and "\n" not in text for _, text in rows)
        assert len(rows) == len(TARGETS)


def test_cli_convert_refuses_dca_in_one_line(tmp_path, capsys):
    from tiny_llama import write_gguf

    from ropekit.cli import main

    model = write_gguf(tmp_path / "tiny.gguf", tiny_model(max_position_embeddings=64))
    assert main(["convert", "--model", str(model), "--method", "dca", "--to", "all"]) == 0
    assert capsys.readouterr().out.count("cannot:") == 5
    assert main(["convert", "--model", str(model), "--method", "dca", "--to", "vllm"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "vLLM removed its DCA backend in v0.11" in err
