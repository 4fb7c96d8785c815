"""``ropekit tune``: search one method family's parameters for a target length, then check the winner on
data the search never saw.

For a model trained on L tokens and a target of N tokens (s = N / L):

- **Data.** The text's tokens are cut in half: the *calibration* window is its first N tokens, the
  *held-out* window the N tokens from the middle on (``split_windows``); the passkey set of the
  held-out check has its own keys (seed + ``HELD_OUT_SEED_OFFSET``). The search sees calibration data
  only; the winner and the family's default are then measured on the held-out data.
- **Objective.** ``ppl``: perplexity of the tokens past L in the window (lower is better); ``passkey``:
  accuracy over a small seeded passkey set at length N (higher is better); ``both``: passkey accuracy
  first, perplexity beyond L breaking ties (``rank_key``).
- **Search.** ``yarn``, ``self-extend``, ``leaky-rerope``: a small grid around ``plan_extension``'s
  parameters (``yarn_grid``, ``self_extend_grid``, ``leaky_rerope_grid``), the plan's spec first, the rest
  in an order drawn from the seed, cut to the budget (``order_candidates``). ``longrope``: an evolutionary
  search over per-pair rescale factors (LongRoPE, Ding et al. 2024, arXiv 2402.13753, Sec. 3.2 and
  Algorithm 1): a population started from PI-, NTK- and YaRN-shaped factor curves (``initial_curves``),
  the best as parents, children by crossover and mutation, every factor vector kept non-decreasing
  across pairs (low-frequency pairs stretched at least as much as high-frequency ones) and inside
  ``factor_bounds`` (``next_generation``). Each candidate is a spec
  ``longrope:short_factor=[1,...],long_factor=[...],original_max_position_embeddings=L,factor=s``: the
  model's own rope up to L tokens, the searched factors past it.
- **Records.** Every measurement is a ``ResultStore`` record (task ``tune``: spec, length, split, text
  hash or passkey set, model identity), so a rerun of the same command measures nothing twice.

The pure functions (grids, curves, projection, the evolutionary step) take no model; ``Tuner`` runs them
on a runner of ``ropekit.eval.runners``.
"""

from __future__ import annotations

import dataclasses
import math
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from ropekit.convert.plan import plan_extension
from ropekit.eval.passkey import evaluate_passkey, passkey_prompt
from ropekit.eval.perplexity import evaluate_perplexity
from ropekit.eval.results import ResultStore
from ropekit.eval.stats import wilson_interval
from ropekit.extension import parse_extension
from ropekit.memory import check_fits, request_bytes
from ropekit.model.generate import MAX_POSITIONS
from ropekit.progress import Progress
from ropekit.rope import RopeConfig

FAMILIES = ("yarn", "self-extend", "leaky-rerope", "longrope")
OBJECTIVES = ("ppl", "passkey", "both")
MAX_BUDGET = 10_000
MAX_SEED = 2**32
HELD_OUT_SEED_OFFSET = 2**32  # held-out passkey keys come from seed + this: no searched seed (< 2**32) reaches it
PASSKEY_DEPTHS = (0.1, 0.5, 0.9)
PASSKEY_TRIALS = 2
MAX_PASSKEY_TRIALS = 100

# LongRoPE's evolutionary search (population, parents, mutation and crossover as in its Algorithm 1;
# the numbers are ropekit's, small enough for a CPU budget of tens of evaluations)
POPULATION = 8
PARENTS = 4
MUTATION_RATE = 0.25  # chance per pair that a child's factor is perturbed
MUTATION_SIGMA = 0.1  # log-normal step of a perturbation: factor * exp(N(0, sigma^2))
CROSSOVER_RATE = 0.5  # chance that a child mixes two parents (else it mutates one)
FACTOR_STEP = 0.01  # factors are kept on a 0.01 grid (LongRoPE searches with the same step)
MAX_SCALE = 2.0  # factors lie in [1, MAX_SCALE * s]: never a pair turned faster than trained, at most 2s slower


