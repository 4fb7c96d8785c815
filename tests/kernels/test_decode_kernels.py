"""The decode ops (C++ kernels vs their pure-torch twins) and the model's one-token decode path.

The model's layers are written once in these ops; a one-token step of one CPU sequence selects
the C++ kernels, anything else (or ``use_backend("torch")``) the torch twins. So the reference
for the fused decode path is the same model with the twins forced, fed the same tokens (teacher
forcing on the reference's greedy choice, so one divergent argmax cannot hide or cause a
mismatch). Tolerances: float32 sums in another order differ by ~1e-6 relative; 1e-4 absolute
on logits (as the engine-vs-transformers tests).
"""

from __future__ import annotations

import pytest
import torch
from tiny_llama import tiny_model

from ropekit.dispatch import use_backend
from ropekit.kernels import decode as D
from ropekit.model.generate import generate_ids

LOGITS_ATOL = 1e-4


def extension():
    ext = D.extension()
    if ext is None:
        pytest.fail(f"the C++ GEMV extension did not build (a C++ compiler and ninja are required): "
                    f"{D.GEMV_EXTENSION.error}")
    return ext


def assert_close(actual, expected, atol, rtol=0.0, what=""):
    diff = (actual.float() - expected.float()).abs()
    torch.testing.assert_close(
        actual, expected, atol=atol, rtol=rtol,
        msg=lambda m: f"{what}: max diff {diff.max():.3g}, mean {diff.mean():.3g}\n{m}")


# ---- the ops: C++ vs torch twin, through the dispatch point -------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("K", [1, 7, 64, 100, 576])
@pytest.mark.parametrize("norm", [False, True])
@pytest.mark.parametrize("bias", [False, True])
def test_norm_linear_matches_torch(dtype, K, norm, bias):
    extension()
    g = torch.Generator().manual_seed(K)
    weights = [(torch.randn(n, K, generator=g) / K**0.5).to(dtype) for n in (13, 5, 70)]  # 88 rows
    biases = [torch.randn(n, generator=g) for n in (13, 5, 70)] if bias else None
    x, norm_weight = torch.randn(1, 1, K, generator=g), 1 + 0.1 * torch.randn(K, generator=g)
    nw = norm_weight if norm else None
    assert D.NORM_LINEAR.select(x, weights, nw, 1e-5, biases) == "cpp"
    got = D.norm_linear(x, weights, nw, 1e-5, biases, backend="cpp")
    want = D.norm_linear(x, weights, nw, 1e-5, biases, backend="torch")
    for a, b in zip(got, want, strict=True):
        assert a.shape == b.shape
        assert_close(a, b, atol=1e-5, rtol=1e-5, what="norm_linear")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("K", [7, 96, 576])
def test_norm_swiglu_and_linear_residual_match_torch(dtype, K):
    extension()
    g = torch.Generator().manual_seed(K)
    # 200 rows: more than one of the kernel's 64-row chunks
    w_gate, w_up, w_down = ((torch.randn(200, K, generator=g) / K**0.5).to(dtype) for _ in range(3))
    x, norm_weight = torch.randn(1, 1, K, generator=g), 1 + 0.1 * torch.randn(K, generator=g)
    for nw in (None, norm_weight):
        got = D.norm_swiglu(x, w_gate, w_up, nw, 1e-5, backend="cpp")
        want = D.norm_swiglu(x, w_gate, w_up, nw, 1e-5, backend="torch")
        assert_close(got, want, atol=1e-5, rtol=1e-5, what="norm_swiglu")
    residual, bias = torch.randn(1, 1, 200, generator=g), torch.randn(200, generator=g)
    for b in (None, bias):
        got = D.linear_residual(x, w_down, residual, b, backend="cpp")
        want = D.linear_residual(x, w_down, residual, b, backend="torch")
        assert_close(got, want, atol=1e-5, rtol=1e-5, what="linear_residual")
    assert torch.equal(residual, residual.clone())  # the residual input is not modified


