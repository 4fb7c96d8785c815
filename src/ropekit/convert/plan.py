"""``plan_extension(base, target_length)``: for every method family, the parameters that reach a target length.

For a model trained on L tokens whose own rope is ``base`` and a target of N tokens (s = N / L):

- ``linear``: factor s (every pair interpolated by s: in-window positions are compressed);
- ``ntk``: factor s (base * s^(d/(d-2)); the lowest pair interpolated by s, high pairs untouched;
  nominal s tends to under-reach, so the plan also lists 2s);
- ``dynamic``: factor 1, cache-consistent (unchanged up to L, the NTK base for the current length
  past it; ``+consistent`` keeps every cached key at the current base);
- ``yarn``: factor s from L (pairs below the ramp interpolated, above kept, scores times mscale^2);
- ``llama3``: factor s, low/high frequency factors 1 / 4, from L;
- ``self-extend``: window W = L/2, group G = ceil((N - W) / (L - W)) (reach (L - W) * G + W >= N);
- ``leaky-rerope``: window w = L/2, leak k = (N - w) / (L - 1 - w) (distance N maps to L - 1);
- ``dca``: chunk size S = 3L/4, local window W = L/8 (ChunkLlama's defaults; any length).

"What changes inside the trained window" comes from the frequencies (which pairs turn slower
than the model's own, by how much, the attention temperature) or from the distance map (which
in-window distances an attention variant remaps).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from ropekit.method import parse_method
from ropekit.rope import RopeConfig


@dataclass
class Candidate:
    """One family's parameters for the target length and what they change."""

    family: str
    method: str
    reach: int
    in_window: str
    notes: list[str] = field(default_factory=list)


def _format(x: float) -> str:
    return f"{x:.4g}"


def frequency_changes(base: RopeConfig, rope: RopeConfig) -> str:
    """What a rope type changes inside the trained window, from its frequencies against ``base``'s."""
    own, _ = base.frequencies()
    new, attention = rope.frequencies(base.original_max_position_embeddings)
    ratio = (new.double() / own.double()).clamp(max=1.0)
    slowed = int((ratio < 1 - 1e-6).sum())
    parts = [f"{slowed}/{ratio.numel()} pairs turn slower (strongest: 1/{_format(1 / float(ratio.min()))})"
             if slowed else "no pair changes inside the trained length"]
    if not math.isclose(attention, 1.0):
        parts.append(f"every score times {_format(attention ** 2)} (cos/sin times {_format(attention)})")
    return "; ".join(parts)


def least_group(trained: int, target_length: int, window: int) -> int:
    """The smallest Self-Extend group G whose reach ``(L - W) * G + W`` is at least N."""
    return max(1, math.ceil((target_length - window) / (trained - window)))


def least_leak(trained: int, target_length: int, window: int) -> float:
    """The Leaky ReRoPE leak k that maps distance N to L - 1: ``(N - w) / (L - 1 - w)``."""
    return (target_length - window) / (trained - 1 - window)


def plan_extension(base: RopeConfig, target_length: int) -> list[Candidate]:
    """The candidates for ``target_length`` tokens on a model whose rope is ``base`` (trained length L)."""
    trained = base.original_max_position_embeddings
    if not trained:
        raise ValueError("the model's trained length is unknown (no max_position_embeddings)")
    if not isinstance(target_length, int) or target_length <= trained:
        raise ValueError(f"--target-length must be an integer above the trained length {trained}, got {target_length}")
    if target_length > 2**31:
        raise ValueError(f"--target-length must be at most 2**31, got {target_length}")
    s = target_length / trained
    factor = f"{math.ceil(s * 1000) / 1000:g}"  # rounded up: the factor reaches the target
    out: list[Candidate] = []

    def rope_type(family: str, method: str, notes: list[str] | None = None) -> None:
        rope = parse_method(method).rope_config(base)
        out.append(Candidate(family, method, target_length, frequency_changes(base, rope), notes or []))

    rope_type("linear", f"linear:factor={factor}")
    rope_type("ntk", f"ntk:factor={factor}")
    rope_type("ntk", f"ntk:factor={math.ceil(2 * s * 1000) / 1000:g}",
              ["nominal NTK under-reaches; twice the factor is common"])
    out.append(Candidate("dynamic", "dynamic:factor=1+consistent", target_length,
                         "nothing up to the trained length; past it the NTK base for the current length",
                         ["cache-consistent: every cached key at the current base (ropekit only); plain "
                          "'dynamic:factor=1' is transformers' own (stale cached keys)"]))
    rope_type("yarn", f"yarn:factor={factor},original_max_position_embeddings={trained}")
    rope_type("llama3", f"llama3:factor={factor},low_freq_factor=1,high_freq_factor=4,"
                        f"original_max_position_embeddings={trained}")
    window = trained // 2
    group = least_group(trained, target_length, window)
    out.append(Candidate("self-extend", f"self-extend:group={group},window={window}",
                         (trained - window) * group + window,
                         f"distances below {window} exact; distances {window}..{trained - 1} grouped by {group} "
                         f"(positions floor(p/{group}))"))
    k = math.ceil(least_leak(trained, target_length, window) * 100) / 100
    out.append(Candidate("leaky-rerope", f"leaky-rerope:window={window},k={k:g}",
                         int(window + (trained - 1 - window) * k),
                         f"distances below {window} exact; distance r >= {window} seen as "
                         f"{window} + (r - {window})/{k:g}"))
    chunk, local = 3 * trained // 4, trained // 8  # ChunkLlama's defaults
    if local >= 1:
        span = chunk - local
        out.append(Candidate("dca", f"dca:chunk={chunk},local={local}", target_length,
                             f"distances within a chunk of {span} tokens exact; across chunk boundaries remapped "
                             f"(a key one chunk back seen at most {chunk} away, older ones at "
                             f"{min(2 * span - 1, chunk)} minus their place in their chunk)",
                             ["reach unlimited: no distance exceeds the chunk size; ropekit only (no other runtime "
                              "runs Dual Chunk Attention today)"]))
    for candidate in out:
        parse_method(candidate.method)  # every candidate is a valid method
    return out


def rank(measured: list[dict]) -> list[dict]:
    """Measured candidates best first: by perplexity beyond the trained length, then in-window cost."""
    return sorted(measured, key=lambda r: (r.get("ppl_beyond") or math.inf, r.get("ppl_in_window") or math.inf))
