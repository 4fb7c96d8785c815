"""The rope table: rows gathered by position equal cos/sin computed directly and the complex-RoPE oracle;
it grows geometrically, only on demand, and is rebuilt when the frequencies change."""

from __future__ import annotations

import pytest
import torch

from ropekit.rope import RopeConfig, RotaryEmbedding, rope_cos_sin
from ropekit.rope.module import MIN_TABLE_ROWS

BASE = RopeConfig(head_dim=32, rope_theta=10000.0, max_position_embeddings=64)
FIXED = ["default", "linear:factor=4", "ntk:factor=4", "yarn:factor=4",
         "llama3:factor=8,low_freq_factor=1,high_freq_factor=4,original_max_position_embeddings=16"]


def complex_oracle(inv_freq: torch.Tensor, positions: torch.Tensor, factor: float) -> tuple[torch.Tensor, ...]:
    """cos/sin from Meta's complex formulation: polar(factor, p * theta) in float64, cast to float32 once."""
    angles = positions.to(torch.float64)[..., None] * inv_freq.to(torch.float64)
    rotation = torch.polar(torch.full_like(angles, factor), angles)
    return rotation.real.float(), rotation.imag.float()


@pytest.mark.parametrize("spec", FIXED)
@pytest.mark.parametrize("shape", [(37,), (3, 11)])
def test_gathered_rows_equal_direct_computation_and_complex_rope(spec, shape):
    rope = RotaryEmbedding(BASE.with_rope_type(spec))
    positions = torch.randint(0, 5000, shape)
    cos, sin = rope(positions, position_end=5000)
    assert rope._tables, "a bound was given: the rows must come from the table"
    want_cos, want_sin = rope_cos_sin(rope.inv_freq, positions, rope.attention_factor)
    # the same float64 maths on the same values: equal bit for bit
    torch.testing.assert_close(cos, want_cos, rtol=0, atol=0)
    torch.testing.assert_close(sin, want_sin, rtol=0, atol=0)
    oracle_cos, oracle_sin = complex_oracle(rope.inv_freq, positions, rope.attention_factor)
    # float32 rounding of each side: one unit in the last place of values up to ~1.2 (YaRN's mscale)
    torch.testing.assert_close(cos, oracle_cos, rtol=0, atol=2.5e-7)
    torch.testing.assert_close(sin, oracle_sin, rtol=0, atol=2.5e-7)


def test_table_in_another_dtype_is_that_of_the_direct_computation():
    rope = RotaryEmbedding(BASE.with_rope_type("yarn:factor=2"))
    positions = torch.arange(40).view(2, 20)
    cos, sin = rope(positions, position_end=40, dtype=torch.bfloat16)
    want = rope_cos_sin(rope.inv_freq, positions, rope.attention_factor, torch.bfloat16)
    assert cos.dtype == torch.bfloat16
    torch.testing.assert_close((cos, sin), want, rtol=0, atol=0)


def test_table_grows_geometrically_and_only_on_demand():
    rope = RotaryEmbedding(BASE)
    assert rope._tables == {}  # nothing allocated up front
    first = rope.table(10)
    assert first[0].shape == (MIN_TABLE_ROWS, 16)
    assert rope.table(MIN_TABLE_ROWS)[0] is first[0]  # long enough: reused, not rebuilt
    assert rope.table(MIN_TABLE_ROWS + 1)[0].shape[0] == 2 * MIN_TABLE_ROWS  # doubled
    assert rope.table(5 * MIN_TABLE_ROWS)[0].shape[0] == 5 * MIN_TABLE_ROWS  # a long jump: what was asked for
    cos, sin = rope.table(5 * MIN_TABLE_ROWS)
    want = rope_cos_sin(rope.inv_freq, torch.arange(5 * MIN_TABLE_ROWS))
    torch.testing.assert_close((cos, sin), want, rtol=0, atol=0)


def test_table_follows_a_change_of_the_frequencies():
    """An in-place change of inv_freq or another config on the module must not serve stale rows."""
    rope = RotaryEmbedding(BASE)
    positions = torch.arange(20)
    rope(positions, position_end=20)
    with torch.no_grad():
        rope.inv_freq.mul_(0.5)
    cos, _ = rope(positions, position_end=20)
    torch.testing.assert_close(cos, rope_cos_sin(rope.inv_freq, positions)[0], rtol=0, atol=0)
    other = RotaryEmbedding(BASE.with_rope_type("linear:factor=2"))
    rope.config, rope.inv_freq, rope.attention_factor = other.config, other.inv_freq, other.attention_factor
    cos, _ = rope(positions, position_end=20)
    torch.testing.assert_close(cos, rope_cos_sin(other.inv_freq, positions)[0], rtol=0, atol=0)


def test_moving_the_module_drops_its_tables():
    rope = RotaryEmbedding(BASE)
    rope.table(10)
    rope.to(torch.float64)
    assert rope._tables == {}


def test_positions_past_the_bound_are_refused():
    rope = RotaryEmbedding(BASE)
    with pytest.raises(ValueError, match=r"positions must lie in \[0, 8\)"):
        rope(torch.tensor([3, 8]), position_end=8)


def test_fractional_positions_and_no_bound_are_computed_directly():
    rope = RotaryEmbedding(BASE)
    for positions, bound in ((torch.tensor([0.5, 3.25], dtype=torch.float64), 4), (torch.arange(6), None)):
        cos, sin = rope(positions, position_end=bound)
        torch.testing.assert_close((cos, sin), rope_cos_sin(rope.inv_freq, positions), rtol=0, atol=0)
    assert rope._tables == {}


def test_length_dependent_types_have_no_single_table():
    rope = RotaryEmbedding(BASE.with_rope_type("dynamic:factor=2"))
    with pytest.raises(ValueError, match="depends on the current length"):
        rope.table(10)
    positions = torch.arange(100)
    cos, _ = rope(positions, position_end=1000)  # the bound does not change the current length: 100
    inv_freq, factor = BASE.with_rope_type("dynamic:factor=2").frequencies(100)
    torch.testing.assert_close(cos, rope_cos_sin(inv_freq, positions, factor)[0], rtol=0, atol=0)
