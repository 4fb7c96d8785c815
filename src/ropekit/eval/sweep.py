"""Resumable sweeps: methods x lengths (perplexity) and methods x lengths x depths (passkey).

Every finished cell goes into a ``ResultStore`` at once (atomic rewrite); cells already in the
store are skipped, so an interrupted sweep resumes where it stopped. A cell is identified by
every input that changes its numbers (see ``ropekit.eval.results.CELL_KEYS``). The model is
switched between specs with ``patch`` from its own (loaded) rope. With a ``TimeBudget`` a sweep
starts no new cell once the budget is spent and ends with ``BudgetSpent`` listing the cells left
(``ropekit.eval.budget``).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch

from ropekit.eval.budget import BudgetSpent, TimeBudget, budget_spent
from ropekit.eval.passkey import check_task, evaluate_passkey
from ropekit.eval.perplexity import evaluate_perplexity, plan_windows
from ropekit.eval.results import ResultStore
from ropekit.eval.runners import as_runner
from ropekit.memory import check_fits, request_bytes
from ropekit.method import parse_method
from ropekit.model.generate import MAX_POSITIONS
from ropekit.progress import Progress


def trained_length(model) -> int:
    """The model's trained context length L (what "beyond the window" is measured from)."""
    return as_runner(model).trained_length


def check_methods(methods: Sequence[str]) -> list[str]:
    """Validate every spec up front (ValueError before any model time is spent)."""
    if not methods:
        raise ValueError("give at least one --method")
    for spec in methods:
        parse_method(spec)
    return list(methods)


def check_max_tokens(max_tokens: int) -> None:
    """--max-tokens: at least one scored token needs two."""
    if not 2 <= max_tokens < MAX_POSITIONS:
        raise ValueError(f"--max-tokens must be in [2, 2**31), got {max_tokens}")


