"""Why a transformer needs position encoding: attention without it cannot tell word order.

The seed's toy: vocabulary 5, width 10, 2 heads (head dim 5), plain Q/K/V projections and
softmax attention. Tokens [1, 2, 3] and [2, 1, 3] give the same output rows, swapped; the last
row, the one that predicts the next token, is the same. Then the caveats: a causal mask breaks
the permutation for earlier rows; RoPE changes the last row. Finally the real model, with RoPE
switched off and a bidirectional mask (through the model's ``set_attention`` hook), predicts
the same next-token distribution for any order of the earlier prompt tokens.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch

from ropekit.demos.common import (
    DEFAULT_MODEL,
    DemoResult,
    ModelArg,
    explain,
    format_top,
    get_model,
    heading,
    top_tokens,
    using_attention,
)
from ropekit.rope import RopeConfig, apply_rotary, rope_cos_sin

VOCAB, WIDTH, HEADS = 5, 10, 2
ORDER_A, ORDER_B = [1, 2, 3], [2, 1, 3]
PERM = [1, 0, 2]  # ORDER_B == ORDER_A[PERM], so rows of B should be rows of A taken in this order
# float32, 3 keys: the only difference a reordering can make is the order of the sums over keys
# in softmax and in weights @ V, a few ulp of outputs of size ~1.
TOY_TOLERANCE = 1e-6
MODEL_PROMPT = "The capital of France is"


@dataclass(frozen=True)
class ToyWeights:
    """Embedding ``[V, C]`` and projections ``[C, C]`` of a one-layer attention toy."""

    embed: torch.Tensor
    wq: torch.Tensor
    wk: torch.Tensor
    wv: torch.Tensor

    @classmethod
    def random(cls, seed: int = 0, vocab: int = VOCAB, width: int = WIDTH) -> ToyWeights:
        g = torch.Generator().manual_seed(seed)
        embed = torch.randn(vocab, width, generator=g)
        wq, wk, wv = (torch.randn(width, width, generator=g) / math.sqrt(width) for _ in range(3))
        return cls(embed, wq, wk, wv)


def toy_attention(tokens: list[int], w: ToyWeights, *, heads: int = HEADS, causal: bool = False,
                  rope: bool = False) -> torch.Tensor:
    """One attention layer on ``tokens``: output ``[T, C]`` (float32).

    With ``rope``, q and k are rotated at positions 0..T-1. The head dim C/H = 5 is odd, so RoPE
    turns its first 4 channels (2 pairs, base 10000) and passes the 5th through, as partial
    rotary does.
    """
    x = w.embed[torch.tensor(tokens)]  # [T, C]
    T, C = x.shape
    D = C // heads

    def split(t: torch.Tensor) -> torch.Tensor:
        return t.view(1, T, heads, D).transpose(1, 2)  # [T, C] -> [1, H, T, D]

    q, k, v = split(x @ w.wq), split(x @ w.wk), split(x @ w.wv)
    if rope:
        inv_freq, _ = RopeConfig(head_dim=2 * (D // 2)).frequencies()
        cos, sin = rope_cos_sin(inv_freq, torch.arange(T))  # (T, D//2)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
    scores = q @ k.transpose(-1, -2) / math.sqrt(D)  # [1, H, T, T]
    if causal:
        scores = scores.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf"))
    out = scores.softmax(dim=-1) @ v  # [1, H, T, D]
    return out.transpose(1, 2).reshape(T, C)


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max())


def toy_part(result: DemoResult) -> None:
    heading("toy attention: vocabulary 5, width 10, 2 heads, no position encoding")
    w = ToyWeights.random()
    plain_a, plain_b = toy_attention(ORDER_A, w), toy_attention(ORDER_B, w)
    for tokens, out in ((ORDER_A, plain_a), (ORDER_B, plain_b)):
        print(f"  tokens {tokens} -> output rows:")
        for row, token in enumerate(tokens):
            print(f"    row {row + 1} (token {token}): " + " ".join(f"{v:+.4f}" for v in out[row].tolist()))
    swap = max_diff(plain_b, plain_a[PERM])
    last = max_diff(plain_b[-1], plain_a[-1])
    exact, last_exact = bool(torch.equal(plain_b, plain_a[PERM])), bool(torch.equal(plain_b[-1], plain_a[-1]))
    result.numbers.update(toy_swap_diff=swap, toy_last_row_diff=last, toy_bitwise=exact,
                          toy_last_row_bitwise=last_exact)
    print(f"  bit-for-bit: all rows {'yes' if exact else 'no'}, last row {'yes' if last_exact else 'no'}")
    result.check("no mask, no RoPE: rows 1 and 2 swap, row 3 (the last token) is unchanged",
                 swap <= TOY_TOLERANCE,
                 f"max |B - A[1,0,2]| = {swap:.1e} <= {TOY_TOLERANCE:g}: a reordering only changes the "
                 "order of float32 sums over keys")

    causal_a, causal_b = toy_attention(ORDER_A, w, causal=True), toy_attention(ORDER_B, w, causal=True)
    causal_last = max_diff(causal_b[-1], causal_a[-1])
    causal_early = max_diff(causal_b[:2], causal_a[PERM][:2])
    result.numbers.update(causal_last_row_diff=causal_last, causal_early_rows_diff=causal_early)
    explain("Caveat 1: with a causal mask token t sees only tokens 0..t. The last token still sees the\n"
            "same set {1, 2, 3}, but the first two rows now see different sets.")
    result.check("causal mask: the last row still agrees", causal_last <= TOY_TOLERANCE,
                 f"max diff {causal_last:.1e}")
    result.check("causal mask: rows 1-2 are no longer a permutation of the originals",
                 causal_early > 1e3 * TOY_TOLERANCE, f"max |B[:2] - A[1,0][:2]| = {causal_early:.3f}")

    rope_a, rope_b = toy_attention(ORDER_A, w, rope=True), toy_attention(ORDER_B, w, rope=True)
    rope_last = max_diff(rope_b[-1], rope_a[-1])
    result.numbers["rope_last_row_diff"] = rope_last
    explain("Caveat 2: with RoPE (no mask) the score of the last token with each key depends on their\n"
            "distance, and swapping tokens 1 and 2 changes those distances.")
    result.check("RoPE: the last row changes", rope_last > 1e3 * TOY_TOLERANCE, f"max diff {rope_last:.3f}")


# --- the real model ---------------------------------------------------------------------------


def position_free_method(rope: bool, causal: bool):
    """An ``EngineAttention`` for the demo: RoPE on or off, causal or bidirectional (no cache).

    It plugs into the model's documented extension point (``model.set_attention``).
    """
    from ropekit.attention import sdpa
    from ropekit.model.attention import RopeAttention

    class PositionProbe(RopeAttention):
        name = f"{'rope' if rope else 'no-rope'}-{'causal' if causal else 'bidirectional'}"

        def prepare(self, context) -> None:
            if context.cache is not None:
                raise ValueError("the position probe does not support a KV cache")
            if rope:
                super().prepare(context)

        def attend(self, layer_idx, q, k, v, context):
            if rope:
                q, k = apply_rotary(q, context.cos, context.sin), apply_rotary(k, context.cos, context.sin)
            # mask None: causal by slot; an all-True mask: every token sees every other (bidirectional)
            everyone = torch.ones(1, 1, q.shape[2], k.shape[2], dtype=torch.bool, device=q.device)
            return sdpa(q, k, v, None if causal else everyone)

    return PositionProbe()


def reorder_earlier(ids: list[int]) -> list[int]:
    """The earlier prompt tokens reversed, the last token kept last."""
    return ids[-2::-1] + ids[-1:]


def next_token_log_probs(model, ids: list[int]) -> torch.Tensor:
    """log p(next token | ids), ``(V,)`` float32."""
    with torch.no_grad():
        logits = model(torch.tensor([ids]), logits_to_keep=1)  # [1, 1, V]
    return logits[0, -1].log_softmax(-1)


def model_part(result: DemoResult, model_arg: ModelArg, prompt: str = MODEL_PROMPT) -> None:
    heading("the real model: next-token distribution for two orders of the same prompt tokens")
    model, tokenizer = get_model(model_arg)
    ids_a = tokenizer.encode(prompt)
    if len(ids_a) < 3:
        raise ValueError(f"prompt {prompt!r} needs at least 3 tokens to reorder, got {len(ids_a)}")
    ids_b = reorder_earlier(ids_a)
    print(f"  order A: {tokenizer.decode(ids_a)!r}   order B: {tokenizer.decode(ids_b)!r} (same last token)")
    # float32 through 30 layers: a reordering changes sum orders inside attention, ~1e-5 in log p.
    tolerance = 1e-3
    rows = {}
    for rope in (False, True):
        for causal in (False, True):
            with using_attention(model, position_free_method(rope, causal)):
                lp_a, lp_b = next_token_log_probs(model, ids_a), next_token_log_probs(model, ids_b)
            rows[rope, causal] = (lp_a, lp_b, max_diff(lp_a, lp_b))
    print("  max |log p_A - log p_B| over the vocabulary:")
    for (rope, causal), (_, _, diff) in rows.items():
        mask = "causal mask  " if causal else "bidirectional"
        print(f"    RoPE {'on ' if rope else 'off'}, {mask}: {diff:.2e}")
    free_a, free_b, free_diff = rows[False, False]
    rope_a, rope_b, rope_diff = rows[True, True]
    print(f"  RoPE off, bidirectional, top-5 A: {format_top(top_tokens(tokenizer, free_a))}")
    print(f"  RoPE off, bidirectional, top-5 B: {format_top(top_tokens(tokenizer, free_b))}")
    print(f"  RoPE on (the real model), top-5 A: {format_top(top_tokens(tokenizer, rope_a))}")
    print(f"  RoPE on (the real model), top-5 B: {format_top(top_tokens(tokenizer, rope_b))}")
    result.numbers.update(model_free_diff=free_diff, model_rope_diff=rope_diff,
                          model_rope_bidirectional_diff=rows[True, False][2],
                          model_causal_norope_diff=rows[False, True][2])
    result.check("RoPE off + bidirectional mask: the next-token distribution ignores the order",
                 free_diff <= tolerance,
                 f"max |diff log p| = {free_diff:.1e} <= {tolerance:g} (float32 sums)")
    result.check("RoPE on: the next-token distribution depends on the order",
                 rope_diff > 100 * tolerance, f"max |diff log p| = {rope_diff:.2f}")
    result.check("RoPE alone (bidirectional mask) already breaks the invariance",
                 rows[True, False][2] > 100 * tolerance, f"max |diff log p| = {rows[True, False][2]:.2f}")


def run(fast: bool = False, plot_dir: Path | None = None,
        model: ModelArg | None = DEFAULT_MODEL) -> DemoResult:
    """Permutation equivariance of attention without position encoding, on the toy and the real model.

    ``model=None`` skips the real-model part. ``fast`` changes nothing here (it is quick).
    """
    result = DemoResult("permutation")
    explain("Self-attention without position encoding is permutation-equivariant: reorder the input\n"
            "tokens and the output rows are reordered the same way, with the same values. The last\n"
            "row, which predicts the next token, then depends only on the set of earlier tokens.")
    toy_part(result)
    if model is None:
        result.skip("real-model part (no model given)")
    else:
        model_part(result, model)
    return result
