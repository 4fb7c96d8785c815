"""FastDecoder and its kernels: every fast path against the plain engine and the pure-torch twins.

The reference for a decode step is the engine's own cached decode, ``model(token[:, None],
cache=cache)``, fed the same tokens (teacher forcing on the engine's greedy choice), so a single
divergent argmax cannot hide or cause a logits mismatch. Tolerances: float32 sums in another
order differ by ~1e-6 relative; 1e-4 absolute on logits (as the engine-vs-transformers tests).
"""

from __future__ import annotations

import copy

import pytest
import torch
from tiny_llama import tiny_model

from ropekit.kernels import gemv as G
from ropekit.model.attention import AttentionMethod
from ropekit.model.fast_decode import FastDecoder
from ropekit.model.generate import generate_ids

LOGITS_ATOL = 1e-4


def cpp_or_skip():
    if G.extension() is None:
        pytest.skip("the C++ GEMV extension does not build here")
    return G.backend("cpp")


BACKENDS = ["torch", pytest.param("cpp", marks=pytest.mark.filterwarnings("ignore::RuntimeWarning"))]


def assert_close(actual, expected, atol, rtol=0.0, what=""):
    diff = (actual.float() - expected.float()).abs()
    torch.testing.assert_close(
        actual, expected, atol=atol, rtol=rtol,
        msg=lambda m: f"{what}: max diff {diff.max():.3g}, mean {diff.mean():.3g}\n{m}")


# ---- kernels vs their torch twins ---------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("K", [1, 7, 64, 100, 576])
@pytest.mark.parametrize("norm", [False, True])
@pytest.mark.parametrize("accumulate", [False, True])
def test_gemv_matches_torch(dtype, K, norm, accumulate):
    ext = cpp_or_skip()
    g = torch.Generator().manual_seed(K)
    weights = [(torch.randn(n, K, generator=g) / K**0.5).to(dtype) for n in (13, 5, 70)]  # 88 rows
    x, norm_weight = torch.randn(K, generator=g), 1 + 0.1 * torch.randn(K, generator=g)
    y0 = torch.randn(88, generator=g)
    got, want = y0.clone(), y0.clone()
    nw = norm_weight if norm else None
    ext.gemv(weights, x, got, accumulate, nw, 1e-5)
    G.TORCH_OPS.gemv(weights, x, want, accumulate, nw, 1e-5)
    assert_close(got, want, atol=1e-5, rtol=1e-5, what="gemv")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("K", [7, 96, 576])
def test_gemv_swiglu_matches_torch(dtype, K):
    ext = cpp_or_skip()
    g = torch.Generator().manual_seed(K)
    # 200 rows: more than one of the kernel's 64-row chunks
    w_gate, w_up = ((torch.randn(200, K, generator=g) / K**0.5).to(dtype) for _ in range(2))
    x, norm_weight = torch.randn(K, generator=g), 1 + 0.1 * torch.randn(K, generator=g)
    for nw in (None, norm_weight):
        got, want = torch.empty(200), torch.empty(200)
        ext.gemv_swiglu(w_gate, w_up, x, got, nw, 1e-5)
        G.TORCH_OPS.gemv_swiglu(w_gate, w_up, x, want, nw, 1e-5)
        assert_close(got, want, atol=1e-5, rtol=1e-5, what="gemv_swiglu")


@pytest.mark.parametrize("heads", [(4, 2, 16), (9, 3, 64), (3, 3, 80), (8, 1, 24)])
@pytest.mark.parametrize("pos", [0, 5, 199])
def test_decode_attention_matches_torch(heads, pos):
    ext = cpp_or_skip()
    H, Hkv, D = heads
    g = torch.Generator().manual_seed(pos)
    qkv = torch.randn((H + 2 * Hkv) * D, generator=g)
    k_cache, v_cache = torch.randn(Hkv, 200, D, generator=g), torch.randn(Hkv, 200, D, generator=g)
    k2, v2 = k_cache.clone(), v_cache.clone()
    got, want = torch.empty(H * D), torch.empty(H * D)
    ext.decode_attention(qkv, k_cache, v_cache, pos, H, got, D**-0.5)
    G.TORCH_OPS.decode_attention(qkv, k2, v2, pos, H, want, D**-0.5)
    assert torch.equal(k_cache, k2) and torch.equal(v_cache, v2), "the new k/v must land in slot pos exactly"
    assert_close(got, want, atol=1e-5, rtol=1e-5, what="decode_attention")


