"""Passkey retrieval (Mohtashami & Jaggi 2023, Landmark Attention; reused by PI, YaRN, LongRoPE), with a
multi-key variant (RULER's niah_multikey, Hsieh et al. 2024, arXiv 2404.06654).

The prompt is parts joined by newlines: the task line, filler sentences, the key line(s) inside the
filler, more filler, and the question; the filler sentence is repeated (joined by spaces) until the
prompt is as long as asked (at most ``length`` tokens). A key line at ``depth`` in [0, 1] has that
fraction of the filler before it. A trial passes when the first integer in up to 10 greedily
generated tokens equals the asked 5-digit key.

- one key (the default): "The pass key is K. ..." at the cell's depth; the question asks for it.
- ``keys=K`` > 1: K distinct keys, each tagged with a distinct name ("The pass key for river is
  K. ..."); the asked one sits at the cell's depth, the K - 1 distractors at seeded random depths;
  the question asks for the asked name's key.
- ``jitter=J`` > 0: each trial's asked key moves to depth + J * u, u uniform in [-1, 1] (clamped to
  [0, 1]), so trials differ in position as well as in key.

Everything random comes from the cell (seed, length, depth, keys, jitter), never from the method, so
every method answers the same prompts. One key without jitter gives exactly the keys and prompts of
earlier ropekit versions (``trial_keys``), so their records resume.

Trials of one cell share their first tokens (the task line and the filler up to the earliest key
line): runners that can (``EngineRunner.shared_prefix_length``) run that prefix once and continue
each trial from a copy of its KV cache, the same tokens at the same positions.
"""

from __future__ import annotations

import random
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from ropekit.eval.stats import wilson_interval
from ropekit.memory import PeakMemory
from ropekit.model.generate import generate_ids
from ropekit.progress import Progress

TASK = ("There is an important info hidden inside a lot of irrelevant text. Find it and memorize them. "
        "I will quiz you about the important information there.")
FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
KEY_LINE = "The pass key is {key}. Remember it. {key} is the pass key."
QUESTION = "What is the pass key? The pass key is"
NAMED_KEY_LINE = "The pass key for {name} is {key}. Remember it. {key} is the pass key for {name}."
NAMED_QUESTION = "What is the pass key for {name}? The pass key for {name} is"
# Tags of the multi-key task: short common words, one BPE token or two in most vocabularies.
NAMES = ("river", "apple", "garden", "window", "candle", "silver", "forest", "harbor", "pencil", "meadow",
         "copper", "lantern", "violet", "island", "marble", "thunder", "orchid", "falcon", "saddle", "button",
         "ribbon", "walnut", "glacier", "pepper", "anchor", "velvet", "cactus", "tunnel", "comet", "maple",
         "pebble", "quartz")
MAX_KEYS = len(NAMES)
MAX_JITTER = 0.5
MAX_NEW_TOKENS = 10


@dataclass(frozen=True)
class Needle:
    """One key line: the 5-digit ``key``, the fraction ``depth`` of the filler before it, its ``name`` tag
    (None: the one-key task's untagged line)."""

    key: int
    depth: float
    name: str | None = None

    def line(self) -> str:
        return KEY_LINE.format(key=self.key) if self.name is None else NAMED_KEY_LINE.format(key=self.key,
                                                                                              name=self.name)


@dataclass(frozen=True)
class Trial:
    """One prompt's key lines; ``needles[0]`` is the one the question asks for; ``jittered``: its depth was
    drawn around the cell's."""

    needles: tuple[Needle, ...]
    jittered: bool = False

    @property
    def asked(self) -> Needle:
        return self.needles[0]

    @property
    def key(self) -> int:
        return self.asked.key

    def question(self) -> str:
        return QUESTION if self.asked.name is None else NAMED_QUESTION.format(name=self.asked.name)


def check_depth(depth: float) -> None:
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth must lie in [0, 1], got {depth}")


def trial_text(num_fillers: int, trial: Trial) -> str:
    """The prompt of ``trial`` with ``num_fillers`` filler sentences; the key line of a needle at depth d comes
    after ``round(d * num_fillers)`` of them (key lines at the same place follow each other, in the order of
    ``needles``, with no empty filler line between them)."""
    places = sorted((round(n.depth * num_fillers), i) for i, n in enumerate(trial.needles))
    parts, done = [TASK], 0
    for k, (place, i) in enumerate(places):
        if k == 0 or place > done:
            parts.append(" ".join([FILLER] * (place - done)))
        parts.append(trial.needles[i].line())
        done = place
    return "\n".join([*parts, " ".join([FILLER] * (num_fillers - done)), trial.question()])