class Sweeper:
    """Runs cells on one loaded model (a runner of ``ropekit.eval.runners``, or a ``LlamaModel``),
    switching specs, storing each finished cell.

    ``identity`` holds what identifies the run besides the cell's own fields (``model_id``: the
    model file's identity; ``dtype``, ``device``, ``backend``; default: the runner's): it goes into
    every cell key. ``budget``: with one, a sweep stops after the cell that crosses it (``BudgetSpent``).
    """

    def __init__(self, model, tokenizer, store: ResultStore, *, model_name: str,
                 identity: dict[str, Any] | None = None, show_progress: bool = True,
                 log: Callable[[str], None] = print, budget: TimeBudget | None = None):
        self.runner = as_runner(model, tokenizer)
        self.budget = budget
        self.tokenizer, self.store = tokenizer, store
        self.model_name, self.show_progress, self.log = model_name, show_progress, log
        self.identity = dict(self.runner.identity if identity is None else identity)
        self.trained = self.runner.trained_length
        self.layers = self.runner.num_layers

    def check_lengths(self, lengths: Sequence[int], *, cache: bool) -> None:
        """Refuse, before any cell runs, a length whose forward pass (and, with ``cache``, KV cache)
        cannot fit in memory."""
        for n in lengths:
            check_fits(f"--lengths {n}: one pass over {n} tokens{' with its KV cache' if cache else ''}",
                       request_bytes(self.runner.config, int(n), self.runner.dtype, cache=cache))

    def _use(self, spec: str) -> dict:
        return self.runner.use(spec)

    def _progress(self, total: int, desc: str) -> Progress:
        return Progress(total, desc, enabled=self.show_progress, unit="layers")

    def perplexity(self, tokens: torch.Tensor, methods: Sequence[str], lengths: Sequence[int], *, text: str,
                   text_sha256: str | None = None, protocol: str = "single", stride: int | None = None,
                   windows: int = 1, segment: int = 4096, max_tokens: int | None = None) -> list[dict]:
        """One record per (method, length) cell, resumed from the store when already finished.
        max_tokens: only the first max_tokens tokens of the text are used (mostly for sliding runs).
        BudgetSpent (after storing every cell it ran) when the budget stopped the sweep."""
        if max_tokens is not None:
            check_max_tokens(max_tokens)
            tokens = tokens[:max_tokens]
        self.check_lengths(lengths, cache=False)
        out, left, ran = [], [], 0
        for spec, length in [(m, n) for m in methods for n in lengths]:
            cell = {"task": "perplexity", "model": self.model_name, **self.identity, "text": text,
                    "text_sha256": text_sha256, "method": spec, "length": int(length), "protocol": protocol,
                    "stride": stride if protocol == "sliding" else None, "windows": windows,
                    "max_tokens": None if max_tokens is None else int(max_tokens), "segment": segment}
            done = self.store.find(cell)
            if done is None and budget_spent(self.budget, ran):
                left.append(f"{spec} @ {length}")
                continue
            if done is None:
                ran += 1
                info = self._use(spec)
                n_windows = len(plan_windows(int(tokens.shape[0]), int(length), protocol, stride, windows))
                with self._progress(n_windows * self.layers, f"ppl {spec} @ {length}") as bar:
                    metrics = evaluate_perplexity(self.runner, tokens, int(length), trained=self.trained,
                                                  protocol=protocol, stride=stride, windows=windows,
                                                  segment=segment, progress=bar)
                done = {**cell, **info, "trained_length": self.trained, **metrics,
                        "finished": time.strftime("%Y-%m-%dT%H:%M:%S")}
                self.store.add(done)
                self.log(f"  {spec:<45} L={length:<6} ppl {_fmt(done['ppl'])}  in-window "
                         f"{_fmt(done['ppl_in_window'])}  beyond {_fmt(done['ppl_beyond'])}  "
                         f"({done['seconds']:.0f} s, peak {done['peak_mem_mb']:.0f} MB)")
            out.append(done)
        self._stop_if_left(left, out)
        return out

    def passkey(self, methods: Sequence[str], lengths: Sequence[int], depths: Sequence[float], *,
                trials: int, seed: int, keys: int = 1, jitter: float = 0.0, share_prefix: bool = True) -> list[dict]:
        """One record per (method, length, depth) cell. ``keys`` > 1: the multi-key task; ``jitter``: per-trial
        depth jitter (both in the cell key; left out of one-key, unjittered cells, which are the records of
        before); ``share_prefix``: the trials' common first tokens run once (not in the key: exact).
        BudgetSpent (after storing every cell it ran) when the budget stopped the sweep."""
        check_task(keys, jitter)
        self.check_lengths(lengths, cache=True)
        task = {} if keys == 1 and not jitter else {"keys": int(keys), "jitter": float(jitter)}
        out, left, ran = [], [], 0
        for spec, length, depth in [(m, n, d) for m in methods for n in lengths for d in depths]:
            cell = {"task": "passkey", "model": self.model_name, **self.identity, "method": spec,
                    "length": int(length), "depth": float(depth), "trials": int(trials), "seed": int(seed), **task}
            done = self.store.find(cell)
            if done is None and budget_spent(self.budget, ran):
                left.append(f"{spec} @ {length}, depth {depth:g}")
                continue
            if done is None:
                ran += 1
                info = self._use(spec)
                with self._progress(trials * self.layers, f"passkey {spec} @ {length}, depth {depth:g}") as bar:
                    metrics = evaluate_passkey(self.runner, self.tokenizer, int(length), float(depth),
                                               int(trials), int(seed), progress=bar, keys=keys, jitter=jitter,
                                               share_prefix=share_prefix)
                done = {**cell, **info, "trained_length": self.trained, **metrics,
                        "finished": time.strftime("%Y-%m-%dT%H:%M:%S")}
                self.store.add(done)
                low, high = done["accuracy_ci95"]
                self.log(f"  {spec:<45} L={length:<6} depth {depth:<4g} accuracy {done['accuracy']:.0%} "
                         f"({done['correct']}/{trials}, 95% CI {low:.0%}-{high:.0%}; {done['seconds']:.0f} s)")
            out.append(done)
        self._stop_if_left(left, out)
        return out

    def _stop_if_left(self, left: list[str], finished: list[dict]) -> None:
        """BudgetSpent when the budget left cells unrun (``left``: their labels; ``finished``: the done records)."""
        if left:
            raise BudgetSpent(left, finished, self.budget.elapsed())


def _fmt(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}"


def _whole_number(text: str) -> int:
    """'16384', '16_384', '1.6e4', '16k' -> 16384; anything else (fractions, inf, nan) raises ValueError."""
    text = text.strip().lower().replace("_", "")
    scale = 1024 if text.endswith("k") else 1
    value = float(text.removesuffix("k"))
    if not math.isfinite(value) or value != int(value):
        raise ValueError(text)
    return int(value) * scale


def parse_int_list(text: str, name: str) -> list[int]:
    """Comma-separated token counts in [2, 2**31) (``16k`` = 16384, ``1e4`` = 10000)."""
    try:
        values = [_whole_number(v) for v in str(text).split(",") if v.strip()]
    except (ValueError, OverflowError):
        raise ValueError(f"{name} must be comma-separated whole numbers of tokens in [2, 2**31), got "
                         f"{text!r}") from None
    if not values or any(not 2 <= v < MAX_POSITIONS for v in values):
        raise ValueError(f"{name} must be whole numbers of tokens in [2, 2**31), got {text!r}")
    return values


def parse_float_list(text: str, name: str, low: float = 0.0, high: float = 1.0) -> list[float]:
    try:
        values = [float(v) for v in str(text).split(",") if v.strip()]
    except ValueError:
        raise ValueError(f"{name} must be comma-separated numbers, got {text!r}") from None
    if not values or any(not low <= v <= high for v in values):
        raise ValueError(f"{name} must be numbers in [{low}, {high}], got {text!r}")
    return values
