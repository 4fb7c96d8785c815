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
  parameters, the plan's spec first, cut to the budget (``ropekit.eval.tune_grids``). ``longrope``: an
  evolutionary search over per-pair rescale factors (``ropekit.eval.longrope_search``), started from the
  plan's YaRN frequencies written as LongRoPE factors.
- **Records.** Every measurement is a ``ResultStore`` record (task ``tune``: spec, length, split, text
  hash or passkey set, model identity), so a rerun of the same command measures nothing twice.
- **Time budget.** With a ``TimeBudget`` (``--time-budget``) no measurement starts once the budget is
  spent: the run ends with ``BudgetSpent`` listing the measurements left, and the same command resumes.

``Tuner`` measures the candidates on a runner of ``ropekit.eval.runners`` and keeps the records.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ropekit.eval.budget import BudgetSpent, TimeBudget, budget_spent
from ropekit.eval.longrope_search import evolve, format_factor, long_factors, longrope_spec
from ropekit.eval.passkey import evaluate_passkey, passkey_prompt
from ropekit.eval.perplexity import evaluate_perplexity
from ropekit.eval.results import ResultStore
from ropekit.eval.shard import Shard, mine
from ropekit.eval.stats import wilson_interval
from ropekit.eval.tune_grids import FAMILIES, GRIDS, order_candidates, plan_spec
from ropekit.memory import check_fits, request_bytes
from ropekit.model.generate import MAX_POSITIONS
from ropekit.progress import Progress
from ropekit.rope import RopeConfig

OBJECTIVES = ("ppl", "passkey", "both")
MAX_BUDGET = 10_000
MAX_SEED = 2**32
HELD_OUT_SEED_OFFSET = 2**32  # held-out passkey keys come from seed + this: no searched seed (< 2**32) reaches it
PASSKEY_DEPTHS = (0.1, 0.5, 0.9)
PASSKEY_TRIALS = 2
MAX_PASSKEY_TRIALS = 100


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


def short_spec(spec: str, width: int = 60) -> str:
    """A spec for a log line: LongRoPE's factor lists summarised."""
    if not spec.startswith("longrope:") or len(spec) <= width:
        return spec
    f = long_factors(spec)
    return (f"longrope: long_factor [{format_factor(f[0])} .. {format_factor(f[len(f) // 2])} .. "
            f"{format_factor(f[-1])}] ({len(f)} pairs)")


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

    def as_dict(self) -> dict:
        s = self.settings
        return {"family": s.family, "objective": s.objective, "target_length": s.target_length,
                "trained_length": self.trained_length, "budget_evals": s.budget, "seed": s.seed,
                "calibration": {"tokens": list(self.windows.calibration), "passkey_seed": s.seed},
                "held_out": {"tokens": list(self.windows.held_out), "passkey_seed": s.seed + HELD_OUT_SEED_OFFSET},
                "passkey_set": {"depths": list(s.depths), "trials": s.trials} if s.uses_passkey else None,
                "candidates": self.candidates, "best": self.best, "default": self.default,
                "evaluations": {"run": self.run, "reused": self.reused}}