def passkey_text(num_fillers: int, depth: float, key: int) -> str:
    """The one-key prompt with ``num_fillers`` filler sentences, ``round(depth * num_fillers)`` before the key."""
    check_depth(depth)
    return trial_text(num_fillers, Trial((Needle(key, depth),)))


def fit_prompt(tokenizer, length: int, text_of: Callable[[int], str]) -> list[int]:
    """Token ids of ``text_of(n)`` for the largest filler count n whose prompt has at most ``length`` tokens."""
    def count(n: int) -> int:
        return len(tokenizer.encode(text_of(n)))

    base, per = count(0), max(1.0, (count(20) - count(0)) / 20)
    if base > length:
        raise ValueError(f"passkey length {length} is shorter than the bare prompt ({base} tokens)")
    n = max(0, int((length - base) / per))
    while n > 0 and count(n) > length:
        n -= 1
    while count(n + 1) <= length:
        n += 1
    return tokenizer.encode(text_of(n))


def passkey_prompt(tokenizer, length: int, depth: float, key: int) -> list[int]:
    """Token ids of the longest one-key passkey prompt of at most ``length`` tokens."""
    check_depth(depth)
    return fit_prompt(tokenizer, length, lambda n: passkey_text(n, depth, key))


def trial_prompt(tokenizer, length: int, trial: Trial) -> list[int]:
    """Token ids of the longest prompt of ``trial`` with at most ``length`` tokens."""
    return fit_prompt(tokenizer, length, lambda n: trial_text(n, trial))


def first_integer(text: str) -> int | None:
    match = re.search(r"\d+", text)
    return int(match.group()) if match else None


def trial_keys(seed: int, length: int, depth: float, trials: int) -> list[int]:
    """The random 5-digit keys of one cell: fixed by (seed, length, depth), the same for every method."""
    rng = random.Random(f"passkey:{seed}:{length}:{depth:.6f}")
    return [rng.randint(10000, 99999) for _ in range(trials)]


def check_task(keys: int, jitter: float) -> None:
    if not isinstance(keys, int) or not 1 <= keys <= MAX_KEYS:
        raise ValueError(f"--keys must be an integer in [1, {MAX_KEYS}], got {keys!r}")
    if not 0.0 <= jitter <= MAX_JITTER:  # NaN fails this too
        raise ValueError(f"--jitter must be a number in [0, {MAX_JITTER}], got {jitter!r}")


def _jittered(depth: float, jitter: float, rng: random.Random) -> float:
    return min(1.0, max(0.0, depth + jitter * rng.uniform(-1.0, 1.0)))


def plan_trials(seed: int, length: int, depth: float, trials: int, keys: int = 1, jitter: float = 0.0) -> list[Trial]:
    """The trials of one cell, fixed by (seed, length, depth, keys, jitter), the same for every method.

    One key: the keys of ``trial_keys`` (as earlier versions drew them); with ``jitter``, each trial's
    depth from a separate stream, so the keys stay the same. Several keys: per trial, ``keys`` distinct
    keys and names; the asked key at the (jittered) cell depth, the others at uniform random depths.
    """
    check_depth(depth)
    check_task(keys, jitter)
    cell = f"{seed}:{length}:{depth:.6f}"
    if keys == 1:
        rng = random.Random(f"passkey-jitter:{cell}:{jitter:.6f}")
        return [Trial((Needle(key, _jittered(depth, jitter, rng) if jitter else depth),), jittered=bool(jitter))
                for key in trial_keys(seed, length, depth, trials)]
    rng = random.Random(f"passkey-multikey:{cell}:{keys}:{jitter:.6f}")
    out = []
    for _ in range(trials):
        values = rng.sample(range(10000, 100000), keys)
        names = rng.sample(NAMES, keys)
        depths = [_jittered(depth, jitter, rng) if jitter else depth] + [rng.random() for _ in range(keys - 1)]
        out.append(Trial(tuple(Needle(v, d, n) for v, d, n in zip(values, depths, names, strict=True)),
                         jittered=bool(jitter)))
    return out