@pytest.mark.parametrize("threading", ["pool", "openmp"])
@pytest.mark.parametrize("threads", [1, 2, 3])
def test_threading_gives_identical_results(threading, threads):
    """Each row is summed by one thread in a fixed order: any split gives bit-identical output."""
    cpp_or_skip()
    ext, saved = G.extension(), torch.get_num_threads()
    g = torch.Generator().manual_seed(threads)
    weights = [torch.randn(5000, 576, generator=g)]  # ~90 chunks
    x, want, got = torch.randn(576, generator=g), torch.empty(5000), torch.empty(5000)
    torch.set_num_threads(1)
    ext.gemv(weights, x, want)
    try:
        ext.set_threading(threading)
        torch.set_num_threads(threads)
        for _ in range(20):  # many jobs in a row: helpers that wake late must not disturb the next
            ext.gemv(weights, x, got)
            assert torch.equal(got, want)
    finally:
        ext.set_threading("pool")
        torch.set_num_threads(saved)
    with pytest.raises(RuntimeError, match="'pool' or 'openmp'"):
        ext.set_threading("tbb")


def test_gemv_rejects_bad_arguments():
    ext = cpp_or_skip()
    w, x, y = torch.randn(4, 8), torch.randn(8), torch.empty(4)
    with pytest.raises(RuntimeError, match="K=8 but x has 7"):
        ext.gemv([w], torch.randn(7), y)
    with pytest.raises(RuntimeError, match="y has 3 elements"):
        ext.gemv([w], x, torch.empty(3))
    with pytest.raises(RuntimeError, match="float32 or bfloat16"):
        ext.gemv([w.half()], x, y)
    with pytest.raises(RuntimeError, match="contiguous"):
        ext.gemv([w.t()], torch.randn(4), torch.empty(8))
    with pytest.raises(RuntimeError, match="outside the cache"):
        cache = torch.zeros(2, 3, 4)  # [Hkv, S_max, D]: slots 0..2
        ext.decode_attention(torch.randn(6 * 4), cache, cache.clone(), 3, 2, torch.empty(8), 1.0)


def test_unknown_backend_is_a_clear_error(monkeypatch):
    with pytest.raises(ValueError, match="unknown GEMV backend 'fortran'"):
        G.backend("fortran")
    monkeypatch.setenv(G.ENV_VAR, "torch")
    assert G.backend().name == "torch"


# ---- FastDecoder vs the engine's cached decode on tiny random models --------------------


def engine_vs_fast(model, fast: FastDecoder, prompt: list[int], steps: int) -> tuple[list[int], list[int]]:
    """Teacher-forced comparison of every step's logits; returns (engine tokens, fast tokens)."""
    cache = model.new_cache(1, len(prompt) + steps + 1)
    with torch.no_grad():
        want = model(torch.tensor([prompt]), cache=cache)[0, -1]
        got = fast.prefill(prompt)
        engine_tokens, fast_tokens = [], []
        for step in range(steps):
            assert_close(got, want, atol=LOGITS_ATOL, what=f"logits at step {step}")
            engine_tokens.append(int(want.argmax()))
            fast_tokens.append(int(got.argmax()))
            want = model(torch.tensor([[engine_tokens[-1]]]), cache=cache)[0, -1]
            got = fast.step(engine_tokens[-1])
    return engine_tokens, fast_tokens


