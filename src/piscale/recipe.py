r"""The fine-tuning recipe for small models (Pareja et al., 2024), shared by
every trainer in piscale (``piscale sft``, ``piscale distill``).

What the recipe says, and where it lives here:

* **Large effective batches, low learning rates.** An optimiser step sees
  ``examples_per_step`` examples, accumulated over forward passes of
  ``micro_batch`` examples; the learning rate is small (they found 1e-6 to
  2e-5 best, with 3,840 to 7,680 examples per step on their scale).
* **No warm-up, a constant schedule.** At large batch a constant rate matched
  cosine decay; ``Recipe`` has no schedule to choose.
* **Stacked, not phased.** Training on all the data at once matched training
  on it in phases, and is simpler (``piscale.sft`` offers phases as an option).
* **Early indicators.** Early in training, a *lower gradient norm* and a
  *higher loss* predicted a better final model, so poor runs of a grid can
  be stopped early. ``early_indicators`` summarises a run's first steps and
  ``rank_by_early_indicators`` orders runs by the rule below.

The ranking rule. Over the first ``k`` optimiser steps of each run, take the
mean gradient norm ḡ (before clipping) and the mean training loss ℓ̄. Rank
the runs by ḡ ascending (rank 1: the lowest) and by ℓ̄ descending (rank 1:
the highest); a run's score is the mean of its two ranks, and runs are
ordered by score, lower first. Ties of the score go to the lower ḡ, then the
higher ℓ̄, then the name. Both indicators count equally because the paper
reports both; neither is a calibrated predictor, so the rule only orders runs.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np


class RecipeError(ValueError):
    """An unusable training setting; the message says which."""


@dataclass
class Recipe:
    """The optimiser settings: AdamW at a constant learning rate, no warm-up."""

    learning_rate: float = 1e-5
    examples_per_step: int = 32
    """the effective batch: examples per optimiser step (gradients accumulate)."""
    micro_batch: int = 4
    """examples per forward pass."""
    epochs: int = 1
    max_grad_norm: float = 1.0
    weight_decay: float = 0.0
    seed: int = 0

    def __post_init__(self) -> None:
        if not self.learning_rate > 0:
            raise RecipeError(f"learning_rate must be > 0, got {self.learning_rate}")
        for name in ("examples_per_step", "micro_batch", "epochs"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise RecipeError(f"{name} must be an integer >= 1, got {value!r}")
        if not self.max_grad_norm > 0 or self.weight_decay < 0:
            raise RecipeError("max_grad_norm must be > 0 and weight_decay >= 0")


@dataclass(frozen=True)
class Indicators:
    """A run's early-training summary."""

    steps: int
    """how many optimiser steps were averaged."""
    grad_norm: float
    """mean gradient norm (before clipping) over those steps."""
    loss: float
    """mean training loss over those steps."""


def early_indicators(losses: Sequence[float], grad_norms: Sequence[float], steps: int) -> Indicators:
    """The means of the first ``steps`` losses and gradient norms of a run."""
    if steps < 1:
        raise RecipeError(f"steps must be >= 1, got {steps}")
    if len(losses) != len(grad_norms):
        raise RecipeError(f"{len(losses)} losses but {len(grad_norms)} gradient norms")
    if len(losses) < steps:
        raise RecipeError(f"the run has {len(losses)} steps; its early indicators need {steps}")
    loss = np.asarray(losses[:steps], dtype=float)
    norm = np.asarray(grad_norms[:steps], dtype=float)
    if not (np.isfinite(loss).all() and np.isfinite(norm).all()):
        raise RecipeError("a loss or gradient norm in the early steps is not finite (the run diverged)")
    return Indicators(steps=steps, grad_norm=float(norm.mean()), loss=float(loss.mean()))


def rank_by_early_indicators(runs: Mapping[str, Indicators]) -> list[str]:
    """Run names, the most promising first, by the rule in this module's
    docstring (mean of the gradient-norm rank, ascending, and the loss rank,
    descending)."""
    if not runs:
        raise RecipeError("no runs to rank")
    names = list(runs)
    by_norm = _ranks([runs[n].grad_norm for n in names])
    by_loss = _ranks([-runs[n].loss for n in names])
    score = {n: (a + b) / 2 for n, a, b in zip(names, by_norm, by_loss)}
    return sorted(names, key=lambda n: (score[n], runs[n].grad_norm, -runs[n].loss, n))


def _ranks(values: Sequence[float]) -> list[float]:
    """1-based ranks of ``values`` ascending, ties sharing their mean rank."""
    array = np.asarray(values, dtype=float)
    order = np.argsort(array, kind="stable")
    ranks = np.empty(len(array))
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and array[order[j + 1]] == array[order[i]]:
            j += 1
        ranks[order[i : j + 1]] = (i + j) / 2 + 1
        i = j + 1
    return ranks.tolist()


def rank_agreement(first: Sequence[str], second: Sequence[str]) -> float:
    """Spearman's rank correlation between two orderings of the same runs:
    1 when they agree, -1 when one reverses the other (nan for one run)."""
    if sorted(first) != sorted(second) or len(set(first)) != len(first):
        raise RecipeError("the two rankings must order the same distinct runs")
    n = len(first)
    if n < 2:
        return float("nan")
    position = {name: i for i, name in enumerate(second)}
    d = np.array([i - position[name] for i, name in enumerate(first)], dtype=float)
    return float(1 - 6 * (d**2).sum() / (n * (n**2 - 1)))