class Tuner:
    """Measures candidate specs on one runner, every measurement stored in (and resumed from) ``store``.

    ``tokens``: the whole text (long ``[N_text]``); ``text_sha256`` identifies it in the records;
    ``identity``: the runner's (model file hash, dtype, device, backend), as ``Sweeper`` keys its cells.
    ``budget``: with one, ``tune`` stops after the measurement that crosses it (``BudgetSpent``).
    """

    def __init__(self, runner, tokens: torch.Tensor, store: ResultStore, settings: TuneSettings, *,
                 model_name: str, text_sha256: str, show_progress: bool = True,
                 log: Callable[[str], None] = print, budget: TimeBudget | None = None, shard: Shard | None = None):
        if shard is not None and settings.family not in GRIDS:
            raise ValueError(f"--shard: {settings.family}'s search is sequential (each step needs the last); shard "
                             f"one of {', '.join(GRIDS)}, or run {settings.family} in one process")
        self.runner, self.tokens, self.store, self.shard = runner, tokens, store, shard
        self.budget = budget
        self.finished: list[dict] = []  # the records this run measured or reused, in order
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

    def _stored(self, cell: dict, compute: Callable[[], dict], run: bool = True) -> dict | None:
        done = self.store.find(cell)
        if done is not None:
            self.reused += 1
            self.finished.append(done)
            return done
        if not run:
            return None
        if budget_spent(self.budget, self.run):
            raise BudgetSpent([_label(cell)], self.finished, self.budget.elapsed())  # tune() lists all that is left
        info = self.runner.use(cell["method"])
        done = {**cell, **info, "family": self.settings.family, "trained_length": self.trained, **compute(),
                "finished": time.strftime("%Y-%m-%dT%H:%M:%S")}
        self.store.add(done)
        self.run += 1
        self.finished.append(done)
        return done

    def _bar(self, passes: int, desc: str) -> Progress:
        return Progress(passes * self.runner.num_layers, desc, enabled=self.show_progress, unit="layers")

    def perplexity(self, spec: str, split: str, run: bool = True) -> dict | None:
        """Perplexity of the ``split`` window ("calibration" or "held-out") with ``spec`` (a stored record; None
        when it is not stored and ``run`` is False)."""
        begin, end = self.windows.calibration if split == "calibration" else self.windows.held_out

        def compute() -> dict:
            with self._bar(1, f"tune ppl {short_spec(spec, 40)} ({split})") as bar:
                return evaluate_perplexity(self.runner, self.tokens[begin:end], end - begin, trained=self.trained,
                                           progress=bar)

        return self._stored(self._cell("ppl", spec, split), compute, run)

    def passkey(self, spec: str, split: str, run: bool = True) -> dict | None:
        """Passkey accuracy at the target length over the ``split`` passkey set (a stored record; None when it is
        not stored and ``run`` is False)."""
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

        return self._stored(cell, compute, run)

    def measure(self, spec: str, split: str, run: bool = True) -> dict | None:
        """The objective's numbers for ``spec`` on ``split``: perplexity and/or passkey fields, merged; None when a
        measurement is not stored and ``run`` is False (a candidate of another shard, not finished yet)."""
        out: dict[str, Any] = {}
        if self.settings.uses_ppl:
            r = self.perplexity(spec, split, run)
            if r is None:
                return None
            out |= {k: r[k] for k in ("ppl", "ppl_in_window", "ppl_beyond")} | {"seconds": r["seconds"]}
        if self.settings.uses_passkey:
            r = self.passkey(spec, split, run)
            if r is None:
                return None
            out |= {k: r[k] for k in ("accuracy", "correct", "prompts", "accuracy_ci95")}
            out["seconds"] = round(out.get("seconds", 0.0) + r["seconds"], 2)
        return out

    # -- what a stopped run leaves -------------------------------------------------------------------------------

    def _cells(self, spec: str, split: str) -> list[dict]:
        """The measurement cells of ``spec`` on ``split`` that the objective needs."""
        measures = ["ppl"] * self.settings.uses_ppl + ["passkey"] * self.settings.uses_passkey
        return [self._cell(measure, spec, split) for measure in measures]

    def search_left(self) -> list[str]:
        """Labels of the measurements a search stopped by the budget has not run: the calibration
        measurements not stored (with a shard: those of its own candidates; for ``longrope``, whose next
        candidates depend on the scores, one label per candidate still to draw), then the held-out check of
        the best and the default."""
        s = self.settings
        if s.family in GRIDS:
            specs = order_candidates(GRIDS[s.family](self.base, s.target_length), s.budget, s.seed)
            specs = [spec for spec, ours in zip(specs, self._ours(specs), strict=True) if ours]  # this shard's
            left = [_label(c) for spec in specs for c in self._cells(spec, "calibration") if self.store.find(c) is None]
        else:
            started = list(dict.fromkeys(r["method"] for r in self.finished if r["split"] == "calibration"))
            left = [_label(c) for spec in started for c in self._cells(spec, "calibration")
                    if self.store.find(c) is None]
            left += [f"LongRoPE candidate {i} of {s.budget} (calibration; drawn from the scores before it)"
                     for i in range(len(started) + 1, s.budget + 1)]
        default_spec = plan_spec(s.family, self.base, s.target_length)
        return left + ["held-out check of the best candidate (after the search)",
                       f"held-out check of the default {short_spec(default_spec)} (unless it ranks best)"]

    # -- the search ---------------------------------------------------------------------------------------------

    def _evaluate(self, spec: str, index: int, measured: list[dict], run: bool = True) -> tuple | None:
        metrics = self.measure(spec, "calibration", run)
        if metrics is None:
            self.log(f"  [{index}/{self.settings.budget}] {short_spec(spec):<62} (another shard's)")
            return None
        measured.append({"method": spec, "calibration": metrics})
        key = rank_key(self.settings.objective, metrics)
        self.log(f"  [{index}/{self.settings.budget}] {short_spec(spec):<62} {describe(metrics)}")
        return key

    def _ours(self, candidates: Sequence[str]) -> list[bool]:
        """Which of the grid's ``candidates`` this process's shard measures (all without a shard)."""
        s = self.settings
        return mine([self._cell(s.objective if s.objective != "both" else "passkey", spec, "calibration")
                     for spec in candidates], self.shard)

    def search(self) -> list[dict] | None:
        """Every candidate measured on the calibration data, in evaluation order (``budget`` at most). With a shard:
        this process measures its share of the grid's candidates (the others are read from the store), and the
        result is None while another shard's candidates are not all stored yet."""
        s, measured = self.settings, []
        if s.family in GRIDS:
            candidates = order_candidates(GRIDS[s.family](self.base, s.target_length), s.budget, s.seed)
            ours = self._ours(candidates)
            for i, (spec, run) in enumerate(zip(candidates, ours, strict=True), 1):
                self._evaluate(spec, i, measured, run)
            if len(measured) < len(candidates):
                self.store.reload()  # the other shards may have finished meanwhile
                found = {m["method"]: m for m in measured}
                for spec in candidates:
                    if spec not in found and (metrics := self.measure(spec, "calibration", run=False)) is not None:
                        found[spec] = {"method": spec, "calibration": metrics}
                measured = [found[spec] for spec in candidates if spec in found]
            return measured if len(measured) == len(candidates) else None
        evolve(self.base, s.target_length, s.budget, s.seed,
               lambda factors: self._evaluate(longrope_spec(factors, self.base, s.target_length),
                                              len(measured) + 1, measured))
        return measured

    def held_out_check(self, best: dict, default: dict) -> None:
        """Measure ``best`` and ``default`` (entries with a spec) on the held-out data, once when they are the
        same spec; each entry gets its own ``held_out`` dict."""
        self.log("held-out check:")
        best["held_out"] = self.measure(best["method"], "held-out")
        self.log(f"  {short_spec(best['method']):<70} {describe(best['held_out'])}")
        if default["method"] == best["method"]:
            default["held_out"] = dict(best["held_out"])
            return
        default["held_out"] = self.measure(default["method"], "held-out")
        self.log(f"  {short_spec(default['method']):<70} {describe(default['held_out'])}")

    def tune(self) -> TuneResult | None:
        """Search, rank, and measure the best and the default on the held-out data. The default (the plan's
        spec) is always the first candidate measured. None: a shard's candidates are measured and stored, other
        shards' are not all finished (the last shard to finish, or a rerun without a shard, completes the run)."""
        s = self.settings
        self.log(f"tune {s.family} for {s.target_length} tokens (trained {self.trained}), objective {s.objective}, "
                 f"{s.budget} calibration evaluations; calibration tokens {self.windows.calibration[0]}-"
                 f"{self.windows.calibration[1]}, held-out {self.windows.held_out[0]}-{self.windows.held_out[1]}")
        try:
            measured = self.search()
        except BudgetSpent:
            raise BudgetSpent(self.search_left(), self.finished, self.budget.elapsed()) from None
        if measured is None:
            return None
        order = sorted(range(len(measured)), key=lambda i: (rank_key(s.objective, measured[i]["calibration"]), i))
        ranked = [{**measured[i], "rank": r} for r, i in enumerate(order, 1)]
        default_spec = plan_spec(s.family, self.base, s.target_length)
        (default_entry,) = [m for m in measured if m["method"] == default_spec]
        best = {"method": ranked[0]["method"], "calibration": dict(ranked[0]["calibration"])}
        default = {"method": default_spec, "calibration": dict(default_entry["calibration"])}
        try:
            self.held_out_check(best, default)
        except BudgetSpent:
            left = [_label(c) for c in self._cells(best["method"], "held-out") + self._cells(default_spec, "held-out")
                    if self.store.find(c) is None]
            raise BudgetSpent(list(dict.fromkeys(left)), self.finished, self.budget.elapsed()) from None
        return TuneResult(s, self.trained, self.windows, ranked, best, default, self.run, self.reused)


def _label(cell: dict) -> str:
    """One measurement cell in a list of what is left: ``ppl yarn:factor=2 (calibration)``."""
    return f"{cell['measure']} {short_spec(cell['method'])} ({cell['split']})"


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
