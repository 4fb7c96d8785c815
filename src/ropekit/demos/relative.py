"""RoPE turns absolute positions into relative ones, and its scores decay with distance.

Rotating q to position m and k to position n multiplies pair i of each by e^{i m theta_i} and
e^{i n theta_i}, so their dot product is Re sum_i h_i e^{i (m-n) theta_i} with
h_i = q_i conj(k_i) (pairs read as complex numbers): only m - n survives. The RoFormer paper
(Su et al. 2021, Sec. 3.4.3) bounds that sum by Abel summation:
|sum_i h_i e^{i r theta_i}| <= max_i |h_{i+1} - h_i| * sum_j |S_j(r)|, S_j(r) = sum_{i<j} e^{i r theta_i},
and the "relative upper bound" mean_j |S_j(r)| falls as the distance r grows.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from ropekit.demos.common import DemoResult, explain, heading, new_figure, save_plot
from ropekit.rope import RopeConfig, apply_rotary, rope_cos_sin

# The default model's rope (SmolLM2-135M): head_dim 64, base 100000, trained length 8192.
MODEL_ROPE = RopeConfig(head_dim=64, rope_theta=100000.0, max_position_embeddings=8192)
ROFORMER_ROPE = RopeConfig(head_dim=128, rope_theta=10000.0)  # the setting of RoFormer's Figure 2
SHIFTS = (0, 1000, 10**6, 10**9)
M, N = 42, 17  # query and key positions before shifting
DECADES = ((0, 1), (1, 10), (10, 100), (100, 1000), (1000, 10000), (10000, 65537))


def as_complex(x: torch.Tensor) -> torch.Tensor:
    """Half layout pairs (x_i, x_{i+D/2}) as complex numbers: ``(D,)`` -> ``(D/2,)`` complex128."""
    half = x.shape[-1] // 2
    return torch.complex(x[..., :half].double(), x[..., half:].double())


def rope_score(q: torch.Tensor, k: torch.Tensor, m: int, n: int, inv_freq: torch.Tensor) -> float:
    """<R(m) q, R(n) k> with ropekit's float32 path (cos/sin from float64 angles); q, k ``(D,)``."""
    positions = torch.tensor([m, n])
    cos, sin = rope_cos_sin(inv_freq, positions)  # (2, D/2)
    qk = torch.stack([q, k]).view(1, 1, 2, -1)  # [B=1, H=1, T=2, D]
    rotated = apply_rotary(qk, cos, sin)[0, 0]  # [2, D]
    return float(rotated[0] @ rotated[1])


def naive_float32_score(q: torch.Tensor, k: torch.Tensor, m: int, n: int, inv_freq: torch.Tensor) -> float:
    """The same score with the angle table computed the common way, position * inv_freq in float32."""
    positions = torch.tensor([m, n], dtype=torch.float32)
    angles = positions[:, None] * inv_freq[None, :].float()  # (2, D/2), float32
    cos, sin = angles.cos(), angles.sin()
    qk = torch.stack([q, k]).view(1, 1, 2, -1)
    rotated = apply_rotary(qk, cos, sin)[0, 0]
    return float(rotated[0] @ rotated[1])


def relative_scores(q: torch.Tensor, k: torch.Tensor, distances: torch.Tensor,
                    inv_freq: torch.Tensor) -> torch.Tensor:
    """The oracle, from relative distances r = m - n alone: Re sum_i h_i e^{i r theta_i}, float64."""
    h = as_complex(q) * as_complex(k).conj()  # (D/2,)
    angles = distances.double()[:, None] * inv_freq.double()[None, :]  # (len(r), D/2)
    return (h[None, :] * torch.exp(1j * angles)).sum(dim=1).real


def relative_score(q: torch.Tensor, k: torch.Tensor, distance: int, inv_freq: torch.Tensor) -> float:
    """``relative_scores`` at one distance."""
    return float(relative_scores(q, k, torch.tensor([distance]), inv_freq)[0])


def partial_sums(inv_freq: torch.Tensor, distances: torch.Tensor) -> torch.Tensor:
    """S_j(r) = sum_{i<j} e^{i r theta_i} for j = 1..D/2: ``(len(distances), D/2)`` complex128."""
    angles = distances.double()[:, None] * inv_freq.double()[None, :]
    return torch.cumsum(torch.exp(1j * angles), dim=1)


def relative_upper_bound(inv_freq: torch.Tensor, distances: torch.Tensor) -> torch.Tensor:
    """RoFormer's relative upper bound (1/(D/2)) sum_j |S_j(r)|, one value per distance (float64)."""
    return partial_sums(inv_freq, distances).abs().mean(dim=1)


def abel_bound(q: torch.Tensor, k: torch.Tensor, inv_freq: torch.Tensor,
               distances: torch.Tensor) -> torch.Tensor:
    """max_i |h_{i+1} - h_i| * sum_j |S_j(r)| with h_{D/2} = 0: a bound on |score(r)| for this q, k."""
    h = as_complex(q) * as_complex(k).conj()
    steps = torch.cat([h, h.new_zeros(1)]).diff().abs().max()
    return steps * partial_sums(inv_freq, distances).abs().sum(dim=1)


