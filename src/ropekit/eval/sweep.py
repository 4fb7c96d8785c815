"""Resumable sweeps: methods x lengths (perplexity) and methods x lengths x depths (passkey).

Every finished cell goes into a ``ResultStore`` at once (its own file, atomically); cells already in the
store are skipped, so an interrupted sweep resumes where it stopped, and several processes (shards of one
grid, ``ropekit.eval.shard``) can share one store. A cell is identified by
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
from ropekit.eval.shard import Shard, mine
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
    every cell key. ``shard``: this process's share of every grid (``ropekit.eval.shard``; None: every cell).
    ``budget``: with one, a sweep starts none of its cells after the cell that crosses it (``BudgetSpent``).
    """

    def __init__(self, model, tokenizer, store: ResultStore, *, model_name: str,
                 identity: dict[str, Any] | None = None, show_progress: bool = True,
                 log: Callable[[str], None] = print, budget: TimeBudget | None = None, shard: Shard | None = None):
        self.shard = shard
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

    # -- planning: the cells of a grid, in one fixed order (every shard plans the same) ------------------------

    def perplexity_cells(self, methods: Sequence[str], lengths: Sequence[int], *, text: str,
                         text_sha256: str | None = None, protocol: str = "single", stride: int | None = None,
                         windows: int = 1, segment: int = 4096, max_tokens: int | None = None) -> list[dict]:
        """The (method, length) cells of a perplexity grid, checked to fit in memory. max_tokens: only the first
        max_tokens tokens of the text are used (mostly for sliding runs)."""
        if max_tokens is not None:
            check_max_tokens(max_tokens)
        self.check_lengths(lengths, cache=False)
        return [{"task": "perplexity", "model": self.model_name, **self.identity, "text": text,
                 "text_sha256": text_sha256, "method": spec, "length": int(length), "protocol": protocol,
                 "stride": stride if protocol == "sliding" else None, "windows": windows,
                 "max_tokens": None if max_tokens is None else int(max_tokens), "segment": segment}
                for spec in methods for length in lengths]

    def passkey_cells(self, methods: Sequence[str], lengths: Sequence[int], depths: Sequence[float], *,
                      trials: int, seed: int, keys: int = 1, jitter: float = 0.0) -> list[dict]:
        """The (method, length, depth) cells of a passkey grid. ``keys`` > 1: the multi-key task; ``jitter``:
        per-trial depth jitter (both in the cell key; left out of one-key, unjittered cells, which are the records
        of before)."""
        check_task(keys, jitter)
        self.check_lengths(lengths, cache=True)
        task = {} if keys == 1 and not jitter else {"keys": int(keys), "jitter": float(jitter)}
        return [{"task": "passkey", "model": self.model_name, **self.identity, "method": spec, "length": int(length),
                 "depth": float(depth), "trials": int(trials), "seed": int(seed), **task}
                for spec in methods for length in lengths for depth in depths]

    # -- running ------------------------------------------------------------------------------------------------

    def run(self, cells: Sequence[dict], *, tokens: torch.Tensor | None = None,
            share_prefix: bool = True) -> list[dict]:
        """Run the cells of this process's shard (all cells without one) that the store does not hold yet, storing
        each as it finishes; the records of every cell of ``cells`` stored by now (other shards' included), in plan
        order. ``tokens``: the text, long ``[N]`` (perplexity cells); ``share_prefix``: passkey trials' common first
        tokens run once (not in the key: exact). With a budget, no cell of this shard starts once it is spent (after
        at least one ran): BudgetSpent, after storing every cell it ran, lists this shard's cells left."""
        out, left, ran = [], [], 0
        for cell, ours in zip(cells, mine(cells, self.shard), strict=True):
            done = self.store.find(cell)
            if done is None and ours and budget_spent(self.budget, ran):
                left.append(cell)  # the budget is checked before each of this shard's cells that would run
                continue
            if done is None and ours:
                ran += 1
                done = self._perplexity(cell, tokens) if cell["task"] == "perplexity" else \
                    self._passkey(cell, share_prefix)
                self.store.add(done)
            if done is not None:
                out.append(done)
        if len(out) < len(cells):  # other shards may have finished theirs meanwhile
            self.store.reload()
            out = [r for r in map(self.store.find, cells) if r is not None]
            left = [cell for cell in left if self.store.find(cell) is None]
        self._stop_if_left(left, out)
        return out

    def _stop_if_left(self, left: list[dict], finished: list[dict]) -> None:
        """BudgetSpent when the budget left cells of this shard unrun (``left``: those cells; ``finished``: the
        records of the planned cells done by now)."""
        if left:
            raise BudgetSpent([cell_label(cell) for cell in left], finished, self.budget.elapsed())

    def _perplexity(self, cell: dict, tokens: torch.Tensor | None) -> dict:
        if tokens is None:
            raise ValueError("perplexity cells need the text's tokens")
        if cell["max_tokens"] is not None:
            tokens = tokens[:cell["max_tokens"]]
        spec, length = cell["method"], cell["length"]
        info = self._use(spec)
        n_windows = len(plan_windows(int(tokens.shape[0]), length, cell["protocol"], cell["stride"], cell["windows"]))
        with self._progress(n_windows * self.layers, f"ppl {spec} @ {length}") as bar:
            metrics = evaluate_perplexity(self.runner, tokens, length, trained=self.trained,
                                          protocol=cell["protocol"], stride=cell["stride"], windows=cell["windows"],
                                          segment=cell["segment"], progress=bar)
        done = {**cell, **info, "trained_length": self.trained, **metrics,
                "finished": time.strftime("%Y-%m-%dT%H:%M:%S")}
        self.log(f"  {spec:<45} L={length:<6} ppl {_fmt(done['ppl'])}  in-window "
                 f"{_fmt(done['ppl_in_window'])}  beyond {_fmt(done['ppl_beyond'])}  "
                 f"({done['seconds']:.0f} s, peak {done['peak_mem_mb']:.0f} MB)")
        return done

    def _passkey(self, cell: dict, share_prefix: bool) -> dict:
        spec, length, depth, trials = cell["method"], cell["length"], cell["depth"], cell["trials"]
        info = self._use(spec)
        with self._progress(trials * self.layers, f"passkey {spec} @ {length}, depth {depth:g}") as bar:
            metrics = evaluate_passkey(self.runner, self.tokenizer, length, depth, trials, cell["seed"], progress=bar,
                                       keys=cell.get("keys", 1), jitter=cell.get("jitter", 0.0),
                                       share_prefix=share_prefix)
        done = {**cell, **info, "trained_length": self.trained, **metrics,
                "finished": time.strftime("%Y-%m-%dT%H:%M:%S")}
        low, high = done["accuracy_ci95"]
        self.log(f"  {spec:<45} L={length:<6} depth {depth:<4g} accuracy {done['accuracy']:.0%} "
                 f"({done['correct']}/{trials}, 95% CI {low:.0%}-{high:.0%}; {done['seconds']:.0f} s)")
        return done

    # -- one grid, planned and run --------------------------------------------------------------------------------

    def perplexity(self, tokens: torch.Tensor, methods: Sequence[str], lengths: Sequence[int], *, text: str,
                   text_sha256: str | None = None, protocol: str = "single", stride: int | None = None,
                   windows: int = 1, segment: int = 4096, max_tokens: int | None = None) -> list[dict]:
        """One record per (method, length) cell (``perplexity_cells``), resumed from the store when finished.
        BudgetSpent (after storing every cell it ran) when the budget stopped the sweep."""
        cells = self.perplexity_cells(methods, lengths, text=text, text_sha256=text_sha256, protocol=protocol,
                                      stride=stride, windows=windows, segment=segment, max_tokens=max_tokens)
        return self.run(cells, tokens=tokens)

    def passkey(self, methods: Sequence[str], lengths: Sequence[int], depths: Sequence[float], *,
                trials: int, seed: int, keys: int = 1, jitter: float = 0.0, share_prefix: bool = True) -> list[dict]:
        """One record per (method, length, depth) cell (``passkey_cells``), resumed from the store when finished.
        BudgetSpent (after storing every cell it ran) when the budget stopped the sweep."""
        cells = self.passkey_cells(methods, lengths, depths, trials=trials, seed=seed, keys=keys, jitter=jitter)
        return self.run(cells, share_prefix=share_prefix)


def cell_label(cell: dict) -> str:
    """A cell as the budget's list of cells left names it: ``method @ length`` (passkey: ``, depth D``)."""
    label = f"{cell['method']} @ {cell['length']}"
    return label if cell["task"] == "perplexity" else f"{label}, depth {cell['depth']:g}"


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