@dataclass(frozen=True)
class TuneSettings:
    """What a tune run searches and how it scores: the family, target length N, objective, number of
    calibration evaluations, seed, and the passkey set (depths x trials at length N)."""

    family: str
    target_length: int
    objective: str = "ppl"
    budget: int = 12
    seed: int = 0
    depths: tuple[float, ...] = PASSKEY_DEPTHS
    trials: int = PASSKEY_TRIALS

    @property
    def uses_ppl(self) -> bool:
        return self.objective in ("ppl", "both")

    @property
    def uses_passkey(self) -> bool:
        return self.objective in ("passkey", "both")


def check_settings(settings: TuneSettings, trained: int | None = None) -> TuneSettings:
    """Every setting in range (ValueError naming the flag); ``trained``: the model's trained length, which the
    target must exceed."""
    if settings.family not in FAMILIES:
        raise ValueError(f"--family must be one of {', '.join(FAMILIES)}, got {settings.family!r}")
    if settings.objective not in OBJECTIVES:
        raise ValueError(f"--objective must be one of {', '.join(OBJECTIVES)}, got {settings.objective!r}")
    if not 1 <= settings.budget <= MAX_BUDGET:
        raise ValueError(f"--budget-evals must be in [1, {MAX_BUDGET}], got {settings.budget}")
    if not 0 <= settings.seed < MAX_SEED:
        raise ValueError(f"--seed must be in [0, 2**32), got {settings.seed}")
    if not 2 <= settings.target_length < MAX_POSITIONS:
        raise ValueError(f"--target-length must be in [2, 2**31), got {settings.target_length}")
    if trained is not None and settings.target_length <= trained:
        raise ValueError(f"--target-length must be above the trained length {trained} (tuning extends the "
                         f"context past it), got {settings.target_length}")
    if not settings.depths or any(not 0.0 <= d <= 1.0 for d in settings.depths):
        raise ValueError(f"--passkey-depths must be numbers in [0, 1], got {list(settings.depths)}")
    if not 1 <= settings.trials <= MAX_PASSKEY_TRIALS:
        raise ValueError(f"--passkey-trials must be in [1, {MAX_PASSKEY_TRIALS}], got {settings.trials}")
    return settings


# ---- data -------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Windows:
    """Token ranges ``[start, end)`` of the text: the calibration window (first half) and the held-out one
    (second half), disjoint."""

    calibration: tuple[int, int]
    held_out: tuple[int, int]


def split_windows(num_tokens: int, length: int) -> Windows:
    """Calibration = tokens ``[0, N)``; held-out = ``[h, h + N)`` with h = num_tokens // 2, the middle of the
    text. ValueError when the text has fewer than 2N tokens (either window would cross the middle)."""
    middle = num_tokens // 2
    if length > middle:
        raise ValueError(f"the text has {num_tokens} tokens; tuning at {length} needs {2 * length} (a calibration "
                         "window in its first half and a held-out window in its second)")
    return Windows((0, length), (middle, middle + length))


# ---- candidate grids (yarn, self-extend, leaky-rerope) ------------------------------------------------------------


def _up(x: float, digits: int) -> float:
    """``x`` rounded up to ``digits`` decimals (a factor rounded up still reaches its length)."""
    scale = 10**digits
    return math.ceil(x * scale - 1e-9) / scale


def plan_spec(family: str, base: RopeConfig, target_length: int) -> str:
    """The family's default spec: ``plan_extension``'s candidate (for ``longrope``, which the plan has not, the
    plan's YaRN frequencies written as LongRoPE factors: ``yarn_curve``)."""
    if family == "longrope":
        return longrope_spec(project_factors(yarn_curve(base, target_length), *factor_bounds(base, target_length)),
                             base, target_length)
    for candidate in plan_extension(base, target_length):
        if candidate.family == family:
            return candidate.spec
    raise ValueError(f"--family must be one of {', '.join(FAMILIES)}, got {family!r}")


