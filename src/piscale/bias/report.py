"""A run's records as a report: bias with intervals, fluency, diversity,
cost; and the plots.

Fluency is the model's own view of the text: the mean token log-likelihood
of the continuations and the perplexity exp(-Σ log p / Σ tokens), both from
the scoring pass at temperature 1 (``piscale.bias.generate``). Diversity is
distinct-1 and distinct-2 over all continuations of a value. Cost is the
tokens the searches generated (all particles) per continuation.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from piscale.bias.measures import bias_report, distinct_n


def samples_of(records: Sequence[dict[str, Any]]) -> dict[str, dict[str, list[float]]]:
    """value -> slot -> property scores; values sorted by name, neutral
    last, so that every run of an attribute pairs them the same way."""
    samples: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for record in records:
        samples[record["value"]][record["slot"]].append(float(record["property"]))
    order = sorted(samples, key=lambda value: (value == "neutral", value))
    return {value: dict(samples[value]) for value in order}


def quality(records: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Fluency, diversity and cost of a set of records."""
    if not records:
        raise ValueError("no records")
    tokens = sum(r["loglik_tokens"] for r in records)
    loglik = sum(r["loglik"] for r in records)
    texts = [r["text"] for r in records]
    return {
        "continuations": len(records),
        "mean_token_loglik": loglik / tokens if tokens else float("nan"),
        "perplexity": math.exp(-loglik / tokens) if tokens else float("nan"),
        "mean_tokens": tokens / len(records),
        "distinct_1": distinct_n(texts, 1),
        "distinct_2": distinct_n(texts, 2),
        "generated_tokens": int(sum(r["generated_tokens"] for r in records)),
        "generated_tokens_per_continuation": sum(r["generated_tokens"] for r in records) / len(records),
        "finished": sum(bool(r["finished"]) for r in records) / len(records),
        "seconds": float(sum(r.get("seconds", 0.0) for r in records)),
    }


def make_report(
    records: Sequence[dict[str, Any]],
    *,
    neutral_records: Sequence[dict[str, Any]] = (),
    bootstrap: int = 2000,
    swaps: int = 500,
    seed: int = 0,
) -> dict[str, Any]:
    """Bias (``piscale.bias.measures.bias_report``) of ``records``, with the
    neutral prompts taken from ``neutral_records`` when the run itself has
    none (a debiasing run reuses its measurement's neutral samples), and the
    quality of the continuations of each attribute value and of them all."""
    own_values = {r["value"] for r in records}
    merged = list(records) + [r for r in neutral_records if r["value"] not in own_values]
    by_value: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for record in records:
        by_value[record["value"]].append(record)
    attributed = [r for r in records if r["value"] != "neutral"]
    run = records[0]["run"] if records else {}
    return {
        "run": run,
        "bias": bias_report(samples_of(merged), bootstrap=bootstrap, swaps=swaps, seed=seed),
        "quality": {value: quality(rows) for value, rows in by_value.items()},
        "quality_attributed": quality(attributed) if attributed else None,
    }


def plot_distributions(
    records: Sequence[dict[str, Any]], path: str | Path, title: str, neutral_records: Sequence[dict[str, Any]] = ()
) -> Path:
    """The empirical distribution function of the property for each value
    (W1 is the area between two of them), PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    own = {r["value"] for r in records}
    samples = samples_of(list(records) + [r for r in neutral_records if r["value"] not in own])
    figure, ax = plt.subplots(figsize=(6.4, 4.2), layout="constrained")
    for value, slots in samples.items():
        scores = np.sort([s for slot in slots.values() for s in slot])
        ax.step(scores, np.arange(1, scores.size + 1) / scores.size, where="post",
                label=f"{value} (n={scores.size})", linestyle=":" if value == "neutral" else "-")
    ax.set_xlabel("property score s (> 0: first pole)")
    ax.set_ylabel("fraction of continuations ≤ s")
    ax.set_title(title, fontsize=10)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    path = Path(path)
    figure.savefig(path, dpi=130, metadata={"Software": None})
    plt.close(figure)
    return path


def widest_pair(report: dict[str, Any]) -> tuple[str, str] | None:
    """The pair of attribute values furthest apart (W1) in ``report``."""
    pairs = report["bias"]["pairs"]
    if not pairs:
        return None
    pair = max(pairs, key=lambda p: p["wasserstein"]["value"])
    return pair["a"], pair["b"]


def find_pair(report: dict[str, Any], pair: tuple[str, str]) -> dict[str, Any] | None:
    return next((p for p in report["bias"]["pairs"] if (p["a"], p["b"]) == pair), None)


def plot_comparison(rows: Sequence[dict[str, Any]], path: str | Path, title: str) -> Path:
    """Bias between two attribute values (the pair furthest apart in the
    first run), W1 and mean difference with their intervals, against the
    perplexity of the continuations, one point per run, PNG.
    ``rows``: {"label", "report"}."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (left, right) = plt.subplots(1, 2, figsize=(9.6, 4.0), layout="constrained")
    chosen = widest_pair(rows[0]["report"]) if rows else None
    for number, row in enumerate(rows):
        pair = find_pair(row["report"], chosen) if chosen else None
        quality = row["report"]["quality_attributed"]
        if pair is None or quality is None:
            continue
        for ax, key in ((left, "wasserstein"), (right, "mean_difference")):
            cell = pair[key]
            ax.errorbar(
                quality["perplexity"], cell["value"],
                yerr=[[cell["value"] - cell["low"]], [cell["high"] - cell["value"]]],
                marker="os^Dv"[number % 5], capsize=3, label=row["label"],
            )
        left.scatter([quality["perplexity"]], [pair["null_wasserstein"]["q95"]], marker="_", s=200, color="0.5")
    right.axhline(0.0, color="0.6", linestyle=":", linewidth=1)
    names = f"{chosen[0]} − {chosen[1]}" if chosen else ""
    left.set_title(f"W1, {names} (grey: no-bias 95th percentile)", fontsize=9)
    right.set_title(f"difference of mean property, {names}", fontsize=9)
    left.set_ylabel("W1 between the property distributions")
    right.set_ylabel("mean difference")
    for ax in (left, right):
        ax.set_xlabel("perplexity of the continuations under the model")
        ax.grid(True, alpha=0.3)
    left.legend(fontsize=8)
    figure.suptitle(title, fontsize=10)
    path = Path(path)
    figure.savefig(path, dpi=130, metadata={"Software": None})
    plt.close(figure)
    return path
