"""cos/sin and apply_rotary against independent oracles: complex RoPE, a naive loop, transformers."""

from __future__ import annotations

import math

import pytest
import torch
from rope_reference import complex_rope, half_to_interleaved, naive_rope_half

import ropekit
from ropekit import apply_rotary, rope_cos_sin


def plain_inv_freq(rotary_dim: int, base: float = 10000.0) -> torch.Tensor:
    return ropekit.compute_inv_freq({"head_dim": rotary_dim, "rope_theta": base})[0]


def test_apply_matches_naive_loop_half_layout():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 5, 16, dtype=torch.float64)
    inv_freq, positions = plain_inv_freq(16), torch.tensor([0, 1, 7, 100, 4096])
    cos, sin = rope_cos_sin(inv_freq, positions, dtype=torch.float64)
    torch.testing.assert_close(apply_rotary(x, cos, sin), naive_rope_half(x, inv_freq, positions),
                               rtol=0, atol=1e-12)


@pytest.mark.parametrize("heads_first", [True, False])
def test_interleaved_matches_complex_oracle(heads_first):
    """Interleaved layout == Meta's complex multiplication (float32 rotation vs complex128 oracle)."""
    torch.manual_seed(1)
    x = torch.randn(2, 4, 33, 64)
    inv_freq, positions = plain_inv_freq(64), torch.arange(33) * 37
    cos, sin = rope_cos_sin(inv_freq, positions)
    expected = complex_rope(x, inv_freq, positions).float()
    xin = x if heads_first else x.transpose(1, 2)
    got = apply_rotary(xin, cos, sin, layout="interleaved", heads_first=heads_first)
    got = got if heads_first else got.transpose(1, 2)
    torch.testing.assert_close(got, expected, rtol=0, atol=2e-5)


@pytest.mark.parametrize("rotary_dim", [64, 32, 16])
def test_half_equals_interleaved_under_pair_permutation(rotary_dim):
    torch.manual_seed(2)
    x = torch.randn(1, 2, 9, 64)
    cos, sin = rope_cos_sin(plain_inv_freq(rotary_dim), torch.arange(9))
    half = apply_rotary(x, cos, sin, layout="half")
    inter = apply_rotary(half_to_interleaved(x, rotary_dim), cos, sin, layout="interleaved")
    torch.testing.assert_close(half_to_interleaved(half, rotary_dim), inter, rtol=0, atol=0)


def test_partial_rotary_passes_tail_through_and_out_in_place():
    torch.manual_seed(3)
    x = torch.randn(2, 2, 6, 80)
    cos, sin = rope_cos_sin(plain_inv_freq(32), torch.arange(6))
    y = apply_rotary(x, cos, sin)
    assert torch.equal(y[..., 32:], x[..., 32:])
    full = naive_rope_half(x[..., :32], plain_inv_freq(32), torch.arange(6)).float()
    torch.testing.assert_close(y[..., :32], full, rtol=0, atol=1e-5)
    inplace = x.clone()
    result = apply_rotary(inplace, cos, sin, out=inplace)
    assert result.data_ptr() == inplace.data_ptr() and torch.equal(inplace, y)
    given = torch.empty_like(x)
    assert torch.equal(apply_rotary(x, cos, sin, out=given), y) and torch.equal(given, y)