YARN_SCALES = (1.0, 1.25, 1.5, 2.0)  # factor = s x these (rounded up to 3 decimals)
YARN_BETAS = ((32.0, 1.0), (16.0, 1.0), (64.0, 1.0), (32.0, 2.0), (16.0, 2.0))  # (beta_fast, beta_slow); first: default
YARN_ATTENTION = (None, 1.0)  # None: YaRN's 0.1 ln(s) + 1; 1.0: no temperature


def yarn_grid(base: RopeConfig, target_length: int) -> list[str]:
    """YaRN specs around the plan's: factor s x ``YARN_SCALES``, the ramp's (beta_fast, beta_slow) from
    ``YARN_BETAS``, and the attention temperature from ``YARN_ATTENTION``; the plan's spec first."""
    trained = base.original_max_position_embeddings
    s = target_length / trained
    out = [plan_spec("yarn", base, target_length)]
    for scale in YARN_SCALES:
        for beta_fast, beta_slow in YARN_BETAS:
            for attention in YARN_ATTENTION:
                spec = f"yarn:factor={_up(s * scale, 3):g},original_max_position_embeddings={trained}"
                if (beta_fast, beta_slow) != YARN_BETAS[0]:
                    spec += f",beta_fast={beta_fast:g},beta_slow={beta_slow:g}"
                if attention is not None:
                    spec += f",attention_factor={attention:g}"
                out.append(spec)
    return list(dict.fromkeys(out))


WINDOW_FRACTIONS = (1 / 8, 1 / 4, 3 / 8, 1 / 2, 5 / 8, 3 / 4)  # neighbour windows W as fractions of L


def self_extend_grid(base: RopeConfig, target_length: int) -> list[str]:
    """Self-Extend specs that reach the target: windows W = L x ``WINDOW_FRACTIONS``, and for each the smallest
    group G with reach (L - W) * G + W >= N, G + 1 and 2G; the plan's spec first."""
    trained = base.original_max_position_embeddings
    out = [plan_spec("self-extend", base, target_length)]
    for window in sorted({max(1, int(trained * f)) for f in WINDOW_FRACTIONS} - {trained}):
        least = max(1, math.ceil((target_length - window) / (trained - window)))
        out += [f"self-extend:group={g},window={window}" for g in sorted({least, least + 1, 2 * least})]
    return list(dict.fromkeys(out))


LEAK_SCALES = (1.0, 1.25, 1.5, 2.0)


def leaky_rerope_grid(base: RopeConfig, target_length: int) -> list[str]:
    """Leaky ReRoPE specs that reach the target: windows w = L x ``WINDOW_FRACTIONS`` (from L/4), and for each
    the least leak k mapping distance N to L - 1, k = (N - w) / (L - 1 - w) (rounded up to 0.01, as the plan
    does), times ``LEAK_SCALES``; the plan's spec first."""
    trained = base.original_max_position_embeddings
    out = [plan_spec("leaky-rerope", base, target_length)]
    for window in sorted({max(1, int(trained * f)) for f in WINDOW_FRACTIONS[1:]} - {trained, trained - 1}):
        least = (target_length - window) / (trained - 1 - window)
        out += [f"leaky-rerope:window={window},k={_up(max(least * scale, 1.01), 2):g}" for scale in LEAK_SCALES]
    return list(dict.fromkeys(out))


GRIDS: dict[str, Callable[[RopeConfig, int], list[str]]] = {
    "yarn": yarn_grid, "self-extend": self_extend_grid, "leaky-rerope": leaky_rerope_grid}


