"""The demos: every claim holds in fast mode, and the key numbers match independent computations.

The maths runs against references written here (rotation matrices, plain loops, closed forms,
F.scaled_dot_product_attention); the model-dependent functions run on a tiny random LLaMA; the
real SmolLM2 parts are marked slow.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from tiny_llama import tiny_model

from ropekit.cli import main
from ropekit.demos import extrapolation, kv_cache, permutation, relative
from ropekit.demos.common import DemoResult

# --- permutation ---------------------------------------------------------------------------------


def sdpa_toy(tokens, w, causal):
    """The seed's toy attention through torch's own SDPA: the independent reference."""
    x = w.embed[torch.tensor(tokens)]  # [T, C]
    T, C = x.shape
    q, k, v = ((x @ m).view(T, 2, C // 2).transpose(0, 1) for m in (w.wq, w.wk, w.wv))  # [H, T, D]
    return F.scaled_dot_product_attention(q, k, v, is_causal=causal).transpose(0, 1).reshape(T, C)


@pytest.mark.parametrize("causal", [False, True])
def test_toy_attention_matches_sdpa(causal):
    w = permutation.ToyWeights.random()
    for tokens in (permutation.ORDER_A, permutation.ORDER_B):
        torch.testing.assert_close(permutation.toy_attention(tokens, w, causal=causal),
                                   sdpa_toy(tokens, w, causal), rtol=1e-5, atol=1e-6)


def test_permutation_toy_claims_and_numbers():
    result = permutation.run(fast=True, model=None)
    assert result.passed and len(result.claims) == 4
    w = permutation.ToyWeights.random()
    a, b = sdpa_toy(permutation.ORDER_A, w, False), sdpa_toy(permutation.ORDER_B, w, False)
    assert result.numbers["toy_swap_diff"] <= permutation.TOY_TOLERANCE
    assert float((b - a[permutation.PERM]).abs().max()) <= permutation.TOY_TOLERANCE
    ca, cb = sdpa_toy(permutation.ORDER_A, w, True), sdpa_toy(permutation.ORDER_B, w, True)
    assert result.numbers["causal_early_rows_diff"] == pytest.approx(
        float((cb[:2] - ca[permutation.PERM][:2]).abs().max()), rel=1e-4)
    assert result.numbers["rope_last_row_diff"] > 1e-3


def test_position_free_method_on_a_tiny_model():
    model = tiny_model()
    ids = [5, 17, 42, 99, 7, 3]
    reordered = permutation.reorder_earlier(ids)
    assert reordered[-1] == ids[-1] and sorted(reordered) == sorted(ids) and reordered != ids
    from ropekit.demos.common import using_attention

    default = model.attention
    with using_attention(model, permutation.position_free_method(rope=False, causal=False)):
        lp_a = permutation.next_token_log_probs(model, ids)
        lp_b = permutation.next_token_log_probs(model, reordered)
    torch.testing.assert_close(lp_a, lp_b, rtol=0, atol=1e-5)
    assert model.attention is default  # restored
    # the probe with RoPE on and a causal mask is the model itself
    with using_attention(model, permutation.position_free_method(rope=True, causal=True)):
        probe = permutation.next_token_log_probs(model, ids)
    torch.testing.assert_close(probe, permutation.next_token_log_probs(model, ids), rtol=0, atol=1e-5)
    assert float((permutation.next_token_log_probs(model, reordered) - probe).abs().max()) > 1e-3


# --- relative -----------------------------------------------------------------------------------


def rotation_matrix(position: int, inv_freq: torch.Tensor) -> torch.Tensor:
    """Block rotation for the half layout (pair i = channels i, i + D/2), float64, built entry by entry."""
    half = inv_freq.shape[0]
    R = torch.zeros(2 * half, 2 * half, dtype=torch.float64)
    for i, theta in enumerate(inv_freq.double().tolist()):
        c, s = math.cos(position * theta), math.sin(position * theta)
        R[i, i], R[i, i + half], R[i + half, i], R[i + half, i + half] = c, -s, s, c
    return R


def test_relative_score_matches_rotation_matrices():
    inv_freq, _ = relative.MODEL_ROPE.frequencies()
    g = torch.Generator().manual_seed(3)
    q, k = torch.randn(64, generator=g), torch.randn(64, generator=g)
    for m, n in ((0, 0), (42, 17), (17, 42), (1000, 3)):
        rq, rk = rotation_matrix(m, inv_freq) @ q.double(), rotation_matrix(n, inv_freq) @ k.double()
        expected = float(rq @ rk)
        assert relative.relative_score(q, k, m - n, inv_freq) == pytest.approx(expected, abs=1e-9)
        assert relative.rope_score(q, k, m, n, inv_freq) == pytest.approx(expected, abs=1e-4)


def test_relative_upper_bound_against_a_loop():
    inv_freq, _ = relative.MODEL_ROPE.frequencies()
    for r in (0, 1, 7, 500, 8192):
        partial, total = 0j, 0.0
        for theta in inv_freq.double().tolist():
            partial += complex(math.cos(r * theta), math.sin(r * theta))
            total += abs(partial)
        assert float(relative.relative_upper_bound(inv_freq, torch.tensor([r]))[0]) == pytest.approx(
            total / len(inv_freq), rel=1e-12)


def test_relative_demo(tmp_path):
    result = relative.run(fast=True, plot_dir=tmp_path)
    assert result.passed and len(result.claims) == 4
    inv_freq, _ = relative.MODEL_ROPE.frequencies()
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(64, generator=g), torch.randn(64, generator=g)
    R = rotation_matrix(relative.N - relative.M, inv_freq)  # R(m)q . R(n)k = q . R(n-m)k
    assert result.numbers["relative_oracle"] == pytest.approx(float(q.double() @ (R @ k.double())), abs=1e-9)
    assert result.numbers["relative_max_error"] <= 1e-6 * float(q.norm() * k.norm())
    assert result.numbers["naive_max_error"] > 0.1  # float32 angles do drift at 1e9: the contrast is real
    assert result.numbers["decay_at_zero"] == (32 + 1) / 2
    assert (tmp_path / "relative_decay.png").stat().st_size > 10_000


# --- extrapolation ------------------------------------------------------------------------------


def test_critical_dimension_independently():
    L, base, d = 8192, 100000.0, 64
    first = next(i for i in range(d // 2) if 2 * math.pi * base ** (2 * i / d) > L)
    result = extrapolation.run(fast=True, plot_dir=None, model=None)
    assert result.passed
    assert result.numbers["critical_first_pair"] == first == 20
    assert result.numbers["critical_dimension"] == 2 * first
    assert result.numbers["critical_pairs"] == list(range(first, d // 2))
    pairs_in_turn = 64 * math.log(4096 / (2 * math.pi)) / math.log(10000.0)
    assert extrapolation.critical_dimension(128, 10000.0, 4096) == 2 * math.ceil(pairs_in_turn)


def test_wavelength_ratios_independently(tmp_path):
    result = extrapolation.run(fast=True, plot_dir=tmp_path, model=None)
    ratios = {k: torch.tensor(v, dtype=torch.float64) for k, v in result.numbers["wavelength_ratios"].items()}
    s, d = extrapolation.SCALE, 64
    torch.testing.assert_close(ratios["linear (PI)"], torch.full((32,), float(s), dtype=torch.float64),
                               rtol=1e-6, atol=0)
    # NTK: base' = base * s^(d/(d-2)), so lambda'_i / lambda_i = s^(2i/(d-2))
    ntk = torch.tensor([s ** (2 * i / (d - 2)) for i in range(d // 2)], dtype=torch.float64)
    torch.testing.assert_close(ratios["NTK-aware"], ntk, rtol=1e-6, atol=0)
    assert result.numbers["critical_kept"] == {"linear (PI)": 12, "NTK-aware": 1, "YaRN": 12, "Llama 3": 12}
    assert (tmp_path / "extrapolation_wavelengths.png").stat().st_size > 10_000
    assert any("real-model" in s for s in result.skipped)


def test_token_nll_equals_cross_entropy_of_full_logits():
    model = tiny_model()
    ids = torch.randint(0, 259, (40,), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = model(ids[None])[0]
    expected = F.cross_entropy(logits[:-1], ids[1:], reduction="none")
    torch.testing.assert_close(extrapolation.token_nll(model, ids), expected, rtol=1e-4, atol=1e-4)
    means = extrapolation.bucket_means(expected, 16)
    torch.testing.assert_close(means, torch.stack([expected[:16].mean(), expected[16:32].mean(),
                                                   expected[32:].mean()]))


# --- kv cache -----------------------------------------------------------------------------------


def test_greedy_decode_positions_and_cache_on_a_tiny_model():
    model = tiny_model()
    prompt = [10, 20, 30, 40]
    trace = kv_cache.greedy_decode(model, prompt, 5)
    assert trace.positions == [[[0, 1, 2, 3]], [[4]], [[5]], [[6]], [[7]]]
    reference = kv_cache.recomputed_logits(model, prompt, trace.tokens)
    assert kv_cache.max_logit_diff(trace.logits, reference) <= kv_cache.LOGIT_TOLERANCE
    bad = kv_cache.greedy_decode(model, prompt, 5, restart_positions=True)
    assert bad.positions == [[[0, 1, 2, 3]], [[0]], [[0]], [[0]], [[0]]]
    assert bad.logits[0].equal(trace.logits[0])  # the prompt pass is the same
    bad_reference = kv_cache.recomputed_logits(model, prompt, bad.tokens)
    assert kv_cache.max_logit_diff(bad.logits[1:], bad_reference[1:]) > 1e-3


def test_kv_cache_demo_without_a_model_skips():
    result = kv_cache.run(fast=True, model=None)
    assert result.passed and result.skipped and not result.claims


# --- the command line ---------------------------------------------------------------------------


def test_cli_fast_demos_without_model(tmp_path, capsys):
    assert main(["demo", "relative", "--fast", "--plot", str(tmp_path)]) == 0
    assert main(["demo", "extrapolation", "--fast", "--no-model", "--plot", str(tmp_path)]) == 0
    assert main(["demo", "all", "--fast", "--no-model"]) == 0
    out = capsys.readouterr().out
    assert "[FAIL]" not in out and "relative: 4/4 claims hold" in out
    assert {p.name for p in tmp_path.iterdir()} == {"relative_decay.png", "extrapolation_wavelengths.png"}


def test_cli_exit_codes(monkeypatch, capsys):
    assert main(["demo", "permutation", "--model", "no-such-model"]) == 2
    assert "no-such-model" in capsys.readouterr().err

    def failing(fast, plot_dir):
        result = DemoResult("relative")
        result.check("a claim that does not hold", False)
        return result

    monkeypatch.setattr(relative, "run", failing)
    assert main(["demo", "relative", "--fast"]) == 1
    assert "FAILED: relative" in capsys.readouterr().out


# --- the real model (slow) ----------------------------------------------------------------------


@pytest.mark.slow
def test_permutation_on_smollm2(smollm2):
    model, tokenizer = smollm2
    result = permutation.run(fast=True, model=smollm2)
    assert result.passed and len(result.claims) == 7
    ids = tokenizer.encode(permutation.MODEL_PROMPT)
    lp_a = permutation.next_token_log_probs(model, ids)  # the model itself: RoPE, causal
    lp_b = permutation.next_token_log_probs(model, permutation.reorder_earlier(ids))
    assert result.numbers["model_rope_diff"] == pytest.approx(float((lp_a - lp_b).abs().max()), abs=1e-3)
    assert tokenizer.decode([int(lp_a.argmax())]) == " Paris"
    assert result.numbers["model_free_diff"] <= 1e-3


@pytest.mark.slow
def test_kv_cache_on_smollm2(smollm2):
    model, tokenizer = smollm2
    result = kv_cache.run(fast=True, model=smollm2)
    assert result.passed and len(result.claims) == 3
    steps = len(result.numbers["tokens"])
    assert result.numbers["positions"] == [[[0, 1, 2, 3]]] + [[[4 + i]] for i in range(steps - 1)]
    # independent: plain greedy decoding without any cache gives the same tokens
    ids = tokenizer.encode(kv_cache.PROMPT)[: kv_cache.PROMPT_TOKENS]
    with torch.no_grad():
        for _ in range(steps):
            ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
    assert result.numbers["tokens"] == ids[kv_cache.PROMPT_TOKENS:]
    assert result.numbers["restart_vs_recomputed"] > 1.0


@pytest.mark.slow
def test_token_nll_on_smollm2_matches_cross_entropy(smollm2):
    model, tokenizer = smollm2
    assert model.config.rope == extrapolation.MODEL_ROPE == relative.MODEL_ROPE  # the demos' hard-coded rope
    ids = extrapolation.load_window(tokenizer, 300)
    with torch.no_grad():
        logits = model(ids[None])[0]
    expected = F.cross_entropy(logits[:-1], ids[1:], reduction="none")
    torch.testing.assert_close(extrapolation.token_nll(model, ids), expected, rtol=1e-3, atol=1e-3)
    assert 1.0 < float(expected.mean()) < 5.0  # English prose under a working model


@pytest.mark.slow
def test_cli_all_fast_with_smollm2(smollm2_path, capsys):
    assert main(["demo", "all", "--fast", "--model", str(smollm2_path)]) == 0
    out = capsys.readouterr().out
    assert "[FAIL]" not in out and "kv-cache: 3/3 claims hold" in out
