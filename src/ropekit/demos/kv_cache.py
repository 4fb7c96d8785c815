"""Decoding with a KV cache: which positions each forward pass uses, and why they must continue.

A 4-token prompt is rotated at positions [[0, 1, 2, 3]] in the first pass; each new token is fed
alone at [[4]], [[5]], ... while the earlier tokens' positions live on inside the cached, already
rotated keys. The cached logits equal a from-scratch forward over the whole sequence. Restart the
positions at 0 on every step and the new query and key sit at the wrong distances from the
cached keys: the logits, and soon the continuation, go wrong.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from ropekit.demos.common import (
    DEFAULT_MODEL,
    DemoResult,
    ModelArg,
    explain,
    get_model,
    heading,
    using_attention,
)

PROMPT = "The quick brown fox"
PROMPT_TOKENS = 4
# float32: the cached pass and the full recomputation multiply matrices of different shapes, so
# their sums run in different orders; logits (size ~10-30) agree to ~1e-4.
LOGIT_TOLERANCE = 1e-3


@dataclass
class DecodeTrace:
    """One greedy decode: the position tensor each forward pass used and the logits it returned."""

    positions: list[list[list[int]]] = field(default_factory=list)
    logits: list[torch.Tensor] = field(default_factory=list)  # (V,) per step: the last position's
    tokens: list[int] = field(default_factory=list)  # the generated tokens


def recording_method():
    """The model's default ``RopeAttention``, also recording each forward pass's positions."""
    from ropekit.model.attention import RopeAttention

    class RecordPositions(RopeAttention):
        name = "rope+record"

        def __init__(self):
            self.seen: list[list[list[int]]] = []

        def prepare(self, context) -> None:
            self.seen.append(context.positions.expand(context.key_positions.shape).tolist())
            super().prepare(context)

    return RecordPositions()


def greedy_decode(model, prompt: list[int], steps: int, *, restart_positions: bool = False) -> DecodeTrace:
    """Greedy decoding with a KV cache; positions come from the model's default (continuing).

    With ``restart_positions`` every pass is given positions 0..T-1 instead: the bug to show.
    """
    trace = DecodeTrace()
    cache = model.new_cache(1, len(prompt) + steps)
    recorder = recording_method()
    feed = torch.tensor([prompt])
    with using_attention(model, recorder), torch.no_grad():
        for _ in range(steps):
            positions = torch.arange(feed.shape[1]) if restart_positions else None
            logits = model(feed, positions=positions, cache=cache)[0, -1]  # (V,)
            token = int(logits.argmax())
            trace.logits.append(logits)
            trace.tokens.append(token)
            feed = torch.tensor([[token]])
    trace.positions = recorder.seen
    return trace


def recomputed_logits(model, prompt: list[int], tokens: list[int]) -> list[torch.Tensor]:
    """For each step, the last-position logits of a cache-free forward over prompt + tokens so far."""
    out = []
    with torch.no_grad():
        for step in range(len(tokens)):
            ids = torch.tensor([prompt + tokens[:step]])
            out.append(model(ids, logits_to_keep=1)[0, -1])
    return out


def max_logit_diff(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    return max(float((x - y).abs().max()) for x, y in zip(a, b, strict=True))


def run(fast: bool = False, plot_dir: Path | None = None,
        model: ModelArg | None = DEFAULT_MODEL) -> DemoResult:
    """Positions of each cached forward pass; cached = recomputed; restarting positions breaks it."""
    result = DemoResult("kv-cache")
    explain("With a KV cache the prompt is processed once and every later pass feeds one token. Its\n"
            "position must continue where the prompt stopped: keys in the cache keep the rotation of\n"
            "the position they were written at, and RoPE scores see only position differences.")
    if model is None:
        result.skip("the whole demo needs the real model (none given)")
        return result
    llm, tokenizer = get_model(model)
    steps = 4 if fast else 10
    prompt = tokenizer.encode(PROMPT)[:PROMPT_TOKENS]
    heading(f"greedy decoding of {steps} tokens after the {len(prompt)}-token prompt "
            f"{tokenizer.decode(prompt)!r}")
    good = greedy_decode(llm, prompt, steps)
    for step, positions in enumerate(good.positions):
        fed = prompt if step == 0 else [good.tokens[step - 1]]
        print(f"  pass {step}: position_ids {positions}  fed {tokenizer.decode(fed)!r}")
    expected = [[list(range(len(prompt)))]] + [[[len(prompt) + i]] for i in range(steps - 1)]
    result.numbers.update(positions=good.positions, tokens=good.tokens)
    result.check("the model used positions [[0, 1, 2, 3]], then [[4]], [[5]], ...",
                 good.positions == expected)

    reference = recomputed_logits(llm, prompt, good.tokens)
    cached_diff = max_logit_diff(good.logits, reference)
    same_argmax = all(int(a.argmax()) == int(b.argmax()) for a, b in zip(good.logits, reference, strict=True))
    print(f"  continuation with the cache: {tokenizer.decode(good.tokens)!r}")
    result.numbers["cached_vs_recomputed"] = cached_diff
    result.check("cached logits equal logits recomputed from scratch at every step",
                 cached_diff <= LOGIT_TOLERANCE and same_argmax,
                 f"max |diff| = {cached_diff:.1e} <= {LOGIT_TOLERANCE:g}: float32, different matmul shapes")

    heading("the bug: positions restart at 0 on every pass")
    bad = greedy_decode(llm, prompt, steps, restart_positions=True)
    for step, positions in enumerate(bad.positions[:3]):
        print(f"  pass {step}: position_ids {positions}")
    print("  ...")
    # Compare each wrong step with the correct logits for the same sequence (the wrong one's own).
    bad_reference = recomputed_logits(llm, prompt, bad.tokens)
    bad_diff = max_logit_diff(bad.logits, bad_reference)
    print(f"  continuation with restarted positions: {tokenizer.decode(bad.tokens)!r}")
    print(f"  correct continuation:                  {tokenizer.decode(good.tokens)!r}")
    result.numbers.update(restart_vs_recomputed=bad_diff, restart_tokens=bad.tokens)
    explain("Each new token is rotated as if it stood at position 0, before the prompt's keys, so its\n"
            "distances to them are negative: a context the model never saw.")
    result.check("restarted positions give wrong logits (vs a from-scratch forward of the same tokens)",
                 bad_diff > 100 * LOGIT_TOLERANCE, f"max |diff| = {bad_diff:.2f}")
    result.numbers["restart_changes_text"] = bad.tokens != good.tokens
    print(f"  the continuation {'changed' if bad.tokens != good.tokens else 'did not change'} "
          f"({sum(a != b for a, b in zip(bad.tokens, good.tokens, strict=True))} of {steps} tokens differ)")
    return result