def order_candidates(grid: Sequence[str], budget: int, seed: int) -> list[str]:
    """The grid's first entry (the plan's spec), then the others in an order drawn from ``seed``, cut to
    ``budget`` specs. The same grid, budget and seed give the same list."""
    rest = list(grid[1:])
    random.Random(f"tune-order:{seed}").shuffle(rest)
    return [grid[0], *rest][:budget]


# ---- LongRoPE factor curves and the evolutionary step -------------------------------------------------------------


def factor_bounds(base: RopeConfig, target_length: int) -> tuple[float, float]:
    """[1, ``MAX_SCALE`` x s]: the range of every searched factor."""
    return 1.0, _up(MAX_SCALE * target_length / base.original_max_position_embeddings, 2)


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


def yarn_curve(base: RopeConfig, target_length: int) -> list[float]:
    """The plan's YaRN frequencies as per-pair factors: the model's own inverse frequency over YaRN's."""
    own, _ = base.frequencies()
    yarn, _ = parse_extension(plan_spec("yarn", base, target_length)).rope_config(base).frequencies()
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


def next_generation(scored: Sequence[tuple[Sequence[float], Any]], size: int, rng: random.Random, low: float,
                    high: float, seen: set[tuple[float, ...]] | None = None) -> list[tuple[float, ...]]:
    """Up to ``size`` new factor vectors from the ``scored`` ones (``(factors, key)``, lower key better, ties
    to the earlier): the ``PARENTS`` best are the parents; each child is a crossover of two of them (chance
    ``CROSSOVER_RATE``, with a mutation on top) or a mutation of one. A child equal to a vector in ``seen``
    or to an earlier child is mutated again, with twice the step each time, up to 20 times, else dropped.
    Every child is non-decreasing, on the ``FACTOR_STEP`` grid and inside [low, high]; the same inputs and
    ``rng`` state give the same children."""
    if not scored or size < 1:
        return []
    order = sorted(range(len(scored)), key=lambda i: (scored[i][1], i))
    parents = [tuple(scored[i][0]) for i in order[:PARENTS]]
    taken = set(seen or ()) | {tuple(f) for f, _ in scored}
    children: list[tuple[float, ...]] = []
    for _ in range(size):
        if len(parents) > 1 and rng.random() < CROSSOVER_RATE:
            a, b = rng.sample(parents, 2)
            child = mutate(crossover(a, b, rng, low, high), rng, low, high)
        else:
            child = mutate(rng.choice(parents), rng, low, high)
        sigma = MUTATION_SIGMA
        for _ in range(20):
            if child not in taken:
                break
            sigma *= 2
            child = mutate(child, rng, low, high, sigma=sigma)
        if child in taken:
            continue
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


def _number(x: float) -> str:
    return f"{x:.2f}".rstrip("0").rstrip(".")


def longrope_spec(factors: Sequence[float], base: RopeConfig, target_length: int) -> str:
    """The LongRoPE spec of a factor vector: short factors 1 (the model's own rope up to L tokens), the long
    factors past L, the scale s = N / L (rounded up, as the plan does) for the attention factor
    sqrt(1 + ln s / ln L)."""
    trained = base.original_max_position_embeddings
    ones = ",".join(["1"] * len(factors))
    return (f"longrope:short_factor=[{ones}],long_factor=[{','.join(_number(f) for f in factors)}],"
            f"original_max_position_embeddings={trained},factor={_up(target_length / trained, 3):g}")


def long_factors(spec: str) -> tuple[float, ...]:
    """The long factors of a ``longrope`` spec."""
    return tuple(float(x) for x in parse_extension(spec).rope["long_factor"])


def short_spec(spec: str, width: int = 60) -> str:
    """A spec for a log line: LongRoPE's factor lists summarised."""
    if not spec.startswith("longrope:") or len(spec) <= width:
        return spec
    f = long_factors(spec)
    return f"longrope: long_factor [{_number(f[0])} .. {_number(f[len(f) // 2])} .. {_number(f[-1])}] ({len(f)} pairs)"