def test_matches_transformers_apply_rotary_pos_emb():
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    torch.manual_seed(4)
    q, k = torch.randn(2, 8, 17, 64), torch.randn(2, 2, 17, 64)
    positions = torch.stack([torch.arange(17), torch.arange(17) + 5])  # (B, T): per-row positions
    cos, sin = rope_cos_sin(plain_inv_freq(64), positions)
    full_cos, full_sin = torch.cat([cos, cos], -1), torch.cat([sin, sin], -1)
    q_ref, k_ref = apply_rotary_pos_emb(q, k, full_cos, full_sin)
    q_out, k_out = ropekit.apply_rotary_qk(q, k, cos, sin)
    torch.testing.assert_close(q_out, q_ref, rtol=0, atol=1e-6)
    torch.testing.assert_close(k_out, k_ref, rtol=0, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_rotates_in_float32_and_rounds_once(dtype):
    torch.manual_seed(5)
    x = torch.randn(1, 4, 31, 64).to(dtype)
    cos, sin = rope_cos_sin(plain_inv_freq(64), torch.arange(31) * 1000)
    got = apply_rotary(x, cos, sin)
    expected = apply_rotary(x.float(), cos, sin).to(dtype)  # exact float32 result, one rounding
    assert got.dtype == dtype
    assert torch.equal(got, expected)


def test_relative_property_at_huge_positions():
    """q at m and k at n score depends only on m - n, even near 1e6 and 2e9 (float64 angle reduction).

    transformers computes the angles in float32: measured for head_dim 64, base 1e4, its angles are
    off by up to 0.020 rad at position 1e6 and 40.9 rad at 2e9 (rounding of p * theta_i), so its
    scores at 2e9 differ from the position-7 score by more than 1e-2, while ours agree to 1e-5.
    """
    torch.manual_seed(6)
    inv_freq = plain_inv_freq(64)
    q, k = torch.randn(1, 1, 1, 64, dtype=torch.float64), torch.randn(1, 1, 1, 64, dtype=torch.float64)

    def score(m: int, n: int) -> float:
        cq, sq = rope_cos_sin(inv_freq, torch.tensor([m]))
        ck, sk = rope_cos_sin(inv_freq, torch.tensor([n]))
        return float((apply_rotary(q, cq, sq) * apply_rotary(k, ck, sk)).sum())

    reference = score(7, 0)
    for shift in (1000, 10**6, 2 * 10**9, 2**31 - 8):
        assert math.isclose(score(shift + 7, shift), reference, rel_tol=0, abs_tol=1e-5 * max(1, abs(reference)))

    def transformers_score(m: int, n: int) -> float:
        angles = torch.tensor([float(m), float(n)])[:, None] * inv_freq[None, :]  # float32, like transformers
        c, s = angles.cos().double(), angles.sin().double()
        rot = lambda x, i: torch.cat([x[..., :32] * c[i] - x[..., 32:] * s[i],  # noqa: E731
                                      x[..., 32:] * c[i] + x[..., :32] * s[i]], -1)
        return float((rot(q, 0) * rot(k, 1)).sum())

    assert abs(transformers_score(2 * 10**9 + 7, 2 * 10**9) - reference) > 1e-2


def test_cos_sin_shapes_attention_factor_and_dtype():
    inv_freq = plain_inv_freq(64)
    cos, sin = rope_cos_sin(inv_freq, torch.arange(10).view(2, 5), attention_factor=1.5, dtype=torch.bfloat16)
    assert cos.shape == sin.shape == (2, 5, 32) and cos.dtype == torch.bfloat16
    angles = torch.arange(10, dtype=torch.float64).view(2, 5, 1) * inv_freq.double()
    assert torch.equal(cos, (angles.cos() * 1.5).to(torch.bfloat16))
    assert torch.equal(sin, (angles.sin() * 1.5).to(torch.bfloat16))


@pytest.mark.parametrize(("positions", "message"), [
    (torch.tensor([-1, 0]), r"\[0, 2\*\*31\)"),
    (torch.tensor([2**31]), r"\[0, 2\*\*31\)"),
    (torch.tensor([-0.5]), r"\[0, 2\*\*31\)"),
    (torch.tensor([0.5, float("nan")]), "finite"),
    (torch.tensor([True]), "integer or float tensor"),
    (torch.tensor([1j]), "integer or float tensor"),
    (torch.zeros(1, 2, 3, dtype=torch.long), r"\(T,\) or \(B, T\)"),
])
def test_bad_positions(positions, message):
    with pytest.raises(ValueError, match=message):
        rope_cos_sin(plain_inv_freq(8), positions)


def test_fractional_positions_are_the_angles_in_float64():
    """Positions between tokens (Leaky ReRoPE's far pairs): cos/sin of position * theta_i in float64."""
    inv_freq = plain_inv_freq(16)
    positions = torch.tensor([[0.25, 7.5, 1e6 + 0.125]], dtype=torch.float64)
    cos, sin = rope_cos_sin(inv_freq, positions)
    angles = positions[..., None] * inv_freq.double()
    torch.testing.assert_close(cos, angles.cos().float(), atol=1e-7, rtol=0)
    torch.testing.assert_close(sin, angles.sin().float(), atol=1e-7, rtol=0)
    whole = rope_cos_sin(inv_freq, torch.tensor([3, 9]))
    assert torch.equal(rope_cos_sin(inv_freq, torch.tensor([3.0, 9.0]))[0], whole[0])


@pytest.mark.parametrize("dtype", [torch.int64, torch.bool, torch.complex64])
def test_cos_sin_tables_must_be_floating(dtype):
    """rope_cos_sin(..., dtype=torch.int64) returned integer tables (all 0 and 1) before."""
    with pytest.raises(ValueError, match="floating dtype"):
        rope_cos_sin(plain_inv_freq(8), torch.arange(4), dtype=dtype)


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"layout": "gptj"}, "layout must be one of"),
    ({"x": torch.randn(2, 3, 8)}, "4-D"),
    ({"cos": torch.randn(4, 3)}, "share a shape"),
    ({"x": torch.randn(1, 2, 5, 8)}, "do not match"),
    ({"x": torch.randn(1, 2, 4, 4)}, "exceeds the head dim"),
    ({"out": torch.empty(1, 2, 4, 8, dtype=torch.float64)}, "out must match"),
])
def test_bad_apply_arguments(kwargs, message):
    args = {"x": torch.randn(1, 2, 4, 8), "cos": torch.randn(4, 3), "sin": torch.randn(4, 3)}
    args["sin"] = args["sin"] if "cos" not in kwargs else torch.randn(4, 2)
    args.update(kwargs)
    x, cos, sin = args.pop("x"), args.pop("cos"), args.pop("sin")
    with pytest.raises(ValueError, match=message):
        apply_rotary(x, cos, sin, **args)


