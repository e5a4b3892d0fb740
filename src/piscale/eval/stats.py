"""Interval estimates for report cells: the Wilson score interval of an
accuracy over problems, and the normal interval of a paired difference
between two algorithms' per-problem scores."""

from __future__ import annotations

import math
from collections.abc import Sequence

Z_95 = 1.959963984540054
"""The 0.975 quantile of the standard normal distribution."""


def wilson_interval(mean: float, n: int, z: float = Z_95) -> tuple[float, float]:
    """The Wilson score interval of a proportion ``mean`` observed over ``n`` trials."""
    if n < 1:
        raise ValueError(f"an interval needs at least one observation, got n={n}")
    if not 0.0 <= mean <= 1.0:
        raise ValueError(f"a proportion must be in [0, 1], got {mean}")
    z2 = z * z
    centre = (mean + z2 / (2 * n)) / (1 + z2 / n)
    half = z / (1 + z2 / n) * math.sqrt(mean * (1 - mean) / n + z2 / (4 * n * n))
    return max(0.0, centre - half), min(1.0, centre + half)


def paired_difference(reference: Sequence[float], other: Sequence[float], z: float = Z_95) -> tuple[float, float, float]:
    """Mean of ``reference[i] - other[i]`` and its normal 95% interval
    (z times the standard error of the mean difference)."""
    if len(reference) != len(other) or not reference:
        raise ValueError("paired scores need the same, non-zero number of problems on both sides")
    differences = [a - b for a, b in zip(reference, other)]
    n = len(differences)
    mean = sum(differences) / n
    variance = sum((d - mean) ** 2 for d in differences) / (n - 1) if n > 1 else 0.0
    half = z * math.sqrt(variance / n)
    return mean, mean - half, mean + half