def deploy_base(family: str, base: RopeConfig, target_length: int) -> RopeConfig:
    """The model's rope as the runtimes' settings should see it for a tuned spec: for ``longrope``, with
    ``max_position_embeddings`` = N (a LongRoPE config names its extended context there, as Phi-3's 131072
    over an original 4096; the runtimes take it as the context to run at); ``base`` itself otherwise."""
    if family != "longrope":
        return base
    return dataclasses.replace(base, max_position_embeddings=int(target_length))


# ---- ranking -----------------------------------------------------------------------------------------------------


def rank_key(objective: str, metrics: dict) -> tuple:
    """Sort key of a measured candidate, lower is better: ppl -> (ppl beyond L,); passkey -> (-accuracy,);
    both -> (-accuracy, ppl beyond L). A missing or non-finite perplexity counts as +inf."""
    ppl = metrics.get("ppl_beyond")
    ppl = ppl if isinstance(ppl, (int, float)) and math.isfinite(ppl) else math.inf
    if objective == "ppl":
        return (ppl,)
    if objective == "passkey":
        return (-metrics["accuracy"],)
    return (-metrics["accuracy"], ppl)


# ---- the loop ----------------------------------------------------------------------------------------------------


@dataclass
class TuneResult:
    """What a run found: ``candidates`` (spec, calibration metrics) best first; the best and the default with
    their calibration and held-out metrics; the windows; evaluations run now and reused from the store."""

    settings: TuneSettings
    trained_length: int
    windows: Windows
    candidates: list[dict]
    best: dict
    default: dict
    run: int = 0
    reused: int = 0
    notes: list[str] = field(default_factory=list)

    def as_dict(self) -> dict:
        s = self.settings
        return {"family": s.family, "objective": s.objective, "target_length": s.target_length,
                "trained_length": self.trained_length, "budget_evals": s.budget, "seed": s.seed,
                "calibration": {"tokens": list(self.windows.calibration), "passkey_seed": s.seed},
                "held_out": {"tokens": list(self.windows.held_out), "passkey_seed": s.seed + HELD_OUT_SEED_OFFSET},
                "passkey_set": {"depths": list(s.depths), "trials": s.trials} if s.uses_passkey else None,
                "candidates": self.candidates, "best": self.best, "default": self.default,
                "evaluations": {"run": self.run, "reused": self.reused}}


SUMMARY_KEYS = ("ppl", "ppl_in_window", "ppl_beyond", "accuracy", "correct", "prompts", "accuracy_ci95", "seconds")


