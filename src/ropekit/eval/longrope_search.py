"""LongRoPE's evolutionary search over per-pair rescale factors (Ding et al. 2024, arXiv 2402.13753, Sec. 3.2
and Algorithm 1), as pure functions plus one loop that takes the measurement as a callback.

For a model trained on L tokens and a target of N tokens (s = N / L): a population started from PI-, NTK- and
YaRN-shaped factor curves (``initial_curves``), the best as parents, children by crossover and mutation, every
factor vector kept non-decreasing across pairs (low-frequency pairs stretched at least as much as
high-frequency ones) and inside ``factor_bounds`` (``next_generation``). Each candidate is a spec
``longrope:short_factor=[1,...],long_factor=[...],original_max_position_embeddings=L,factor=s``
(``longrope_spec``): the model's own rope up to L tokens, the searched factors past it.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Sequence
from typing import Any

from ropekit.convert.plan import plan_extension
from ropekit.method import parse_method
from ropekit.rope import RopeConfig

# population, parents, mutation and crossover as in LongRoPE's Algorithm 1; the numbers are ropekit's, small
# enough for a CPU budget of tens of evaluations
POPULATION = 8
PARENTS = 4
MUTATION_RATE = 0.25  # chance per pair that a child's factor is perturbed
MUTATION_SIGMA = 0.1  # log-normal step of a perturbation: factor * exp(N(0, sigma^2))
CROSSOVER_RATE = 0.5  # chance that a child mixes two parents (else it mutates one)
FACTOR_STEP = 0.01  # factors are kept on a 0.01 grid (LongRoPE searches with the same step)
MAX_SCALE = 2.0  # factors lie in [1, MAX_SCALE * s]: never a pair turned faster than trained, at most 2s slower
MAX_RETRIES = 20  # a child equal to a vector already seen is mutated again at most this many times


def round_up(x: float, digits: int) -> float:
    """``x`` rounded up to ``digits`` decimals (a factor rounded up still reaches its length)."""
    scale = 10**digits
    return math.ceil(x * scale - 1e-9) / scale


def factor_bounds(base: RopeConfig, target_length: int) -> tuple[float, float]:
    """[1, ``MAX_SCALE`` x s]: the range of every searched factor."""
    return 1.0, round_up(MAX_SCALE * target_length / base.original_max_position_embeddings, 2)


def project_monotone(values: Sequence[float]) -> list[float]:
    """The non-decreasing sequence closest to ``values`` in squared distance (isotonic regression by pool
    adjacent violators: neighbours out of order are replaced by their mean until none is)."""
    blocks: list[list[float]] = []  # [sum, count]
    for v in values:
        blocks.append([float(v), 1])
        while len(blocks) > 1 and blocks[-2][0] / blocks[-2][1] > blocks[-1][0] / blocks[-1][1]:
            total, count = blocks.pop()
            blocks[-1][0] += total
            blocks[-1][1] += count
    return [total / count for total, count in blocks for _ in range(int(count))]


def project_factors(values: Sequence[float], low: float, high: float, step: float = FACTOR_STEP) -> tuple[float, ...]:
    """``values`` made a valid factor vector: non-decreasing (``project_monotone``), on the ``step`` grid, inside
    [low, high]. Each of the three steps keeps the order of the one before."""
    return tuple(min(high, max(low, round(round(v / step) * step, 10))) for v in project_monotone(values))


def pi_curve(pairs: int, scale: float) -> list[float]:
    """Position interpolation: every pair stretched by s."""
    return [float(scale)] * pairs


def ntk_curve(pairs: int, scale: float) -> list[float]:
    """NTK-aware scaling as per-pair factors: base b s^(d/(d-2)) stretches pair i by s^(2i/(d-2)) = s^(i/(P-1))
    for P = d/2 pairs (pair 0 untouched, the last one by s)."""
    if pairs == 1:
        return [float(scale)]
    return [float(scale) ** (i / (pairs - 1)) for i in range(pairs)]


def plan_yarn_spec(base: RopeConfig, target_length: int) -> str:
    """``plan_extension``'s YaRN spec for the target length."""
    return next(c.method for c in plan_extension(base, target_length) if c.family == "yarn")


def yarn_curve(base: RopeConfig, target_length: int) -> list[float]:
    """The plan's YaRN frequencies as per-pair factors: the model's own inverse frequency over YaRN's."""
    own, _ = base.frequencies()
    yarn, _ = parse_method(plan_yarn_spec(base, target_length)).rope_config(base).frequencies()
    return (own.double() / yarn.double()).tolist()


def initial_curves(base: RopeConfig, target_length: int) -> dict[str, tuple[float, ...]]:
    """The seeds of the first population, each projected onto the factor rules: YaRN (the plan's, the
    family's default), PI (s), NTK (s) and NTK at twice the factor (nominal NTK under-reaches)."""
    pairs, s = base.rotary_dim // 2, target_length / base.original_max_position_embeddings
    low, high = factor_bounds(base, target_length)
    curves = {"yarn": yarn_curve(base, target_length), "pi": pi_curve(pairs, s), "ntk": ntk_curve(pairs, s),
              "ntk-2x": ntk_curve(pairs, 2 * s)}
    return {name: project_factors(c, low, high) for name, c in curves.items()}


def mutate(factors: Sequence[float], rng: random.Random, low: float, high: float, *, rate: float = MUTATION_RATE,
           sigma: float = MUTATION_SIGMA) -> tuple[float, ...]:
    """Each factor, with probability ``rate``, times exp(N(0, sigma^2)); at least one is changed; then projected
    (``project_factors``)."""
    out = list(factors)
    chosen = [i for i in range(len(out)) if rng.random() < rate] or [rng.randrange(len(out))]
    for i in chosen:
        out[i] *= math.exp(rng.gauss(0.0, sigma))
    return project_factors(out, low, high)


