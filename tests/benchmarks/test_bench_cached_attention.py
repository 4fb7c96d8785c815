"""benchmarks/bench_cached_attention.py's pair count and shape parsing (no timing here)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from ropekit.attention.base import causal_by_slot

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
from bench_cached_attention import causal_pairs, parse_shapes  # noqa: E402  (a script folder, not a package)


@pytest.mark.parametrize("T,S", [(2, 3), (5, 12), (64, 64), (100, 1000)])
def test_causal_pairs_counts_the_allowed_cells_of_the_causal_mask(T, S):
    assert causal_pairs(T, S) == int(causal_by_slot(T, S).sum())


def test_shapes_parse_and_bad_ones_are_refused():
    assert parse_shapes("2048x8192,5X9") == [(2048, 8192), (5, 9)]
    for bad in ("8x8", "1x9", "9x4", "ax9", "9"):
        with pytest.raises(SystemExit, match="--shapes"):
            parse_shapes(bad)