class Tuner:
    """Measures candidate specs on one runner, every measurement stored in (and resumed from) ``store``.

    ``tokens``: the whole text (long ``[N_text]``); ``text_sha256`` identifies it in the records;
    ``identity``: the runner's (model file hash, dtype, device, backend), as ``Sweeper`` keys its cells.
    """

    def __init__(self, runner, tokens: torch.Tensor, store: ResultStore, settings: TuneSettings, *,
                 model_name: str, text_sha256: str, show_progress: bool = True,
                 log: Callable[[str], None] = print):
        self.runner, self.tokens, self.store = runner, tokens, store
        self.settings = check_settings(settings, runner.trained_length)
        self.model_name, self.text_sha256 = model_name, text_sha256
        self.show_progress, self.log = show_progress, log
        self.trained = runner.trained_length
        self.base: RopeConfig = runner.base_rope
        self.windows = split_windows(int(tokens.shape[0]), settings.target_length)
        self.run = self.reused = 0
        self._check_fits()

    def _check_fits(self) -> None:
        n, cache = self.settings.target_length, self.settings.uses_passkey
        check_fits(f"--target-length {n}: one pass over {n} tokens{' with its KV cache' if cache else ''}",
                   request_bytes(self.runner.config, n, self.runner.dtype, cache=cache))
        if self.settings.uses_passkey:
            passkey_prompt(self.runner.tokenizer, n, 0.5, 10000)  # ValueError when N cannot hold a passkey prompt

    # -- one measurement, stored ----------------------------------------------------------------------------------

    def _cell(self, measure: str, spec: str, split: str) -> dict:
        cell = {"task": "tune", "model": self.model_name, **self.runner.identity, "measure": measure,
                "method": spec, "length": self.settings.target_length, "split": split}
        if measure == "ppl":
            start = (self.windows.calibration if split == "calibration" else self.windows.held_out)[0]
            return {**cell, "text_sha256": self.text_sha256, "window_start": start}
        seed = self.settings.seed + (HELD_OUT_SEED_OFFSET if split == "held-out" else 0)
        return {**cell, "depths": list(self.settings.depths), "trials": self.settings.trials, "seed": seed, "keys": 1}

    def _stored(self, cell: dict, compute: Callable[[], dict]) -> dict:
        done = self.store.find(cell)
        if done is not None:
            self.reused += 1
            return done
        info = self.runner.use(cell["method"])
        done = {**cell, **info, "family": self.settings.family, "trained_length": self.trained, **compute(),
                "finished": time.strftime("%Y-%m-%dT%H:%M:%S")}
        self.store.add(done)
        self.run += 1
        return done

    def _bar(self, passes: int, desc: str) -> Progress:
        return Progress(passes * self.runner.num_layers, desc, enabled=self.show_progress, unit="layers")

    def perplexity(self, spec: str, split: str) -> dict:
        """Perplexity of the ``split`` window ("calibration" or "held-out") with ``spec`` (a stored record)."""
        begin, end = self.windows.calibration if split == "calibration" else self.windows.held_out

        def compute() -> dict:
            with self._bar(1, f"tune ppl {short_spec(spec, 40)} ({split})") as bar:
                return evaluate_perplexity(self.runner, self.tokens[begin:end], end - begin, trained=self.trained,
                                           progress=bar)

        return self._stored(self._cell("ppl", spec, split), compute)

    def passkey(self, spec: str, split: str) -> dict:
        """Passkey accuracy at the target length over the ``split`` passkey set (a stored record)."""
        cell = self._cell("passkey", spec, split)

        def compute() -> dict:
            s, per_depth = self.settings, []
            start = time.perf_counter()
            with self._bar(len(s.depths) * s.trials, f"tune passkey {short_spec(spec, 40)} ({split})") as bar:
                for depth in s.depths:
                    m = evaluate_passkey(self.runner, self.runner.tokenizer, s.target_length, depth, s.trials,
                                         cell["seed"], progress=bar)
                    per_depth.append({"depth": depth, "correct": m["correct"], "trials": s.trials,
                                      "keys": [d["key"] for d in m["details"]],
                                      "answers": [d["answer"] for d in m["details"]]})
            correct, prompts = sum(d["correct"] for d in per_depth), len(s.depths) * s.trials
            low, high = wilson_interval(correct, prompts)
            return {"accuracy": correct / prompts, "correct": correct, "prompts": prompts,
                    "accuracy_ci95": [round(low, 4), round(high, 4)], "per_depth": per_depth,
                    "seconds": round(time.perf_counter() - start, 2)}

        return self._stored(cell, compute)

    def measure(self, spec: str, split: str) -> dict:
        """The objective's numbers for ``spec`` on ``split``: perplexity and/or passkey fields, merged."""
        out: dict[str, Any] = {}
        if self.settings.uses_ppl:
            r = self.perplexity(spec, split)
            out |= {k: r[k] for k in ("ppl", "ppl_in_window", "ppl_beyond")} | {"seconds": r["seconds"]}
        if self.settings.uses_passkey:
            r = self.passkey(spec, split)
            out |= {k: r[k] for k in ("accuracy", "correct", "prompts", "accuracy_ci95")}
            out["seconds"] = round(out.get("seconds", 0.0) + r["seconds"], 2)
        return out

    # -- the search ---------------------------------------------------------------------------------------------

    def _evaluate(self, spec: str, index: int, measured: list[dict]) -> tuple:
        metrics = self.measure(spec, "calibration")
        measured.append({"spec": spec, "calibration": metrics})
        key = rank_key(self.settings.objective, metrics)
        self.log(f"  [{index}/{self.settings.budget}] {short_spec(spec):<62} {describe(metrics)}")
        return key

    def search(self) -> list[dict]:
        """Every candidate measured on the calibration data, in evaluation order (``budget`` at most)."""
        s, measured = self.settings, []
        if s.family in GRIDS:
            for i, spec in enumerate(order_candidates(GRIDS[s.family](self.base, s.target_length), s.budget,
                                                      s.seed), 1):
                self._evaluate(spec, i, measured)
            return measured
        low, high = factor_bounds(self.base, s.target_length)
        scored: list[tuple[tuple[float, ...], tuple]] = []
        generation = 0
        population = first_population(self.base, s.target_length, min(POPULATION, s.budget),
                                      random.Random(f"longrope:{s.seed}:0"))
        while population:
            for factors in population:
                spec = longrope_spec(factors, self.base, s.target_length)
                scored.append((factors, self._evaluate(spec, len(scored) + 1, measured)))
            left = s.budget - len(scored)
            if left <= 0:
                break
            generation += 1
            rng = random.Random(f"longrope:{s.seed}:{generation}")
            population = next_generation(scored, min(POPULATION, left), rng, low, high)
        return measured

    def tune(self) -> TuneResult:
        """Search, rank, and measure the best and the default on the held-out data."""
        s = self.settings
        self.log(f"tune {s.family} for {s.target_length} tokens (trained {self.trained}), objective {s.objective}, "
                 f"{s.budget} calibration evaluations; calibration tokens {self.windows.calibration[0]}-"
                 f"{self.windows.calibration[1]}, held-out {self.windows.held_out[0]}-{self.windows.held_out[1]}")
        measured = self.search()
        order = sorted(range(len(measured)),
                       key=lambda i: (rank_key(s.objective, measured[i]["calibration"]), i))
        ranked = [{**measured[i], "rank": r} for r, i in enumerate(order, 1)]
        default_spec = plan_spec(s.family, self.base, s.target_length)
        best = {"spec": ranked[0]["spec"], "calibration": ranked[0]["calibration"]}
        default = next(({"spec": m["spec"], "calibration": m["calibration"]} for m in measured
                        if m["spec"] == default_spec), None)
        if default is None:  # (the default is always the first candidate; kept for a budget of other specs)
            default = {"spec": default_spec, "calibration": self.measure(default_spec, "calibration")}
        self.log("held-out check:")
        for entry in (best, default) if default["spec"] != best["spec"] else (best,):
            entry["held_out"] = self.measure(entry["spec"], "held-out")
            self.log(f"  {short_spec(entry['spec']):<70} {describe(entry['held_out'])}")
        default.setdefault("held_out", best["held_out"])
        return TuneResult(s, self.trained, self.windows, ranked, best, default, self.run, self.reused)


def describe(metrics: dict) -> str:
    """One line of measured numbers: ``ppl beyond 21.56 (in window 19.88)``, ``passkey 83% (5/6)``."""
    parts = []
    if "ppl_beyond" in metrics:
        parts.append(f"ppl beyond {_fmt(metrics['ppl_beyond'])} (in window {_fmt(metrics['ppl_in_window'])})")
    if "accuracy" in metrics:
        low, high = metrics["accuracy_ci95"]
        parts.append(f"passkey {metrics['accuracy']:.0%} ({metrics['correct']}/{metrics['prompts']}, "
                     f"95% CI {low:.0%}-{high:.0%})")
    return "; ".join(parts)


def _fmt(x: float | None) -> str:
    return "-" if x is None else f"{x:.3f}"