def shift_part(result: DemoResult) -> None:
    heading("the score depends only on m - n")
    inv_freq, _ = MODEL_ROPE.frequencies()
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(MODEL_ROPE.head_dim, generator=g), torch.randn(MODEL_ROPE.head_dim, generator=g)
    expected = relative_score(q, k, M - N, inv_freq)
    # cos/sin are float32 (relative rounding 6e-8) and the score sums 64 float32 products:
    # the error is a few 1e-7 of |q||k|.
    tolerance = 1e-6 * float(q.norm() * k.norm())
    print(f"  head_dim {MODEL_ROPE.head_dim}, base {MODEL_ROPE.rope_theta:g}; "
          f"q at m, k at n, m - n = {M - N}")
    print(f"  oracle Re sum h_i e^(i (m-n) theta_i) (float64) = {expected:.6f}")
    print(f"  {'shift s':<15} {'m = 42+s':<15} {'n = 17+s':<15} {'ropekit score':<14} naive float32 angles")
    worst, naive_worst = 0.0, 0.0
    for shift in SHIFTS:
        score = rope_score(q, k, M + shift, N + shift, inv_freq)
        naive = naive_float32_score(q, k, M + shift, N + shift, inv_freq)
        worst, naive_worst = max(worst, abs(score - expected)), max(naive_worst, abs(naive - expected))
        print(f"  {shift:<15,d} {M + shift:<15,d} {N + shift:<15,d} {score:<14.6f} {naive:.6f}")
    result.numbers.update(relative_oracle=expected, relative_max_error=worst, naive_max_error=naive_worst,
                          relative_tolerance=tolerance)
    result.check("the same score at shifts 0, 1e3, 1e6, 1e9", worst <= tolerance,
                 f"max |score - oracle| = {worst:.1e} <= {tolerance:.1e}")
    explain("The last column computes the angles as float32 position * inv_freq, as many implementations\n"
            "do: at 1e9 float32 cannot even hold the position, and the score drifts. ropekit forms the\n"
            "angles in float64 and reduces them mod 2 pi before cos/sin.")
    print(f"  naive float32 angles: max |score - oracle| = {naive_worst:.2f}")


def decay_part(result: DemoResult, plot_dir: Path | None, fast: bool) -> None:
    heading("long-term decay (RoFormer Sec. 3.4.3)")
    inv_freq, _ = MODEL_ROPE.frequencies()
    pairs = inv_freq.shape[0]
    distances = torch.arange(0, 65537)
    bound = relative_upper_bound(inv_freq, distances)
    means = [float(bound[lo:hi].mean()) for lo, hi in DECADES]
    print("  relative upper bound mean_j |S_j(r)| (head_dim 64, base 100000), averaged over ranges of r:")
    for (lo, hi), mean in zip(DECADES, means, strict=True):
        print(f"    r in [{lo}, {hi}): {mean:6.2f}")
    result.numbers.update(decay_at_zero=float(bound[0]), decay_decade_means=means)
    result.check("at r = 0 the bound is its maximum (D/2 + 1)/2",
                 abs(float(bound[0]) - (pairs + 1) / 2) < 1e-9
                 and float(bound.max()) <= float(bound[0]) + 1e-9,
                 f"{float(bound[0]):.2f}")
    result.check("the bound falls with distance (each range's mean below the previous one)",
                 all(a > b for a, b in zip(means, means[1:], strict=False)),
                 " > ".join(f"{m:.2f}" for m in means))
    g = torch.Generator().manual_seed(1)
    trials = 4 if fast else 32
    holds = True
    checked = torch.arange(0, 8193)
    for _ in range(trials):
        q, k = torch.randn(64, generator=g), torch.randn(64, generator=g)
        scores = relative_scores(q, k, checked, inv_freq).abs()
        holds &= bool((scores <= abel_bound(q, k, inv_freq, checked) * (1 + 1e-12)).all())
    result.check(f"|q.R(r)k| <= max|h_(i+1) - h_i| * sum_j |S_j(r)| for {trials} random q, k and r = 0..8192",
                 holds)
    if plot_dir is not None:
        fig, ax = new_figure()
        r = torch.unique(torch.logspace(0, math.log10(65536), 4000).round().long())  # ~3500 distances
        for rope, label in ((MODEL_ROPE, "head_dim 64, base 1e5 (SmolLM2)"),
                            (ROFORMER_ROPE, "head_dim 128, base 1e4 (RoFormer Fig. 2)")):
            inv, _ = rope.frequencies()
            ax.plot(r.numpy(), (relative_upper_bound(inv, r) / (inv.shape[0] + 1) * 2).numpy(), lw=0.6,
                    label=label)
        ax.axvline(MODEL_ROPE.max_position_embeddings, color="grey", ls="--", lw=0.8,
                   label="trained length 8192")
        ax.set(xscale="log", xlabel="relative distance m - n",
               ylabel="relative upper bound / its value at 0", title="RoPE long-term decay")
        ax.legend()
        save_plot(fig, plot_dir, "relative_decay.png", result)


def run(fast: bool = False, plot_dir: Path | None = None) -> DemoResult:
    """Relative positions from absolute rotations, and the long-term decay bound."""
    result = DemoResult("relative")
    explain("RoPE rotates each pair i of q and k by position * theta_i. A dot product of two rotated\n"
            "vectors sees only the difference of their angles, so attention scores depend on relative\n"
            "positions although every token was rotated by its absolute position.")
    shift_part(result)
    decay_part(result, plot_dir, fast)
    return result