@pytest.mark.parametrize("layout", ["half", "interleaved"])
def test_gradcheck_and_backward_is_inverse_rotation(layout):
    torch.manual_seed(7)
    x = torch.randn(1, 2, 5, 12, dtype=torch.float64, requires_grad=True)
    cos, sin = rope_cos_sin(plain_inv_freq(8), torch.arange(5), dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda t: apply_rotary(t, cos, sin, layout=layout), (x,))
    grad = torch.randn(1, 2, 5, 12, dtype=torch.float64)
    (g,) = torch.autograd.grad(apply_rotary(x, cos, sin, layout=layout), x, grad)
    torch.testing.assert_close(g, apply_rotary(grad, cos, -sin, layout=layout), rtol=0, atol=1e-14)


def test_gradient_flows_to_cos_sin_when_asked():
    x = torch.randn(1, 1, 3, 4, dtype=torch.float64)
    cos, sin = rope_cos_sin(plain_inv_freq(4), torch.arange(3), dtype=torch.float64)
    cos.requires_grad_(True)
    sin.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda c, s: apply_rotary(x, c, s), (cos, sin))


def test_rotary_embedding_module_dynamic_recomputes_from_length():
    hf = {"head_dim": 64, "max_position_embeddings": 4096, "rope_theta": 10000.0,
          "rope_parameters": {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0}}
    module = ropekit.RotaryEmbedding(hf)
    assert "inv_freq" not in module.state_dict()  # non-persistent
    positions = torch.arange(8000)
    cos, sin = module(positions)
    inv_freq, _ = ropekit.compute_inv_freq(hf, seq_len=8000)
    expected_cos, expected_sin = rope_cos_sin(inv_freq, positions)
    assert torch.equal(cos, expected_cos) and torch.equal(sin, expected_sin)
    short_cos, _ = module(torch.arange(100))
    assert torch.equal(short_cos, rope_cos_sin(ropekit.compute_inv_freq(hf)[0], torch.arange(100))[0])
