"""Passkey retrieval (Mohtashami & Jaggi 2023, Landmark Attention; reused by PI, YaRN, LongRoPE).

The prompt is five parts joined by newlines: the task line, filler sentences before the key,
the key line, filler after it, and the question; the filler sentence is repeated (joined by
spaces) until the prompt is as long as asked (at most ``length`` tokens), and ``depth`` in
[0, 1] is the fraction of filler placed before the key line. A trial passes when the first
integer in up to 10 greedily generated tokens equals the 5-digit key.
"""

from __future__ import annotations

import random
import re
import time

from ropekit.eval.memory import PeakMemory
from ropekit.model.generate import generate_ids
from ropekit.progress import Progress

TASK = ("There is an important info hidden inside a lot of irrelevant text. Find it and memorize them. "
        "I will quiz you about the important information there.")
FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
KEY_LINE = "The pass key is {key}. Remember it. {key} is the pass key."
QUESTION = "What is the pass key? The pass key is"
MAX_NEW_TOKENS = 10


def passkey_text(num_fillers: int, depth: float, key: int) -> str:
    """The prompt with ``num_fillers`` filler sentences, ``round(depth * num_fillers)`` before the key."""
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth must lie in [0, 1], got {depth}")
    before = round(depth * num_fillers)
    return "\n".join([TASK, " ".join([FILLER] * before), KEY_LINE.format(key=key),
                      " ".join([FILLER] * (num_fillers - before)), QUESTION])


def passkey_prompt(tokenizer, length: int, depth: float, key: int) -> list[int]:
    """Token ids of the longest passkey prompt of at most ``length`` tokens."""
    def count(n: int) -> int:
        return len(tokenizer.encode(passkey_text(n, depth, key)))

    base, per = count(0), max(1.0, (count(20) - count(0)) / 20)
    if base > length:
        raise ValueError(f"passkey length {length} is shorter than the bare prompt ({base} tokens)")
    n = max(0, int((length - base) / per))
    while n > 0 and count(n) > length:
        n -= 1
    while count(n + 1) <= length:
        n += 1
    return tokenizer.encode(passkey_text(n, depth, key))


def first_integer(text: str) -> int | None:
    match = re.search(r"\d+", text)
    return int(match.group()) if match else None


def trial_keys(seed: int, length: int, depth: float, trials: int) -> list[int]:
    """The random 5-digit keys of one cell: fixed by (seed, length, depth), the same for every method."""
    rng = random.Random(f"passkey:{seed}:{length}:{depth:.6f}")
    return [rng.randint(10000, 99999) for _ in range(trials)]


def greedy(model, ids: list[int], max_new_tokens: int = MAX_NEW_TOKENS, on_prefill_layer=None) -> list[int]:
    """Greedy continuation of ``ids`` with a KV cache: a runner's own (``ropekit.eval.runners``), or the
    engine's generation loop for a ``LlamaModel``."""
    if hasattr(model, "greedy"):
        return model.greedy(ids, max_new_tokens, on_prefill_layer)
    return [int(t[0]) for t in generate_ids(model, [ids], max_new_tokens=max_new_tokens,
                                            on_prefill_layer=on_prefill_layer)]


def run_trial(model, tokenizer, length: int, depth: float, key: int, on_prefill_layer=None) -> dict:
    ids = passkey_prompt(tokenizer, length, depth, key)
    answer = tokenizer.decode(greedy(model, ids, on_prefill_layer=on_prefill_layer), skip_special_tokens=True)
    return {"key": key, "answer": answer, "correct": first_integer(answer) == key, "prompt_tokens": len(ids)}


def evaluate_passkey(model, tokenizer, length: int, depth: float, trials: int, seed: int,
                     progress: Progress | None = None) -> dict:
    """Accuracy over ``trials`` seeded keys at one (length, depth); metrics dict with per-trial details.
    ``progress`` advances by one per layer of each trial's prompt."""
    start = time.perf_counter()
    details = []
    on_layer = (lambda i: progress.update(1)) if progress is not None else None
    with PeakMemory() as mem:
        for key in trial_keys(seed, length, depth, trials):
            details.append(run_trial(model, tokenizer, length, depth, key, on_layer))
    correct = sum(d["correct"] for d in details)
    return {"accuracy": correct / trials, "correct": correct, "prompt_tokens": details[0]["prompt_tokens"],
            "details": details, "seconds": round(time.perf_counter() - start, 2),
            "peak_mem_mb": round(mem.peak_mb, 1)}
