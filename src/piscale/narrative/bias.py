"""Odds ratios of verb categories for female versus male characters.

For a verb category ``c``, with ``a`` the female characters' events in
``c``, ``b`` their other events, ``m`` the male characters' events in ``c``
and ``n`` their other events, the odds ratio with the +0.5 (Haldane-Anscombe)
correction is

    OR = ((a + 0.5) (n + 0.5)) / ((b + 0.5) (m + 0.5))

Above 1, the category is more often a female character's; below 1, a male
character's. The confidence interval is a percentile bootstrap over
*stories* (stories are drawn with replacement and all their events come
along), because events of one story are not independent of each other.

The temporal view splits each character's chain, in temporal order, into
thirds (event ``i`` of ``n`` is in third ``floor(3 i / n)``) and computes
the same table for the first, middle and last thirds.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from piscale.narrative.schema import StoryResult

__all__ = [
    "SEGMENTS",
    "BiasRow",
    "BiasSettings",
    "bias_table",
    "count_matrices",
    "log_odds_ratio",
    "odds_ratio",
    "plot_bias",
]

SEGMENTS = ("all", "first", "middle", "last")
CORRECTION = 0.5


def odds_ratio(a: float, b: float, m: float, n: float, correction: float = CORRECTION) -> float:
    """((a + k)(n + k)) / ((b + k)(m + k)) with k = ``correction``."""
    return ((a + correction) * (n + correction)) / ((b + correction) * (m + correction))


def log_odds_ratio(a: Any, b: Any, m: Any, n: Any, correction: float = CORRECTION) -> Any:
    """The natural log of ``odds_ratio``; works elementwise on arrays."""
    return (
        np.log(np.asarray(a, float) + correction)
        + np.log(np.asarray(n, float) + correction)
        - np.log(np.asarray(b, float) + correction)
        - np.log(np.asarray(m, float) + correction)
    )


@dataclass(frozen=True)
class BiasSettings:
    role: str = "any"  # "any" | "subject" | "object"
    importance: tuple[str, ...] = ("primary", "secondary", "tertiary")
    min_certainty: float = 0.75
    bootstrap: int = 1000
    confidence: float = 0.95
    seed: int = 0


@dataclass
class BiasRow:
    segment: str
    category: str
    female: int
    female_total: int
    male: int
    male_total: int
    odds_ratio: float
    log_odds_ratio: float
    ci_low: float
    ci_high: float
    significant: bool  # the interval excludes 1

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _selected(result: StoryResult, settings: BiasSettings) -> dict[int, str]:
    """character id -> gender, for the characters that count."""
    return {
        c.id: c.gender
        for c in result.characters
        if c.gender in ("female", "male")
        and c.gender_certainty >= settings.min_certainty
        and c.importance in settings.importance
    }


def _segment_of(position: int, length: int) -> str:
    return ("first", "middle", "last")[min(2, (3 * position) // length)]


def count_matrices(results: Sequence[StoryResult], settings: BiasSettings) -> tuple[list[str], dict[str, np.ndarray]]:
    """The categories, and per segment an array of shape (stories, 2,
    categories): event counts of female (row 0) and male (row 1) characters."""
    categories = sorted({e.category for r in results for e in r.events if e.category})
    column = {c: i for i, c in enumerate(categories)}
    counts = {s: np.zeros((len(results), 2, len(categories)), dtype=np.int64) for s in SEGMENTS}
    for index, result in enumerate(results):
        genders = _selected(result, settings)
        for character, gender in genders.items():
            chain = [
                e for e in result.chain(character) if e.category and (settings.role == "any" or e.role == settings.role)
            ]
            row = 0 if gender == "female" else 1
            for position, event in enumerate(chain):
                col = column[event.category]  # type: ignore[index]
                counts["all"][index, row, col] += 1
                counts[_segment_of(position, len(chain))][index, row, col] += 1
    return categories, counts


def _log_or_of_totals(totals: np.ndarray) -> np.ndarray:
    """``totals``: (..., 2, categories) -> log odds ratios (..., categories)."""
    female, male = totals[..., 0, :], totals[..., 1, :]
    female_all = female.sum(axis=-1, keepdims=True)
    male_all = male.sum(axis=-1, keepdims=True)
    return log_odds_ratio(female, female_all - female, male, male_all - male)


def bias_table(results: Sequence[StoryResult], settings: BiasSettings | None = None) -> list[BiasRow]:
    """One row per (segment, category): counts, odds ratio and its bootstrap
    interval (see the module docstring)."""
    settings = settings or BiasSettings()
    categories, counts = count_matrices(results, settings)
    rng = np.random.default_rng(settings.seed)
    stories = len(results)
    draws = rng.integers(0, stories, size=(settings.bootstrap, stories)) if stories and settings.bootstrap else None
    tail = (1 - settings.confidence) / 2 * 100
    rows = []
    for segment in SEGMENTS:
        matrix = counts[segment]
        totals = matrix.sum(axis=0)
        point = _log_or_of_totals(totals)
        if draws is not None:
            # Each bootstrap draw sums the drawn stories' counts.
            sampled = matrix[draws].sum(axis=1)
            low, high = np.percentile(_log_or_of_totals(sampled), [tail, 100 - tail], axis=0)
        else:
            low = high = np.full(len(categories), np.nan)
        female_total, male_total = int(totals[0].sum()), int(totals[1].sum())
        for i, category in enumerate(categories):
            ci_low, ci_high = math.exp(float(low[i])), math.exp(float(high[i]))
            rows.append(
                BiasRow(
                    segment=segment,
                    category=category,
                    female=int(totals[0, i]),
                    female_total=female_total,
                    male=int(totals[1, i]),
                    male_total=male_total,
                    odds_ratio=math.exp(float(point[i])),
                    log_odds_ratio=float(point[i]),
                    ci_low=ci_low,
                    ci_high=ci_high,
                    significant=bool(ci_low > 1 or ci_high < 1),
                )
            )
    return rows


def plot_bias(rows: Sequence[BiasRow], out: Path, *, title: str = "") -> list[Path]:
    """Two forest plots of log odds ratios with their intervals, each as PNG
    and SVG: ``bias`` (the whole chains) and ``bias_thirds`` (first, middle
    and last thirds side by side)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    overall = [r for r in rows if r.segment == "all"]
    order = [r.category for r in sorted(overall, key=lambda r: r.log_odds_ratio)]
    if not order:
        return written

    def draw(segments: Sequence[str], name: str, heading: str) -> None:
        fig, ax = plt.subplots(figsize=(7.5, 0.32 * len(order) * max(1, len(segments) * 0.6) + 1.6))
        colours = {"all": "#333333", "first": "#4a78b5", "middle": "#8e6bb8", "last": "#c0504d"}
        step = 0.8 / max(1, len(segments))
        for k, segment in enumerate(segments):
            by = {r.category: r for r in rows if r.segment == segment}
            ys, xs, lo, hi = [], [], [], []
            for y, category in enumerate(order):
                row = by.get(category)
                if row is None:
                    continue
                offset = (k - (len(segments) - 1) / 2) * step
                ys.append(y + offset)
                xs.append(row.log_odds_ratio)
                # A percentile interval need not contain the point estimate.
                lo.append(max(0.0, row.log_odds_ratio - math.log(row.ci_low)))
                hi.append(max(0.0, math.log(row.ci_high) - row.log_odds_ratio))
            ax.errorbar(
                xs, ys, xerr=[lo, hi], fmt="o", ms=4, capsize=2, color=colours.get(segment, "#333"), label=segment
            )
        ax.axvline(0, color="#999", lw=1, ls="--")
        ax.set_yticks(range(len(order)))
        ax.set_yticklabels([c.removeprefix("verb.") for c in order])
        ax.set_xlabel("log odds ratio (female vs male); > 0: more often a female character's")
        ax.set_title(heading)
        if len(segments) > 1:
            ax.legend(loc="lower right", fontsize=8)
        fig.tight_layout()
        for suffix in ("png", "svg"):
            path = out / f"{name}.{suffix}"
            fig.savefig(path, dpi=120)
            written.append(path)
        plt.close(fig)

    draw(["all"], "bias", title or "verb categories, female vs male characters")
    draw(["first", "middle", "last"], "bias_thirds", (title or "verb categories") + ": by third of the chain")
    return written
