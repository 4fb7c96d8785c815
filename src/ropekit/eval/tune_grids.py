"""The candidates of ``ropekit tune`` for the grid families (``yarn``, ``self-extend``, ``leaky-rerope``, ``dca``): a
small grid around ``plan_extension``'s parameters, the plan's spec first, the rest in an order drawn from the
seed (``order_candidates``).

The grids take the plan's spec as their first entry and its YaRN factor as the centre of the YaRN factors;
the Self-Extend and Leaky ReRoPE entries use the plan's reach rules at other windows
(``ropekit.convert.plan.least_group`` and ``least_leak``, which the plan itself uses at its window L/2).
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence

from ropekit.convert.plan import least_group, least_leak, plan_extension
from ropekit.eval.longrope_search import default_longrope_spec, round_up
from ropekit.method import parse_method
from ropekit.rope import RopeConfig

FAMILIES = ("yarn", "self-extend", "leaky-rerope", "longrope", "dca")

YARN_SCALES = (1.0, 1.25, 1.5, 2.0)  # factor = the plan's factor x these (rounded up to 3 decimals)
YARN_BETAS = ((32.0, 1.0), (16.0, 1.0), (64.0, 1.0), (32.0, 2.0), (16.0, 2.0))  # (beta_fast, beta_slow); first: default
YARN_ATTENTION = (None, 1.0)  # None: YaRN's 0.1 ln(s) + 1; 1.0: no temperature
WINDOW_FRACTIONS = (1 / 8, 1 / 4, 3 / 8, 1 / 2, 5 / 8, 3 / 4)  # neighbour windows W as fractions of L
LEAK_SCALES = (1.0, 1.25, 1.5, 2.0)
MIN_LEAK = 1.01  # a leak of 1 would be plain rope past the window
DCA_CHUNKS = (1 / 2, 5 / 8, 3 / 4, 7 / 8)  # chunk sizes S as fractions of L
DCA_LOCALS = (1 / 16, 1 / 8, 1 / 4)  # local windows W as fractions of L


def plan_spec(family: str, base: RopeConfig, target_length: int) -> str:
    """The family's default spec: ``plan_extension``'s candidate (for ``longrope``, which the plan has not, the
    plan's YaRN frequencies written as LongRoPE factors: ``default_longrope_spec``)."""
    if family == "longrope":
        return default_longrope_spec(base, target_length)
    for candidate in plan_extension(base, target_length):
        if candidate.family == family:
            return candidate.method
    raise ValueError(f"--family must be one of {', '.join(FAMILIES)}, got {family!r}")


def yarn_spec(factor: float, trained: int, betas: tuple[float, float], attention: float | None) -> str:
    """A YaRN spec; the ramp's betas written only when they are not YaRN's (32, 1), the attention factor only
    when set."""
    spec = f"yarn:factor={factor:g},original_max_position_embeddings={trained}"
    if betas != YARN_BETAS[0]:
        spec += f",beta_fast={betas[0]:g},beta_slow={betas[1]:g}"
    if attention is not None:
        spec += f",attention_factor={attention:g}"
    return spec


def yarn_grid(base: RopeConfig, target_length: int) -> list[str]:
    """YaRN specs around the plan's: its factor x ``YARN_SCALES``, the ramp's (beta_fast, beta_slow) from
    ``YARN_BETAS``, and the attention temperature from ``YARN_ATTENTION``; the plan's spec first."""
    trained = base.original_max_position_embeddings
    first = plan_spec("yarn", base, target_length)
    factor = parse_method(first).rope["factor"]
    out = [first] + [yarn_spec(round_up(factor * scale, 3), trained, betas, attention)
                     for scale in YARN_SCALES for betas in YARN_BETAS for attention in YARN_ATTENTION]
    return list(dict.fromkeys(out))


def self_extend_grid(base: RopeConfig, target_length: int) -> list[str]:
    """Self-Extend specs that reach the target: windows W = L x ``WINDOW_FRACTIONS``, and for each the least
    group G (``least_group``), G + 1 and 2G; the plan's spec first."""
    trained = base.original_max_position_embeddings
    out = [plan_spec("self-extend", base, target_length)]
    for window in sorted({max(1, int(trained * f)) for f in WINDOW_FRACTIONS} - {trained}):
        least = least_group(trained, target_length, window)
        out += [f"self-extend:group={g},window={window}" for g in sorted({least, least + 1, 2 * least})]
    return list(dict.fromkeys(out))


def leaky_rerope_grid(base: RopeConfig, target_length: int) -> list[str]:
    """Leaky ReRoPE specs that reach the target: windows w = L x ``WINDOW_FRACTIONS`` (from L/4), and for each
    the least leak (``least_leak``, rounded up to 0.01 as the plan does) times ``LEAK_SCALES``; the plan's spec
    first."""
    trained = base.original_max_position_embeddings
    out = [plan_spec("leaky-rerope", base, target_length)]
    for window in sorted({max(1, int(trained * f)) for f in WINDOW_FRACTIONS[1:]} - {trained, trained - 1}):
        least = least_leak(trained, target_length, window)
        out += [f"leaky-rerope:window={window},k={round_up(max(least * scale, MIN_LEAK), 2):g}"
                for scale in LEAK_SCALES]
    return list(dict.fromkeys(out))


def dca_grid(base: RopeConfig, target_length: int) -> list[str]:
    """Dual Chunk Attention specs: chunk sizes S = L x ``DCA_CHUNKS`` and local windows W = L x ``DCA_LOCALS``
    (S > W >= 1; every one reaches any length); the plan's spec (3L/4, L/8) first."""
    trained = base.original_max_position_embeddings
    out = [plan_spec("dca", base, target_length)]
    for chunk in sorted({int(trained * f) for f in DCA_CHUNKS}):
        out += [f"dca:chunk={chunk},local={local}" for local in sorted({int(trained * f) for f in DCA_LOCALS})
                if chunk > local >= 1]
    return list(dict.fromkeys(out))


GRIDS: dict[str, Callable[[RopeConfig, int], list[str]]] = {
    "yarn": yarn_grid, "self-extend": self_extend_grid, "leaky-rerope": leaky_rerope_grid, "dca": dca_grid}


def order_candidates(grid: Sequence[str], budget: int, seed: int) -> list[str]:
    """The grid's first entry (the plan's spec), then the others in an order drawn from ``seed``, cut to
    ``budget`` specs. The same grid, budget and seed give the same list."""
    rest = list(grid[1:])
    random.Random(f"tune-order:{seed}").shuffle(rest)
    return [grid[0], *rest][:budget]