def greedy(model, ids: list[int], max_new_tokens: int = MAX_NEW_TOKENS, on_prefill_layer=None) -> list[int]:
    """Greedy continuation of ``ids`` with a KV cache: a runner's own (``ropekit.eval.runners``), or the
    engine's generation loop for a ``LlamaModel``."""
    if hasattr(model, "greedy"):
        return model.greedy(ids, max_new_tokens, on_prefill_layer)
    return [int(t[0]) for t in generate_ids(model, [ids], max_new_tokens=max_new_tokens,
                                            on_prefill_layer=on_prefill_layer)]


def score(tokenizer, trial: Trial, ids: list[int], answer_ids: list[int]) -> dict:
    """One trial's detail record: the asked key, the answer, whether it passed, the prompt's length (and, for
    jittered or multi-key trials, where the keys were and whether the answer was a distractor's key)."""
    answer = tokenizer.decode(answer_ids, skip_special_tokens=True)
    found = first_integer(answer)
    out = {"key": trial.key, "answer": answer, "correct": found == trial.key, "prompt_tokens": len(ids)}
    if trial.jittered:
        out["depth"] = round(trial.asked.depth, 6)
    if len(trial.needles) == 1:
        return out
    out |= {"asked": trial.asked.name,
            "distractors": [{"key": n.key, "name": n.name, "depth": round(n.depth, 6)} for n in trial.needles[1:]],
            "answered_distractor": any(found == n.key for n in trial.needles[1:])}
    return out


def run_trial(model, tokenizer, length: int, depth: float, key: int, on_prefill_layer=None) -> dict:
    """One one-key trial, run on its own (no shared prefix)."""
    trial = Trial((Needle(key, depth),))
    ids = passkey_prompt(tokenizer, length, depth, key)
    return score(tokenizer, trial, ids, greedy(model, ids, on_prefill_layer=on_prefill_layer))


def greedy_all(runner, prompts: Sequence[list[int]], *, share_prefix: bool = True, on_prefill_layer=None,
               progress: Progress | None = None) -> tuple[list[list[int]], int]:
    """Greedy answers to every prompt, and how many first tokens one cached pass served for all of them (0: each
    prompt ran alone). ``progress`` grows by one pass of layers when a shared prefix runs."""
    shared = runner.shared_prefix_length(prompts) if share_prefix else 0
    if shared and progress is not None:
        progress.add_total(runner.num_layers)
    answers = runner.greedy_many(prompts, MAX_NEW_TOKENS, on_prefill_layer, shared=shared)
    return answers, shared


def evaluate_passkey(model, tokenizer, length: int, depth: float, trials: int, seed: int,
                     progress: Progress | None = None, *, keys: int = 1, jitter: float = 0.0,
                     share_prefix: bool = True) -> dict:
    """Accuracy over ``trials`` seeded trials at one (length, depth); metrics dict with per-trial details.

    ``model``: a runner (``ropekit.eval.runners``) or a ``LlamaModel``. ``keys``, ``jitter``: the task (see
    the module docstring). ``share_prefix``: run the trials' common first tokens once (exact: the same tokens
    at the same positions; rounding can differ in the last bits). ``progress`` advances by one per layer of
    each pass. ``accuracy_ci95`` is the Wilson 95% interval of the accuracy."""
    from ropekit.eval.runners import as_runner

    runner = as_runner(model, tokenizer)
    start = time.perf_counter()
    on_layer = (lambda i: progress.update(1)) if progress is not None else None
    plan = plan_trials(seed, length, depth, trials, keys, jitter)
    with PeakMemory() as mem:
        prompts = [trial_prompt(tokenizer, length, trial) for trial in plan]
        answers, shared = greedy_all(runner, prompts, share_prefix=share_prefix, on_prefill_layer=on_layer,
                                     progress=progress)
    details = [score(tokenizer, t, ids, a) for t, ids, a in zip(plan, prompts, answers, strict=True)]
    correct = sum(d["correct"] for d in details)
    low, high = wilson_interval(correct, trials)
    return {"accuracy": correct / trials, "correct": correct, "accuracy_ci95": [round(low, 4), round(high, 4)],
            "prompt_tokens": details[0]["prompt_tokens"], "shared_prefix_tokens": shared, "details": details,
            "seconds": round(time.perf_counter() - start, 2), "peak_mem_mb": round(mem.peak_mb, 1)}
