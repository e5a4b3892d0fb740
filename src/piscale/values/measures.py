"""How well step scores rank answers: the numbers a value head is chosen by.

A search compares partial answers *of one problem* only: best-of-N picks
among a problem's answers, and particle filtering resamples a problem's
particles by their relative weights. What a scorer knows about which
problems are hard is no use to either. So beside the pooled AUROC, the
measures here count only comparisons within a problem:

* ``pairwise_accuracy``: over pairs (correct, incorrect) of finished answers
  to the same problem, the fraction where the correct one scores higher;
* ``step_pairwise_accuracy``: the same over unfinished prefixes of such a
  pair at equal depth (step t of each), the comparison particle filtering
  makes when it resamples after step t.

Ties count one half throughout; pairs are pooled over problems.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


def auroc(scores: np.ndarray, labels: np.ndarray) -> float:
    """P(score of a positive > score of a negative), ties one half; labels 0/1."""
    scores, labels = np.asarray(scores, dtype=float), np.asarray(labels) > 0.5
    positives, negatives = int(labels.sum()), int((~labels).sum())
    if positives == 0 or negatives == 0:
        raise ValueError("AUROC needs both positive and negative examples")
    order = np.argsort(scores, kind="mergesort")
    ranks = np.empty(len(scores))
    sorted_scores = scores[order]
    start = 0
    while start < len(scores):  # average ranks over ties
        end = start
        while end + 1 < len(scores) and sorted_scores[end + 1] == sorted_scores[start]:
            end += 1
        ranks[order[start : end + 1]] = (start + end) / 2 + 1
        start = end + 1
    u = ranks[labels].sum() - positives * (positives + 1) / 2
    return float(u / (positives * negatives))


@dataclass
class Pairwise:
    accuracy: float | None
    pairs: int
    problems: int
    """problems with at least one correct and one incorrect rollout."""


def _by_problem(items: Sequence, correct: Sequence[bool], problem_ids: Sequence[str]) -> list[tuple[list, list]]:
    """(correct items, incorrect items) of every problem that has both."""
    grouped: dict[str, tuple[list, list]] = {}
    for item, c, p in zip(items, correct, problem_ids):
        grouped.setdefault(p, ([], []))[0 if c else 1].append(item)
    return [(good, bad) for good, bad in grouped.values() if good and bad]


def _win(better: float, worse: float) -> float:
    return 1.0 if better > worse else 0.5 if better == worse else 0.0


def pairwise_accuracy(final_scores: Sequence[float], correct: Sequence[bool], problem_ids: Sequence[str]) -> Pairwise:
    """Over (correct, incorrect) pairs of the same problem: the fraction where
    the correct answer scores higher, ties one half, pooled over problems."""
    groups = _by_problem([float(s) for s in final_scores], correct, problem_ids)
    wins = [_win(g, b) for good, bad in groups for g in good for b in bad]
    return Pairwise(float(np.mean(wins)) if wins else None, len(wins), len(groups))


def step_pairwise_accuracy(
    step_scores: Sequence[Sequence[float]], correct: Sequence[bool], problem_ids: Sequence[str]
) -> Pairwise:
    """Over (correct, incorrect) rollouts of the same problem and every depth t
    at which both are still unfinished (t below both final steps): the
    fraction where the correct rollout's step-t score is higher."""
    groups = _by_problem([np.asarray(s, dtype=float) for s in step_scores], correct, problem_ids)
    wins = [
        _win(g[t], b[t])
        for good, bad in groups for g in good for b in bad
        for t in range(min(len(g), len(b)) - 1)
    ]
    return Pairwise(float(np.mean(wins)) if wins else None, len(wins), len(groups))
