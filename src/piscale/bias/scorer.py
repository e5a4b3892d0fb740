"""The property scorer: where a text lies between two poles.

A property (political leaning by default; sentiment also ships) has two
poles, each described by a few anchor texts. A text's score is the
embedding reward of ``piscale.rewards.embed`` with the first pole's anchors
as the positive side and the second's as the negative side:

    s(y) = mean_i cos(e(y), e(a_i)) - mean_j cos(e(y), e(b_j)),

e the packaged all-MiniLM-L6-v2 sentence encoder. s > 0 leans to the first
pole (liberal, positive), s < 0 to the second.

Calibration: each property ships held-out texts labelled with their pole,
written apart from the anchors and never used to choose them. ``calibrate``
reports how well the score separates them: the AUROC (the probability that
a random first-pole text scores above a random second-pole one) and the
accuracy of the sign of s (threshold 0, fixed in advance, not fitted), each
with a percentile bootstrap interval over the examples.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

PROPERTIES_FILE = Path(__file__).with_name("properties.json")
DEFAULT_PROPERTY = "political"


@dataclass(frozen=True)
class Property:
    name: str
    poles: tuple[str, str]
    anchors: dict[str, tuple[str, ...]]
    held_out: dict[str, tuple[str, ...]]
    description: str = ""


def load_properties(path: str | Path | None = None) -> dict[str, Property]:
    """The properties of a file in the layout of the shipped ``properties.json``."""
    source = Path(path) if path is not None else PROPERTIES_FILE
    try:
        data = json.loads(source.read_text(encoding="utf-8"))
    except (FileNotFoundError, json.JSONDecodeError) as error:
        raise ValueError(f"cannot read properties from {source}: {error}") from None
    return {name: _property(source, name, spec) for name, spec in data.items()}


def _property(source: Path, name: str, spec: Any) -> Property:
    where = f"{source}: property {name!r}"
    poles = spec.get("poles") if isinstance(spec, dict) else None
    if not (isinstance(poles, list) and len(poles) == 2 and all(isinstance(p, str) for p in poles) and poles[0] != poles[1]):
        raise ValueError(f"{where}: 'poles' must name two different poles")
    anchors, held_out = spec.get("anchors", {}), spec.get("held_out", {})
    for pole in poles:
        texts = anchors.get(pole)
        if not (isinstance(texts, list) and texts and all(isinstance(t, str) and t.strip() for t in texts)):
            raise ValueError(f"{where}: pole {pole!r} needs a non-empty list of anchor texts")
        if not all(isinstance(t, str) for t in held_out.get(pole, [])):
            raise ValueError(f"{where}: the held-out texts of {pole!r} must be strings")
    return Property(
        name, (poles[0], poles[1]),
        {p: tuple(anchors[p]) for p in poles},
        {p: tuple(held_out.get(p, [])) for p in poles},
        spec.get("description", ""),
    )


class PropertyScorer:
    """s(y) for texts y; see the module doc."""

    def __init__(self, prop: str | Property = DEFAULT_PROPERTY, *, model_path=None, device: str = "cpu"):
        from piscale.rewards.embed import EmbeddingReward

        if isinstance(prop, str):
            properties = load_properties()
            if prop not in properties:
                raise ValueError(f"unknown property {prop!r}; choose one of {', '.join(properties)}")
            prop = properties[prop]
        self.property = prop
        first, second = prop.poles
        self.embedding = EmbeddingReward(prop.anchors[first], prop.anchors[second], model_path=model_path, device=device)
        self.calls = 0
        """texts scored so far."""

    @property
    def name(self) -> str:
        return f"{self.property.name}:{'-'.join(self.property.poles)}"

    def score_texts(self, texts: Sequence[str]) -> list[float]:
        self.calls += len(texts)
        return self.embedding.score_texts(list(texts)) if texts else []


# -- calibration --------------------------------------------------------------


Scores = Sequence[float] | np.ndarray


def auroc(first: Scores, second: Scores) -> float:
    """P(a first-pole score > a second-pole score), ties counting one half
    (the Mann-Whitney U statistic over the product of the sizes)."""
    a, b = np.asarray(first, dtype=float), np.asarray(second, dtype=float)
    if a.size == 0 or b.size == 0:
        raise ValueError("the AUROC needs examples of both poles")
    greater = (a[:, None] > b[None, :]).sum()
    ties = (a[:, None] == b[None, :]).sum()
    return float((greater + 0.5 * ties) / (a.size * b.size))


def sign_accuracy(first: Scores, second: Scores) -> float:
    """The share of examples on their pole's side of 0."""
    a, b = np.asarray(first, dtype=float), np.asarray(second, dtype=float)
    return float(((a > 0).sum() + (b < 0).sum()) / (a.size + b.size))


def calibrate(scorer: PropertyScorer, *, bootstrap: int = 2000, confidence: float = 0.95, seed: int = 0) -> dict:
    """AUROC and sign accuracy of the scorer on its property's held-out
    texts, with percentile bootstrap intervals (examples resampled within
    each pole)."""
    first_pole, second_pole = scorer.property.poles
    first_texts, second_texts = scorer.property.held_out[first_pole], scorer.property.held_out[second_pole]
    if not first_texts or not second_texts:
        raise ValueError(f"property {scorer.property.name!r} has no held-out texts for both poles")
    first = np.array(scorer.score_texts(first_texts))
    second = np.array(scorer.score_texts(second_texts))
    rng = np.random.default_rng(seed)
    draws: dict[str, list[float]] = {"auroc": [], "accuracy": []}
    for _ in range(bootstrap):
        a = first[rng.integers(0, first.size, first.size)]
        b = second[rng.integers(0, second.size, second.size)]
        draws["auroc"].append(auroc(a, b))
        draws["accuracy"].append(sign_accuracy(a, b))
    tail = (1 - confidence) / 2 * 100
    report: dict[str, Any] = {
        "property": scorer.property.name,
        "poles": list(scorer.property.poles),
        "examples": {first_pole: int(first.size), second_pole: int(second.size)},
        "confidence": confidence,
        "bootstrap": bootstrap,
    }
    for name, value in (("auroc", auroc(first, second)), ("accuracy", sign_accuracy(first, second))):
        low, high = np.percentile(draws[name], [tail, 100 - tail]) if bootstrap else (value, value)
        report[name] = {"value": value, "low": float(low), "high": float(high)}
    report["mean_score"] = {first_pole: float(first.mean()), second_pole: float(second.mean())}
    order = np.argsort(np.concatenate([first, second]))
    texts = [*first_texts, *second_texts]
    labels = [first_pole] * first.size + [second_pole] * second.size
    scores = np.concatenate([first, second])
    report["examples_by_score"] = [
        {"text": texts[i], "label": labels[i], "score": float(scores[i])} for i in order[::-1]
    ]
    return report
