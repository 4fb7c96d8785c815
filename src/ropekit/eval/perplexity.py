"""Perplexity against context length: the single-window and sliding-window protocols.

- single window (YaRN's headline tables): the first L tokens of the text (or ``windows``
  consecutive disjoint L-token windows), every token after the first scored;
- sliding window (Press et al., ALiBi; PI/YaRN with stride 256): windows of L tokens every S
  tokens, each scoring only the tokens that earlier windows did not.
A scored token's *position* is its index inside its window; tokens at positions below the
trained length are "in window", the rest "beyond". Perplexity = exp(mean NLL per token).
``ppl_text_beyond`` covers the tokens at *text* index >= the trained length, whatever their
window position: a sliding run with windows of the trained length scores the same tokens that a
long single window scores "beyond", each with up to a trained length of context — the
reference a context-extension method's ``ppl_beyond`` should be compared with (the text after
the trained length need not be as easy as the text before it). Segments (the per-position
breakdown) are by window position in the single protocol and by text index in the sliding one.
Logits are produced in chunks from the final hidden states, so a 32K window never holds a
``T x V`` logit matrix.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from ropekit.memory import PeakMemory
from ropekit.progress import Progress

LOGIT_CHUNK = 2048


@torch.inference_mode()
def window_nll(model, ids: torch.Tensor, logit_chunk: int = LOGIT_CHUNK,
               on_layer: Callable[[int], None] | None = None) -> torch.Tensor:
    """NLL of each token given the ones before it, in one forward pass.

    ids: long ``[T]`` -> float64 ``[T - 1]``, entry t-1 being -log p(ids[t] | ids[:t]). The logits
    come from the final hidden states in chunks of ``logit_chunk`` rows (never ``T x V`` at once).
    ``on_layer(i)`` is called after each layer (progress).
    """
    ids = ids.reshape(1, -1).to(model.embed_tokens.weight.device)
    hidden = model.hidden_states(ids, on_layer=on_layer)[0, :-1]  # [T-1, C]
    targets = ids[0, 1:]
    out = torch.empty(targets.shape[0], dtype=torch.float64)
    for a in range(0, targets.shape[0], logit_chunk):
        logits = model.lm_head(hidden[a:a + logit_chunk]).float()  # [chunk, V]
        nll = F.cross_entropy(logits, targets[a:a + logit_chunk], reduction="none")
        out[a:a + logit_chunk] = nll.double().cpu()
    return out


@dataclass
class NllTally:
    """Running NLL sums per position class and per segment of positions."""

    trained: int
    segment: int
    total: list[float] = field(default_factory=lambda: [0.0, 0])
    inside: list[float] = field(default_factory=lambda: [0.0, 0])
    beyond: list[float] = field(default_factory=lambda: [0.0, 0])
    text_beyond: list[float] = field(default_factory=lambda: [0.0, 0])
    segments: dict[int, list[float]] = field(default_factory=dict)
    segment_by_text: bool = False
    bucket: int = 256
    buckets: dict[int, list[float]] = field(default_factory=dict)

    def add(self, nll: torch.Tensor, positions: torch.Tensor, text_positions: torch.Tensor) -> None:
        """nll float ``[n]`` of tokens at window positions ``[n]`` and text indices ``[n]``."""
        if nll.numel() == 0:
            return
        for acc, sel in ((self.total, slice(None)), (self.inside, positions < self.trained),
                         (self.beyond, positions >= self.trained), (self.text_beyond, text_positions >= self.trained)):
            part = nll[sel]
            acc[0] += float(part.sum())
            acc[1] += int(part.numel())
        where = text_positions if self.segment_by_text else positions
        for size, table in ((self.segment, self.segments), (self.bucket, self.buckets)):
            index = torch.div(where, size, rounding_mode="floor")
            sums = torch.zeros(int(index.max()) + 1, dtype=torch.float64).index_add_(0, index, nll.double())
            counts = torch.bincount(index, minlength=sums.numel())
            for i in counts.nonzero().flatten().tolist():
                acc = table.setdefault(i, [0.0, 0])
                acc[0] += float(sums[i])
                acc[1] += int(counts[i])

    def summary(self) -> dict:
        return {
            "ppl": _ppl(self.total), "ppl_in_window": _ppl(self.inside), "ppl_beyond": _ppl(self.beyond),
            "ppl_text_beyond": _ppl(self.text_beyond), "segments_by": "text" if self.segment_by_text else "window",
            "tokens_scored": int(self.total[1]), "tokens_in_window": int(self.inside[1]),
            "tokens_beyond": int(self.beyond[1]),
            "segments": [{"start": s * self.segment, "end": (s + 1) * self.segment, "ppl": _ppl(acc),
                          "tokens": int(acc[1])} for s, acc in sorted(self.segments.items())],
            "bucket": self.bucket,
            "bucket_nll": {str(b * self.bucket): round(acc[0] / acc[1], 6) for b, acc in sorted(self.buckets.items())},
        }


def _ppl(acc: list[float]) -> float | None:
    return math.exp(acc[0] / acc[1]) if acc[1] else None


def plan_windows(num_tokens: int, length: int, protocol: str, stride: int | None = None,
                 windows: int = 1) -> list[tuple[int, int, int]]:
    """The windows to run: ``(begin, end, first_scored)`` with first_scored the window index of
    the first scored target (targets are window indices 1..end-begin-1).

    single: ``windows`` consecutive disjoint windows of ``length`` tokens from the start.
    sliding: ``range(0, N, stride)``; each window scores only targets not scored before.
    """
    if length < 2:
        raise ValueError(f"length must be >= 2 tokens, got {length}")
    if protocol == "single":
        if windows < 1:
            raise ValueError(f"windows must be >= 1, got {windows}")
        if windows * length > num_tokens:
            raise ValueError(f"the text has {num_tokens} tokens; {windows} window(s) of {length} need "
                             f"{windows * length}")
        return [(w * length, (w + 1) * length, 1) for w in range(windows)]
    if protocol != "sliding":
        raise ValueError(f"protocol must be 'single' or 'sliding', got {protocol!r}")
    if stride is None or stride < 1 or stride > length:
        raise ValueError(f"sliding stride must be in [1, length={length}], got {stride}")
    plan, prev_end = [], 0
    for begin in range(0, num_tokens, stride):
        end = min(begin + length, num_tokens)
        if end - begin < 2:
            break
        plan.append((begin, end, max(1, prev_end - begin)))
        prev_end = end
        if end == num_tokens:
            break
    return plan


def evaluate_perplexity(model, tokens: torch.Tensor, length: int, *, trained: int, protocol: str = "single",
                        stride: int | None = None, windows: int = 1, segment: int = 4096, bucket: int = 256,
                        progress: Progress | None = None) -> dict:
    """Perplexity of ``tokens`` (long ``[N]``) with windows of ``length``; returns the metrics dict
    (``ppl``, ``ppl_in_window``, ``ppl_beyond``, counts, ``segments``, ``bucket_nll`` (mean NLL per
    ``bucket`` positions, keyed by the bucket's first position), ``seconds``, ``peak_mem_mb``).
    ``progress`` advances by one per layer of each window."""
    plan = plan_windows(int(tokens.shape[0]), length, protocol, stride, windows)
    nll_of = model.window_nll if hasattr(model, "window_nll") else lambda ids, on_layer: window_nll(
        model, ids, on_layer=on_layer)  # a runner (ropekit.eval.runners) or a LlamaModel
    tally = NllTally(trained=trained, segment=segment, segment_by_text=protocol == "sliding", bucket=bucket)
    on_layer = (lambda i: progress.update(1)) if progress is not None else None
    start = time.perf_counter()
    with PeakMemory() as mem:
        for begin, end, first in plan:
            nll = nll_of(tokens[begin:end], on_layer)  # targets at window positions 1..end-begin-1
            positions = torch.arange(1, end - begin)
            keep = positions >= first
            tally.add(nll[keep], positions[keep], begin + positions[keep])
    return {**tally.summary(), "windows_run": len(plan), "seconds": round(time.perf_counter() - start, 2),
            "peak_mem_mb": round(mem.peak_mb, 1), "peak_mem_delta_mb": round(mem.delta_mb, 1)}
