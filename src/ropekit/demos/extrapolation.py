"""Length extrapolation: which rotary dimensions meet unseen angles, and what scaling does to them.

Pair i turns by theta_i per token, so within the trained length L it completes L*theta_i/(2 pi)
turns. Pairs whose wavelength 2 pi/theta_i exceeds L never complete a turn in training: past L
they meet angles the model never saw. Their count gives the "critical dimension" of Liu et al.
2023 ("Scaling Laws of RoPE-based Extrapolation", arXiv 2310.05209):
d_extra = 2 * ceil(d/2 * log_base(L / (2 pi))). Context-extension methods stretch the
wavelengths of (some of) those pairs so that the longer text maps back into trained angles.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import torch

from ropekit.defaults import default_text_path
from ropekit.demos.common import (
    DEFAULT_MODEL,
    DemoResult,
    ModelArg,
    explain,
    get_model,
    heading,
    new_figure,
    save_plot,
    using_rope,
)
from ropekit.eval.perplexity import window_nll
from ropekit.rope import RopeConfig

# The default model's rope (SmolLM2-135M): head_dim 64, base 100000, trained length 8192.
MODEL_ROPE = RopeConfig(head_dim=64, rope_theta=100000.0, max_position_embeddings=8192)
SCALE = 4
ROPE_SCALINGS = {
    "linear (PI)": f"linear:factor={SCALE}",
    "NTK-aware": f"ntk:factor={SCALE}",
    "YaRN": f"yarn:factor={SCALE}",
    "Llama 3": f"llama3:factor={SCALE},low_freq_factor=1,high_freq_factor=4",
}
# The inv_freq tables are float32: ratios of wavelengths agree to float32 rounding.
RATIO_TOLERANCE = 1e-6

WINDOW = 16384  # 2x the trained length
BUCKET = 1024
MODEL_SCALINGS = ("yarn:factor=2",)


# --- pure maths ---------------------------------------------------------------------------------


def wavelengths(inv_freq: torch.Tensor) -> torch.Tensor:
    """lambda_i = 2 pi / theta_i in tokens, float64, ``(R/2,)``."""
    return 2 * math.pi / inv_freq.double()


def critical_pairs(inv_freq: torch.Tensor, trained_len: int) -> torch.Tensor:
    """Indices of the pairs that complete less than one turn within ``trained_len`` tokens."""
    return torch.nonzero(wavelengths(inv_freq) > trained_len).flatten()


def critical_dimension(head_dim: int, base: float, trained_len: int) -> int:
    """Liu et al. 2023, closed form: d_extra = 2 * ceil(d/2 * log_base(L / (2 pi)))."""
    return 2 * math.ceil(head_dim / 2 * math.log(trained_len / (2 * math.pi)) / math.log(base))


def wavelength_ratio(scaled: torch.Tensor, original: torch.Tensor) -> torch.Tensor:
    """lambda'_i / lambda_i = theta_i / theta'_i, float64."""
    return original.double() / scaled.double()


def stays_in_trained_range(scaled: torch.Tensor, original: torch.Tensor, target_len: int,
                           trained_len: int) -> torch.Tensor:
    """Bool per pair: its largest angle at ``target_len`` is no larger than at ``trained_len`` unscaled."""
    return scaled.double() * target_len <= original.double() * trained_len * (1 + RATIO_TOLERANCE)


# --- the rope tables ----------------------------------------------------------------------------


def critical_part(result: DemoResult) -> None:
    rope, L = MODEL_ROPE, MODEL_ROPE.max_position_embeddings
    heading(f"critical dimension: head_dim {rope.head_dim}, base {rope.rope_theta:g}, trained length {L}")
    inv_freq, _ = rope.frequencies()
    lam = wavelengths(inv_freq)
    critical = critical_pairs(inv_freq, L)
    first = int(critical[0]) if len(critical) else rope.rotary_dim // 2
    print("  pair i   channels      wavelength   turns in L")
    for i in [0, 1, 8, 16, first - 2, first - 1, first, first + 1, rope.rotary_dim // 2 - 1]:
        marker = "  <- unseen angles past L" if i >= first else ""
        print(f"  {i:>6}   ({i:>2}, {i + rope.rotary_dim // 2:>2})   {float(lam[i]):>12,.1f}   "
              f"{L / float(lam[i]):>10.3f}{marker}")
    closed_form = critical_dimension(rope.rotary_dim, rope.rope_theta, L)
    result.numbers.update(critical_pairs=critical.tolist(), critical_first_pair=first,
                          critical_dimension=2 * first, critical_closed_form=closed_form)
    print(f"  {len(critical)} of {rope.rotary_dim // 2} pairs (pairs {first}..{rope.rotary_dim // 2 - 1}) "
          f"never complete a turn in {L} tokens")
    result.check("critical dimension from the frequency table = Liu et al.'s closed form",
                 2 * first == closed_form,
                 f"2 * {first} = {2 * first}; 2*ceil(d/2*log_b(L/2pi)) = {closed_form}")


def methods_part(result: DemoResult, plot_dir: Path | None) -> None:
    rope, L = MODEL_ROPE, MODEL_ROPE.max_position_embeddings
    heading(f"how scaling by s = {SCALE} changes each pair's wavelength")
    inv_freq, _ = rope.frequencies()
    lam = wavelengths(inv_freq)
    critical = lam > L
    ratios, in_range = {}, {}
    for label, spec in ROPE_SCALINGS.items():
        scaled, _ = rope.with_rope_type(spec).frequencies()
        ratios[label] = wavelength_ratio(scaled, inv_freq)
        in_range[label] = stays_in_trained_range(scaled, inv_freq, SCALE * L, L)
    print(f"  {'method':<12} {'pair 0':>8} {'pair 16':>8} {'pair 20':>8} {'pair 31':>8}   "
          f"critical pairs kept within trained angles at {SCALE}L")
    for label, ratio in ratios.items():
        kept = int((in_range[label] & critical).sum())
        print(f"  {label:<12} " + " ".join(f"{float(ratio[i]):>8.3f}" for i in (0, 16, 20, 31))
              + f"   {kept}/{int(critical.sum())}")
    result.numbers["wavelength_ratios"] = {k: v.tolist() for k, v in ratios.items()}
    result.numbers["critical_kept"] = {k: int((v & critical).sum()) for k, v in in_range.items()}
    explain("Rows give lambda'/lambda: 1 = unchanged, s = fully interpolated.")

    def close(a: torch.Tensor, b: float) -> bool:
        return bool(((a - b).abs() <= RATIO_TOLERANCE * b).all())

    lin, ntk, yarn, llama3 = (ratios[k] for k in ROPE_SCALINGS)
    result.check("linear stretches every wavelength by s", close(lin, SCALE))
    result.check("NTK keeps pair 0 and stretches the last pair by exactly s",
                 close(ntk[:1], 1.0) and close(ntk[-1:], SCALE), f"{float(ntk[0]):.4f}, {float(ntk[-1]):.4f}")
    result.check("YaRN keeps pairs with lambda < L/32 and stretches those with lambda > L by s",
                 close(yarn[lam < L / 32], 1.0) and close(yarn[lam > L], SCALE))
    result.check("Llama 3 keeps pairs with lambda < L/4 and stretches those with lambda > L by s",
                 close(llama3[lam < L / 4], 1.0) and close(llama3[lam > L], SCALE))
    if plot_dir is not None:
        fig, ax = new_figure()
        pairs = torch.arange(len(lam)).numpy()
        ax.plot(pairs, (lam / L).numpy(), "k-", lw=2, label="default (no scaling)")
        for label, ratio in ratios.items():
            ax.plot(pairs, (lam * ratio / L).numpy(), marker=".", lw=1, label=f"{label}, s={SCALE}")
        ax.axhline(1, color="grey", ls="--", lw=0.8)
        ax.axhline(SCALE, color="grey", ls=":", lw=0.8)
        ax.text(0, 1.1, "one turn in the trained length", fontsize=8, color="grey")
        ax.text(0, SCALE * 1.1, f"one turn in {SCALE}x the trained length", fontsize=8, color="grey")
        ax.set(yscale="log", xlabel="rotary pair i", ylabel="wavelength / trained length (8192)",
               title="RoPE wavelengths, head_dim 64, base 1e5")
        ax.legend(fontsize=8)
        save_plot(fig, plot_dir, "extrapolation_wavelengths.png", result)


# --- the real model -----------------------------------------------------------------------------


def token_nll(model, ids: torch.Tensor) -> torch.Tensor:
    """-log p(ids[t+1] | ids[..t]) for t < T-1, ``(T-1,)``; ids ``(T,)`` long (the lab's ``window_nll``:
    one forward, logits in chunks, so a ``T x V`` matrix never exists)."""
    return window_nll(model, ids).float()


def bucket_means(nll: torch.Tensor, bucket: int) -> torch.Tensor:
    """Mean of consecutive ``bucket``-sized slices (the last one may be shorter)."""
    return torch.stack([chunk.mean() for chunk in nll.split(bucket)])


def load_window(tokenizer, window: int, text_path: Path | None = None) -> torch.Tensor:
    """The first ``window`` tokens of ``text_path`` (default: the shipped Pride and Prejudice), long."""
    text_path = text_path if text_path is not None else default_text_path()
    text = Path(text_path).read_text(encoding="utf-8")
    ids = tokenizer.encode(text[: 8 * window])  # English BPE: ~4 characters a token; skip the rest
    if len(ids) < window:
        raise ValueError(f"{text_path} has {len(ids)} tokens, fewer than the window {window}")
    return torch.tensor(ids[:window])


def model_part(result: DemoResult, plot_dir: Path | None, model_arg: ModelArg, window: int = WINDOW,
               scalings: tuple[str, ...] = MODEL_SCALINGS) -> None:
    model, tokenizer = get_model(model_arg)
    L = model.config.rope.original_max_position_embeddings or model.config.max_position_embeddings
    heading(f"the real model: next-token loss by position over one {window}-token window (trained {L})")
    ids = load_window(tokenizer, window)
    curves = {}
    for spec in ("default", *scalings):
        started = time.perf_counter()
        with using_rope(model, model.config.rope if spec == "default" else spec):
            curves[spec] = token_nll(model, ids)
        print(f"  {spec}: {time.perf_counter() - started:.0f} s")
    buckets = {spec: bucket_means(nll, BUCKET) for spec, nll in curves.items()}
    print(f"  mean loss (nats) per {BUCKET}-token bucket; '|' marks the trained length")
    for spec, means in buckets.items():
        cells = [f"{float(v):.2f}" + (" |" if (i + 1) * BUCKET == L else "") for i, v in enumerate(means)]
        print(f"  {spec:<16} " + " ".join(cells))
    inside = {spec: float(nll[L // 2:L - 1].mean()) for spec, nll in curves.items()}
    past = {spec: float(nll[L - 1:].mean()) for spec, nll in curves.items() if len(nll) >= L}
    result.numbers.update(loss_inside=inside, loss_past=past, window=window, trained_length=L)
    if window <= L:
        print(f"  the window ({window}) does not pass the trained length {L}: nothing to claim")
    else:
        base_past = past["default"]
        result.check("without scaling the loss past L rises above the loss before it",
                     base_past > inside["default"] + 0.1,
                     f"mean loss {inside['default']:.2f} on [L/2, L) vs {base_past:.2f} on [L, {window})")
        for spec in scalings:
            result.check(f"{spec} keeps the loss past L lower than no scaling", past[spec] < base_past,
                         f"{past[spec]:.2f} vs {base_past:.2f}")
    if plot_dir is not None:
        fig, ax = new_figure()
        for spec, means in buckets.items():
            centers = (torch.arange(len(means)) + 0.5) * BUCKET
            ax.plot(centers.numpy(), means.numpy(), marker="o", label=spec)
        ax.axvline(L, color="grey", ls="--", lw=0.8, label=f"trained length {L}")
        ax.set(xlabel="position in the window", ylabel=f"mean next-token loss per {BUCKET} tokens (nats)",
               title=f"{Path(str(model_arg)).name if not isinstance(model_arg, tuple) else 'model'}: "
                     "loss past the trained length")
        ax.legend()
        save_plot(fig, plot_dir, "extrapolation_loss.png", result)


def run(fast: bool = False, plot_dir: Path | None = None, model: ModelArg | None = DEFAULT_MODEL,
        window: int = WINDOW) -> DemoResult:
    """Critical dimension, wavelengths under each method, and (not in fast mode) the real model's loss."""
    result = DemoResult("extrapolation")
    explain("A model trained on texts of length L never saw a position past L. For RoPE what matters is\n"
            "the angle each rotary pair reaches: fast pairs cycle through all angles many times within L,\n"
            "slow pairs do not finish one turn, and past L they meet angles they never saw.")
    critical_part(result)
    methods_part(result, plot_dir)
    if model is None:
        result.skip("real-model loss curve (no model given)")
    elif fast:
        result.skip(f"real-model loss curve: needs a window past the trained length ({window} tokens, "
                    "several minutes on a CPU); run without --fast")
    else:
        model_part(result, plot_dir, model, window)
    return result