@pytest.mark.parametrize("cache_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("heads", [(4, 2, 16), (9, 3, 64), (3, 3, 80), (8, 1, 24)])
@pytest.mark.parametrize("slot", [0, 5, 199])
def test_decode_attention_matches_torch(cache_dtype, heads, slot):
    extension()
    H, Hkv, Dh = heads
    g = torch.Generator().manual_seed(slot)
    q, k, v = torch.randn(H * Dh, generator=g), torch.randn(Hkv * Dh, generator=g), torch.randn(Hkv * Dh, generator=g)
    k_cache = torch.randn(Hkv, 200, Dh, generator=g).to(cache_dtype)
    v_cache = torch.randn(Hkv, 200, Dh, generator=g).to(cache_dtype)
    k2, v2 = k_cache.clone(), v_cache.clone()
    got = D.decode_attention(q, k, v, k_cache, v_cache, slot, Dh**-0.5, backend="cpp")
    want = D.decode_attention(q, k, v, k2, v2, slot, Dh**-0.5, backend="torch")
    # the new k/v land in slot `slot` exactly (bf16: rounded to nearest even, as torch rounds)
    assert torch.equal(k_cache, k2) and torch.equal(v_cache, v2)
    assert_close(got, want, atol=1e-5, rtol=1e-5, what="decode_attention")


@pytest.mark.parametrize("threading", ["pool", "openmp"])
@pytest.mark.parametrize("threads", [1, 2, 3])
def test_threading_gives_identical_results(threading, threads):
    """Each row is summed by one thread in a fixed order: any split gives bit-identical output."""
    ext, saved = extension(), torch.get_num_threads()
    g = torch.Generator().manual_seed(threads)
    weights = [torch.randn(5000, 576, generator=g)]  # ~90 chunks
    x, want, got = torch.randn(576, generator=g), torch.empty(5000), torch.empty(5000)
    torch.set_num_threads(1)
    ext.gemv(weights, x, want, False, None, 1e-5)
    try:
        ext.set_threading(threading)
        torch.set_num_threads(threads)
        for _ in range(20):  # many jobs in a row: helpers that wake late must not disturb the next
            ext.gemv(weights, x, got, False, None, 1e-5)
            assert torch.equal(got, want)
    finally:
        ext.set_threading("pool")
        torch.set_num_threads(saved)
    with pytest.raises(RuntimeError, match="'pool' or 'openmp'"):
        ext.set_threading("tbb")


def test_kernels_reject_bad_arguments():
    ext = extension()
    w, x, y = torch.randn(4, 8), torch.randn(8), torch.empty(4)
    with pytest.raises(RuntimeError, match="K=8 but x has 7"):
        ext.gemv([w], torch.randn(7), y, False, None, 1e-5)
    with pytest.raises(RuntimeError, match="y has 3 elements"):
        ext.gemv([w], x, torch.empty(3), False, None, 1e-5)
    with pytest.raises(RuntimeError, match="float32 or bfloat16"):
        ext.gemv([w.half()], x, y, False, None, 1e-5)
    with pytest.raises(RuntimeError, match="contiguous"):
        ext.gemv([w.t()], torch.randn(4), torch.empty(8), False, None, 1e-5)
    cache = torch.zeros(2, 3, 4)  # [Hkv, S_max, D]: slots 0..2
    with pytest.raises(RuntimeError, match="outside the cache"):
        ext.decode_attention(torch.randn(8), torch.randn(8), torch.randn(8), cache, cache.clone(), torch.tensor(3),
                             torch.empty(8), 1.0)
    with pytest.raises(RuntimeError, match="float32 or bfloat16"):
        ext.decode_attention(torch.randn(8), torch.randn(8), torch.randn(8), cache.half(), cache.half(),
                             torch.tensor(0), torch.empty(8), 1.0)
    with pytest.raises(RuntimeError, match="one-element int64"):
        ext.decode_attention(torch.randn(8), torch.randn(8), torch.randn(8), cache, cache.clone(),
                             torch.tensor(0.0), torch.empty(8), 1.0)


def test_selection_and_forcing(monkeypatch):
    extension()
    x, w = torch.randn(1, 1, 8), torch.randn(4, 8)
    assert D.NORM_LINEAR.select(x, [w]) == "cpp"
    assert D.NORM_LINEAR.select(torch.randn(1, 2, 8), [w]) == "torch"  # two rows: a prefill
    assert D.NORM_LINEAR.select(x.double(), [w.double()]) == "torch"
    assert D.NORM_LINEAR.select(x, [w.half()]) == "torch"  # float16 weights: no C++ kernel
    with use_backend("torch", "norm_linear"):
        assert D.NORM_LINEAR.select(x, [w]) == "torch"
    assert D.NORM_LINEAR.select(x, [w]) == "cpp"
    monkeypatch.setenv(D.ENV_VAR, "torch")
    assert D.NORM_LINEAR.select(x, [w]) == "torch"
    monkeypatch.setenv(D.ENV_VAR, "fortran")
    with pytest.raises(ValueError, match="unknown norm_linear backend 'fortran'"):
        D.NORM_LINEAR.select(x, [w])


# ---- the model's decode path: fused kernels vs the same model on torch ops -----------------


def fused_vs_torch(model, prompt: list[int], steps: int) -> tuple[list[int], list[int]]:
    """Teacher-forced comparison of every step's logits; returns (torch-ops tokens, fused tokens)."""
    caches = model.new_cache(1, len(prompt) + steps + 1), model.new_cache(1, len(prompt) + steps + 1)
    ids = torch.tensor([prompt])
    with torch.no_grad():
        with use_backend("torch"):
            want = model(ids, cache=caches[0])[0, -1]
        got = model(ids, cache=caches[1])[0, -1]
        torch_tokens, fused_tokens = [], []
        for step in range(steps):
            assert_close(got, want, atol=LOGITS_ATOL, what=f"logits at step {step}")
            torch_tokens.append(int(want.argmax()))
            fused_tokens.append(int(got.argmax()))
            token = torch.tensor([[torch_tokens[-1]]])
            with use_backend("torch"):
                want = model(token, cache=caches[0])[0, -1]
            got = model(token, cache=caches[1])[0, -1]
    return torch_tokens, fused_tokens


PROMPT = [1, 40, 77, 200, 13, 9, 250]


@pytest.mark.parametrize("changes", [
    {},
    {"attention_bias": True},
    {"rope": {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
              "original_max_position_embeddings": 32}},
    {"rope": {"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 2.0}},
    {"rope": {"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5}},
    {"num_key_value_heads": 4, "tie_word_embeddings": True},
], ids=["plain", "bias", "yarn", "dynamic", "partial-rotary", "mha-tied"])
def test_fused_decode_equals_torch_ops(changes):
    extension()
    model = tiny_model(**changes)
    torch_tokens, fused_tokens = fused_vs_torch(model, PROMPT, 40)
    assert fused_tokens == torch_tokens
    assert "fused C++ decode kernels" in model.decode_path()


def test_bfloat16_model_decodes_in_float32_activations():
    extension()
    model = tiny_model().to(torch.bfloat16)
    torch_tokens, fused_tokens = fused_vs_torch(model, PROMPT, 33)
    assert fused_tokens == torch_tokens
    with torch.no_grad():
        cache = model.new_cache(1, 16)
        model(torch.tensor([PROMPT]), cache=cache)
        assert cache.keys.dtype == torch.bfloat16
        assert model(torch.tensor([[5]]), cache=cache).dtype == torch.float32


def test_generate_fast_and_plain_agree():
    model = tiny_model()
    fast = [int(t[0]) for t in generate_ids(model, [PROMPT], max_new_tokens=32)]
    plain = [int(t[0]) for t in generate_ids(model, [PROMPT], max_new_tokens=32, fast=False)]
    assert fast == plain


# ---- the real model (SmolLM2-135M, float32) --------------------------------------------


@pytest.mark.slow
def test_smollm2_fused_decode_equals_torch_ops(smollm2):
    """32 teacher-forced steps; then greedy generate reproduces the reference tokens."""
    extension()
    model, tokenizer = smollm2
    prompt = tokenizer.encode("The old lighthouse keeper looked out over the grey water and")
    torch_tokens, fused_tokens = fused_vs_torch(model, prompt, 32)
    assert fused_tokens == torch_tokens
    assert [int(t[0]) for t in generate_ids(model, [prompt], max_new_tokens=32)] == torch_tokens


# ---- the recorded decode step (DecodeGraph): replays equal the eager forward bit for bit ----------------


def graph_vs_eager(model, prompt: list[int], tokens: list[int]):
    """Logits of each token decoded through a ``DecodeGraph`` and through the eager forward, from the same
    prompt; also the graph."""
    caches = model.new_cache(1, len(prompt) + len(tokens)), model.new_cache(1, len(prompt) + len(tokens))
    with torch.no_grad():
        for cache in caches:
            model(torch.tensor([prompt]), cache=cache)
        graph = model.capture_decode(caches[0])
        replayed, eager = [], []
        for token in tokens:
            replayed.append(graph.step(token)[0, -1])
            eager.append(model(torch.tensor([[token]]), cache=caches[1])[0, -1])
    return torch.stack(replayed), torch.stack(eager), graph


@pytest.mark.parametrize("changes", [
    {}, {"attention_bias": True},
    {"rope": {"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 2.0}},
    {"rope": {"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5}},
], ids=["plain", "bias", "dynamic", "partial-rotary"])
def test_recorded_step_replays_equal_the_eager_forward_bit_for_bit(changes):
    extension()
    model = tiny_model(**changes)
    tokens = [int(t) for t in torch.randint(3, 250, (30,), generator=torch.Generator().manual_seed(5))]
    replayed, eager, graph = graph_vs_eager(model, PROMPT, tokens)
    assert graph.recording is not None and graph.recording.steps, "a one-token CPU step records its ops"
    assert torch.equal(replayed, eager)


def test_forward_never_records():
    """``forward`` is the plain pass: no recording survives it, whatever it is called with."""
    extension()
    model = tiny_model()
    cache = model.new_cache(1, 64)
    with torch.no_grad():
        model(torch.tensor([PROMPT]), cache=cache)
        for token in (5, 6, 7):
            model(torch.tensor([[token]]), cache=cache)
    assert not [name for name in vars(model) if "graph" in name or "record" in name]


def test_recorded_step_records_again_when_the_model_changes():
    extension()
    model = tiny_model()
    cache = model.new_cache(1, 64)
    with torch.no_grad():
        model(torch.tensor([PROMPT]), cache=cache)
        graph = model.capture_decode(cache)
        graph.step(5)
        graph.step(6)
        first = graph.recording
        model.set_rope("linear:factor=2")
        got = graph.step(7)[0, -1]
        assert graph.recording is not first, "a new rope: the step is recorded again"
        want = model(torch.tensor([[7]]), cache=_copy_cache(model, cache, drop_last=True),
                     positions=torch.tensor([len(PROMPT) + 2]))[0, -1]
    torch.testing.assert_close(got, want, atol=0, rtol=0)


def _copy_cache(model, cache, drop_last: bool):
    """A copy of ``cache`` (without its last slot when ``drop_last``)."""
    import copy

    other = copy.deepcopy(cache)
    if drop_last:
        other._fill = [n - 1 for n in other._fill]
        other.key_positions[:, other.length] = -1
    return other


def test_no_recorded_step_with_grad_or_torch_ops():
    """Where a step cannot be replayed the graph runs the eager forward, and equals it."""
    extension()
    model = tiny_model()
    cache = model.new_cache(1, 64)
    model(torch.tensor([PROMPT]), cache=cache).sum()
    graph = model.capture_decode(cache)
    graph.step(5)  # grad enabled: eager
    assert graph.recording is None
    with torch.no_grad(), use_backend("torch"):
        graph.step(6)
    assert graph.recording is None
    with torch.no_grad():
        graph.step(8)
        assert graph.recording is not None


def test_recorded_step_reports_overflow_and_bad_tokens():
    extension()
    model = tiny_model()
    cache = model.new_cache(1, len(PROMPT) + 2)
    with torch.no_grad():
        model(torch.tensor([PROMPT]), cache=cache)
        graph = model.capture_decode(cache)
        graph.step(5)
        with pytest.raises(ValueError, match="token ids must lie in"):
            graph.step(10_000)
        graph.step(6)
        with pytest.raises(ValueError, match="KV cache overflow"):
            graph.step(7)
