"""Small statistics for the lab's records: the Wilson score interval of an accuracy."""

from __future__ import annotations

import math

Z95 = 1.959963984540054  # the standard normal's 97.5% quantile: a two-sided 95% interval


def wilson_interval(correct: int, trials: int, z: float = Z95) -> tuple[float, float]:
    """The Wilson score interval (Wilson 1927) of a proportion of ``correct`` out of ``trials``: the
    probabilities p for which |correct/trials - p| <= z * sqrt(p (1 - p) / trials), i.e.

        (p̂ + z²/2n ± z sqrt(p̂(1 - p̂)/n + z²/4n²)) / (1 + z²/n),   p̂ = correct / n.

    Unlike p̂ ± z sqrt(p̂(1 - p̂)/n) it stays inside [0, 1] and is not empty at 0/n or n/n, which is
    what small passkey cells (1-10 trials) produce. ``trials`` 0 gives (0, 1): nothing is known.
    """
    if trials < 0 or not 0 <= correct <= trials:
        raise ValueError(f"need 0 <= correct <= trials, got {correct}/{trials}")
    if trials == 0:
        return 0.0, 1.0
    n, p = trials, correct / trials
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return max(0.0, centre - half), min(1.0, centre + half)