def crossover(a: Sequence[float], b: Sequence[float], rng: random.Random, low: float,
              high: float) -> tuple[float, ...]:
    """One cut point c drawn in [1, P): the first c factors of ``a``, the rest of ``b``; then projected."""
    cut = rng.randrange(1, len(a)) if len(a) > 1 else 0
    return project_factors([*a[:cut], *b[cut:]], low, high)


def breed(parents: Sequence[tuple[float, ...]], rng: random.Random, low: float, high: float) -> tuple[float, ...]:
    """One child: a crossover of two parents with a mutation on top (chance ``CROSSOVER_RATE``, when there
    are two), else a mutation of one."""
    if len(parents) > 1 and rng.random() < CROSSOVER_RATE:
        a, b = rng.sample(parents, 2)
        return mutate(crossover(a, b, rng, low, high), rng, low, high)
    return mutate(rng.choice(parents), rng, low, high)


def make_new(child: tuple[float, ...], taken: set[tuple[float, ...]], rng: random.Random, low: float,
             high: float) -> tuple[float, ...] | None:
    """``child``, or while it equals a vector in ``taken`` a mutation of it with twice the step each time (up
    to ``MAX_RETRIES`` times); None when it is still taken."""
    sigma = MUTATION_SIGMA
    for _ in range(MAX_RETRIES):
        if child not in taken:
            break
        sigma *= 2
        child = mutate(child, rng, low, high, sigma=sigma)
    return None if child in taken else child


def next_generation(scored: Sequence[tuple[Sequence[float], Any]], size: int, rng: random.Random, low: float,
                    high: float, seen: set[tuple[float, ...]] | None = None) -> list[tuple[float, ...]]:
    """Up to ``size`` new factor vectors from the ``scored`` ones (``(factors, key)``, lower key better, ties
    to the earlier): the ``PARENTS`` best are the parents, each child from ``breed``; a child equal to a vector
    in ``seen``, a scored one or an earlier child is made new by ``make_new`` or dropped. Every child is
    non-decreasing, on the ``FACTOR_STEP`` grid and inside [low, high]; the same inputs and ``rng`` state give
    the same children."""
    if not scored or size < 1:
        return []
    order = sorted(range(len(scored)), key=lambda i: (scored[i][1], i))
    parents = [tuple(scored[i][0]) for i in order[:PARENTS]]
    taken = set(seen or ()) | {tuple(f) for f, _ in scored}
    children: list[tuple[float, ...]] = []
    for _ in range(size):
        child = make_new(breed(parents, rng, low, high), taken, rng, low, high)
        if child is not None:
            taken.add(child)
            children.append(child)
    return children


def first_population(base: RopeConfig, target_length: int, size: int, rng: random.Random) -> list[tuple[float, ...]]:
    """Generation 0: the ``initial_curves`` (YaRN first), then mutations of them until there are ``size``
    distinct vectors."""
    low, high = factor_bounds(base, target_length)
    seeds = list(dict.fromkeys(initial_curves(base, target_length).values()))
    out = seeds[:size]
    for _ in range(50 * size):
        if len(out) >= size:
            break
        child = mutate(rng.choice(seeds), rng, low, high)
        if child not in out:
            out.append(child)
    return out


def evolve(base: RopeConfig, target_length: int, budget: int, seed: int,
           score: Callable[[tuple[float, ...]], Any]) -> list[tuple[tuple[float, ...], Any]]:
    """The search: ``budget`` factor vectors at most, each scored once by ``score`` (lower is better), in
    generations of ``POPULATION`` (the last one cut to the budget left); generation g draws from
    ``random.Random(f"longrope:{seed}:{g}")``. Returns ``(factors, score)`` in evaluation order."""
    low, high = factor_bounds(base, target_length)
    scored: list[tuple[tuple[float, ...], Any]] = []
    population = first_population(base, target_length, min(POPULATION, budget), random.Random(f"longrope:{seed}:0"))
    generation = 0
    while population:
        scored += [(factors, score(factors)) for factors in population]
        left = budget - len(scored)
        if left <= 0:
            break
        generation += 1
        population = next_generation(scored, min(POPULATION, left), random.Random(f"longrope:{seed}:{generation}"),
                                     low, high)
    return scored


def format_factor(x: float) -> str:
    """A factor as the spec writes it: at most two decimals, no trailing zeros."""
    return f"{x:.2f}".rstrip("0").rstrip(".")


def longrope_spec(factors: Sequence[float], base: RopeConfig, target_length: int) -> str:
    """The LongRoPE spec of a factor vector: short factors 1 (the model's own rope up to L tokens), the long
    factors past L, the scale s = N / L (rounded up, as the plan does) for the attention factor
    sqrt(1 + ln s / ln L)."""
    trained = base.original_max_position_embeddings
    ones = ",".join(["1"] * len(factors))
    return (f"longrope:short_factor=[{ones}],long_factor=[{','.join(format_factor(f) for f in factors)}],"
            f"original_max_position_embeddings={trained},factor={round_up(target_length / trained, 3):g}")


def default_longrope_spec(base: RopeConfig, target_length: int) -> str:
    """The family's default: the plan's YaRN frequencies written as LongRoPE factors (the first seed)."""
    return longrope_spec(project_factors(yarn_curve(base, target_length), *factor_bounds(base, target_length)),
                         base, target_length)


def long_factors(spec: str) -> tuple[float, ...]:
    """The long factors of a ``longrope`` spec."""
    return tuple(float(x) for x in parse_method(spec).rope["long_factor"])
