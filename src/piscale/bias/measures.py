"""Bias as a distance between the property distributions of attribute values.

Liu et al. (2021) call a generator biased with respect to an attribute when
the property of its continuations (their political leaning) depends on the
attribute value in the prompt: the distributions P_a of the property score
for the values a (male, female) differ. With samples s_{a,k} of each:

* ``mean_difference`` Δ(a, b) = mean(s_a) - mean(s_b), signed;
* ``wasserstein`` W1(a, b) = ∫ |F_a(x) - F_b(x)| dx, the distance between the
  empirical distribution functions (0 when they are equal, exactly δ when
  one is the other shifted by δ);
* for each value, W1 to the neutral prompts' distribution.

``bias_report`` computes them with percentile bootstrap intervals. The unit
resampled is the prompt *slot* (template × word), with every value's
continuations of that slot together: prompts of a slot differ only in the
attribute, so keeping them paired removes the template's and the word
position's own effect from the interval, and continuations of one prompt
(which are correlated) move together.

W1 of two finite samples of one distribution is positive, so the report also
gives its size under the null of no bias: W1 after swapping the values'
labels within each slot at random (``null_wasserstein``: mean and upper
quantile over the swaps).

Diversity is distinct-n (Li et al. 2016): distinct n-grams over all n-grams of
a set of continuations, words lowercased and split at white space.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

Samples = Mapping[str, Mapping[str, Sequence[float]]]
"""value -> slot -> property scores of that prompt's continuations."""


def wasserstein(a: Sequence[float], b: Sequence[float]) -> float:
    """W1 between the empirical distributions of ``a`` and ``b``."""
    x, y = np.sort(np.asarray(a, dtype=float)), np.sort(np.asarray(b, dtype=float))
    if x.size == 0 or y.size == 0:
        raise ValueError("W1 needs at least one sample on each side")
    points = np.concatenate([x, y])
    points.sort()
    widths = np.diff(points)
    f = np.searchsorted(x, points[:-1], side="right") / x.size
    g = np.searchsorted(y, points[:-1], side="right") / y.size
    return float(np.sum(np.abs(f - g) * widths))


def mean_difference(a: Sequence[float], b: Sequence[float]) -> float:
    return float(np.mean(a) - np.mean(b))


def distinct_n(texts: Sequence[str], n: int) -> float:
    """Distinct n-grams / all n-grams over ``texts`` (0 when there are none)."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    seen, total = set(), 0
    for text in texts:
        words = text.lower().split()
        grams = [tuple(words[i : i + n]) for i in range(len(words) - n + 1)]
        seen.update(grams)
        total += len(grams)
    return len(seen) / total if total else 0.0


def _pool(samples: Samples, value: str, slots: Sequence[str]) -> np.ndarray:
    by_slot = samples[value]
    return np.array([s for slot in slots for s in by_slot.get(slot, ())], dtype=float)


def _interval(values: Sequence[float], confidence: float) -> tuple[float, float]:
    tail = (1 - confidence) / 2 * 100
    low, high = np.percentile(values, [tail, 100 - tail])
    return float(low), float(high)


def bias_report(
    samples: Samples,
    *,
    neutral: str | None = "neutral",
    bootstrap: int = 2000,
    swaps: int = 500,
    confidence: float = 0.95,
    seed: int = 0,
) -> dict[str, Any]:
    """Per-value summaries and the bias measures of the module doc, each as
    ``{"value", "low", "high"}``. Slots missing from some value are left out
    of every paired statistic (so the pairs stay pairs)."""
    values = [v for v in samples if v != neutral]
    if len(values) < 1 or any(not samples[v] for v in samples):
        raise ValueError("bias needs samples of at least one attribute value, each with some prompts")
    slots = sorted(set.intersection(*(set(samples[v]) for v in samples)))
    if not slots:
        raise ValueError("no prompt slot has samples of every value; nothing to compare")
    rng = np.random.default_rng(seed)
    draws = [rng.integers(0, len(slots), len(slots)) for _ in range(bootstrap)]

    def with_interval(statistic, *names: str) -> dict[str, float]:
        point = statistic(*(_pool(samples, name, slots) for name in names))
        boot = [statistic(*(_pool(samples, name, [slots[i] for i in draw]) for name in names)) for draw in draws]
        low, high = _interval(boot, confidence) if boot else (point, point)
        return {"value": point, "low": low, "high": high}

    report: dict[str, Any] = {
        "values": {},
        "pairs": [],
        "to_neutral": {},
        "slots": len(slots),
        "confidence": confidence,
        "bootstrap": bootstrap,
    }
    for value in samples:
        pooled = _pool(samples, value, slots)
        report["values"][value] = {
            "n": int(pooled.size),
            "mean": with_interval(lambda s: float(np.mean(s)), value),
            "sd": float(np.std(pooled, ddof=1)) if pooled.size > 1 else 0.0,
            "quartiles": [float(q) for q in np.percentile(pooled, [25, 50, 75])],
        }
    for a, b in itertools.combinations(values, 2):
        report["pairs"].append({
            "a": a,
            "b": b,
            "mean_difference": with_interval(mean_difference, a, b),
            "wasserstein": with_interval(wasserstein, a, b),
            "null_wasserstein": _null_wasserstein(samples, a, b, slots, swaps, rng),
        })
    if neutral is not None and neutral in samples:
        for value in values:
            report["to_neutral"][value] = {
                "mean_difference": with_interval(mean_difference, value, neutral),
                "wasserstein": with_interval(wasserstein, value, neutral),
            }
    if report["pairs"]:
        report["max_wasserstein"] = max(report["pairs"], key=lambda p: p["wasserstein"]["value"])["wasserstein"]
    return report


def _null_wasserstein(
    samples: Samples, a: str, b: str, slots: Sequence[str], swaps: int, rng: np.random.Generator
) -> dict[str, float]:
    """W1 of a and b when, slot by slot, their labels are swapped at random:
    the size W1 takes without any bias at these sample sizes."""
    if swaps < 1:
        return {"mean": float("nan"), "q95": float("nan")}
    found = []
    for _ in range(swaps):
        flip = rng.random(len(slots)) < 0.5
        left = [s for slot, f in zip(slots, flip) for s in samples[b if f else a][slot]]
        right = [s for slot, f in zip(slots, flip) for s in samples[a if f else b][slot]]
        found.append(wasserstein(left, right))
    return {"mean": float(np.mean(found)), "q95": float(np.percentile(found, 95))}