PROMPT = [1, 40, 77, 200, 13, 9, 250]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("changes", [
    {},
    {"attention_bias": True},
    {"rope": {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
              "original_max_position_embeddings": 32}},
    {"rope": {"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 2.0}},
    {"rope": {"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5}},
    {"num_key_value_heads": 4, "tie_word_embeddings": True},
], ids=["plain", "bias", "yarn", "dynamic", "partial-rotary", "mha-tied"])
def test_fast_decode_equals_engine_cached_decode(backend, changes):
    model = tiny_model(**changes)
    fast = FastDecoder(model, 64, backend=backend)
    engine_tokens, fast_tokens = engine_vs_fast(model, fast, PROMPT, 40)
    assert fast_tokens == engine_tokens


@pytest.mark.parametrize("backend", BACKENDS)
def test_bfloat16_weights_equal_the_engine_on_bfloat16_rounded_weights(backend):
    model = tiny_model()
    rounded = copy.deepcopy(model)
    with torch.no_grad():
        for p in rounded.parameters():
            p.copy_(p.bfloat16().float())
    fast = FastDecoder(rounded, 64, weight_dtype=torch.bfloat16, backend=backend)
    assert fast.lm_head.dtype == torch.bfloat16
    engine_tokens, fast_tokens = engine_vs_fast(rounded, fast, PROMPT, 33)
    assert fast_tokens == engine_tokens


def test_generate_equals_engine_greedy_and_stops():
    model = tiny_model()
    fast = FastDecoder(model, 64)
    engine = [int(t[0]) for t in generate_ids(model, [PROMPT], max_new_tokens=32)]
    assert fast.generate(PROMPT, 32) == engine
    stop = engine[5]
    first = engine.index(stop)
    assert fast.generate(PROMPT, 32, stop_ids=[stop]) == engine[: first + 1]
    assert fast.generate(PROMPT, 0) == []


def test_a_new_prefill_starts_a_new_sequence():
    model = tiny_model()
    fast = FastDecoder(model, 64)
    first = fast.generate(PROMPT, 10)
    fast.generate([3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14], 20)  # longer: leaves stale slots behind
    assert fast.generate(PROMPT, 10) == first


def test_fast_decode_errors():
    model = tiny_model()
    fast = FastDecoder(model, 8)
    with pytest.raises(ValueError, match="empty prompt"):
        fast.prefill([])
    with pytest.raises(ValueError, match="longer than the FastDecoder cache"):
        fast.prefill(list(range(9)))
    fast.prefill(list(range(7)))
    with pytest.raises(ValueError, match="outside"):
        fast.step(10_000)
    fast.step(3)
    with pytest.raises(ValueError, match="cache overflow"):
        fast.step(3)
    assert len(fast.generate(list(range(6)), 10)) == 3  # stops when the cache is full
    with pytest.raises(ValueError, match="weight_dtype"):
        FastDecoder(model, 8, weight_dtype=torch.float16)

    class Custom(AttentionMethod):
        pass

    model.set_attention(Custom())
    with pytest.raises(ValueError, match="plain rope attention only"):
        FastDecoder(model, 8)


def test_weights_are_shared_not_copied_in_float32():
    model = tiny_model()
    fast = FastDecoder(model, 16)
    assert fast.layers[0].gate.data_ptr() == model.layers[0].mlp.gate_proj.weight.data_ptr()
    assert fast.lm_head.data_ptr() == model.lm_head.weight.data_ptr()


@pytest.mark.parametrize("backend", BACKENDS)
def test_packed_weights_give_the_same_logits(backend):
    model = tiny_model()
    shared = FastDecoder(model, 32, backend=backend)
    packed = FastDecoder(model, 32, backend=backend, pack=True)
    assert packed.layers[1].down.data_ptr() != model.layers[1].mlp.down_proj.weight.data_ptr()
    assert torch.equal(packed.layers[1].down, model.layers[1].mlp.down_proj.weight)
    torch.testing.assert_close(packed.prefill(PROMPT), shared.prefill(PROMPT), atol=0, rtol=0)
    for token in (3, 99, 7):
        torch.testing.assert_close(packed.step(token), shared.step(token), atol=0, rtol=0)


# ---- the real model (SmolLM2-135M, float32) --------------------------------------------


@pytest.mark.slow
def test_smollm2_fast_decode_equals_engine(smollm2):
    """32 teacher-forced steps (C++ kernels) and 4 (torch twins); then ``generate`` reproduces the
    engine's greedy tokens (teacher forcing on the engine's argmax is its greedy decode)."""
    model, tokenizer = smollm2
    prompt = tokenizer.encode("The old lighthouse keeper looked out over the grey water and")
    fast = FastDecoder(model, 64, backend="torch")
    engine_vs_fast(model, fast, prompt, 4)
    cpp_or_skip()
    fast = FastDecoder(model, 64, backend="cpp")
    engine_tokens, fast_tokens = engine_vs_fast(model, fast, prompt, 32)
    assert fast_tokens == engine_tokens
    assert fast.generate(prompt, 32) == engine_tokens


@pytest.mark.slow
def test_smollm2_bfloat16_weights_equal_engine_on_rounded_weights(smollm2):
    model, tokenizer = smollm2
    rounded = copy.deepcopy(model)
    with torch.no_grad():
        for p in rounded.parameters():
            p.copy_(p.bfloat16().float())
    prompt = tokenizer.encode("The old lighthouse keeper looked out over the grey water and")
    fast = FastDecoder(rounded, 64, weight_dtype=torch.bfloat16)
    engine_tokens, fast_tokens = engine_vs_fast(rounded, fast, prompt, 16)
    assert fast_tokens == engine_tokens
