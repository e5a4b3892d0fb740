"""Best-of-N, weighted best-of-N and self-consistency at every budget from one run.

The three baselines draw N independent samples and then *select* an answer
(``piscale.search.bon``, ``wbon``, ``sc``):

* ``bon``: the sample with the largest reward (unscored samples lose);
* ``wbon``: the answer whose samples carry the largest total mass (the
  reward, or exp(reward - max) for log-scale rewards);
* ``sc``: the answer given by the most samples (majority vote).

A run at budget b is therefore b i.i.d. samples followed by the selection, so
any b of the N samples drawn for the largest budget are distributed exactly
like a fresh run at budget b. search-and-learn (Beeching, Tunstall and Rush,
2024) exploits this by scoring budget b on the *first* b samples. This module
computes that estimate (:func:`first_subset_choice`, which uses the search's
own selection functions, ties and all) and its Rao-Blackwellisation
(:func:`expected_accuracy`): the mean correctness of the selection over *all*
b-subsets of the N samples, which has the same expectation and a smaller
variance. When there are more than ``max_exact`` subsets, the mean is taken
over ``random_subsets`` subsets drawn uniformly (seeded, so reproducible),
and the number of subsets used is reported.

In the subset mean, ties are split evenly: when k answers (or, for ``bon``, k
samples) tie for the selection, each counts 1/k, where the search itself
would take the earliest. Samples without an answer take part in best-of-N
(the best sample may have no answer, and then the selection is wrong) but
cast no vote in ``wbon`` or ``sc``.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Hashable, Sequence
from dataclasses import dataclass

import numpy as np

from piscale.search.select import heaviest_group, max_weight

SELECTIONS = ("bon", "wbon", "sc")

DEFAULT_MAX_EXACT = 5000
DEFAULT_RANDOM_SUBSETS = 2000

# Totals of the same masses summed in a different order may differ in the last
# bits; answers within this relative distance of the best count as tied.
_TIE_TOLERANCE = 1e-9


@dataclass(frozen=True)
class Samples:
    """The N samples of one run, reduced to what selection needs.

    ``groups[i]`` is the answer group of sample i (equivalent answers share a
    group, numbered by first appearance), or -1 for a sample without an
    answer; ``group_correct[g]`` says whether group g is a correct answer;
    ``scores[i]`` is the reward of sample i (-inf when unscored);
    ``masses[i]`` its vote in the weighted vote.
    """

    groups: np.ndarray
    group_correct: np.ndarray
    scores: np.ndarray
    masses: np.ndarray

    def __post_init__(self) -> None:
        n = len(self.groups)
        if n == 0:
            raise ValueError("no samples to select from")
        if len(self.scores) != n or len(self.masses) != n:
            raise ValueError(f"{n} samples but {len(self.scores)} scores and {len(self.masses)} masses")
        if self.groups.max() >= len(self.group_correct) or self.groups.min() < -1:
            raise ValueError("sample groups must be -1 or index group_correct")
        if np.isnan(self.scores).any() or np.isposinf(self.scores).any():
            raise ValueError("sample scores must be numbers or -inf (unscored), not NaN or +inf")
        if not np.all(np.isfinite(self.masses)):
            raise ValueError("sample masses must be finite")

    @property
    def size(self) -> int:
        return len(self.groups)

    @property
    def correct(self) -> np.ndarray:
        """Whether each sample's answer is correct (False without an answer)."""
        if len(self.group_correct) == 0:
            return np.zeros(self.size, dtype=bool)
        return np.where(self.groups >= 0, self.group_correct[np.maximum(self.groups, 0)], False)

    @classmethod
    def build(
        cls,
        keys: Sequence[Hashable | None],
        key_correct: dict,
        scores: Sequence[float | None],
        masses: Sequence[float] | None = None,
    ) -> Samples:
        """From per-sample answer keys (None: no answer; equal keys are the
        same answer), each key's correctness, per-sample scores (None:
        unscored) and vote masses (default: the score, 0 when unscored)."""
        index: dict = {}
        groups = []
        for key in keys:
            if key is None:
                groups.append(-1)
                continue
            if key not in key_correct:
                raise ValueError(f"no correctness given for answer {key!r}")
            groups.append(index.setdefault(key, len(index)))
        group_correct = np.zeros(len(index), dtype=bool)
        for key, g in index.items():
            group_correct[g] = bool(key_correct[key])
        score_array = np.array([-np.inf if s is None else float(s) for s in scores], dtype=float)
        if masses is None:
            mass_array = np.where(np.isfinite(score_array), score_array, 0.0)
        else:
            mass_array = np.asarray(masses, dtype=float)
        return cls(np.asarray(groups, dtype=int), group_correct, score_array, mass_array)


def subset_credit(selection: str, samples: Samples, subsets: np.ndarray) -> np.ndarray:
    """Correctness of ``selection`` on each row of ``subsets`` (an integer
    array, one subset of sample indices per row), ties split evenly."""
    _check_selection(selection)
    if selection == "bon":
        scores = samples.scores[subsets]
        best = scores == scores.max(axis=1, keepdims=True)
        hits = (best & samples.correct[subsets]).sum(axis=1)
        return hits / best.sum(axis=1)
    n_rows, n_groups = len(subsets), len(samples.group_correct)
    if n_groups == 0:
        return np.zeros(n_rows)
    groups = samples.groups[subsets]
    voting = groups >= 0
    rows = np.broadcast_to(np.arange(n_rows)[:, None], groups.shape)
    flat = (rows * n_groups + groups)[voting]
    size = n_rows * n_groups
    present = np.bincount(flat, minlength=size).reshape(n_rows, n_groups) > 0
    if selection == "sc":
        tally = np.bincount(flat, minlength=size).reshape(n_rows, n_groups).astype(float)
    else:
        votes = samples.masses[subsets][voting]
        tally = np.bincount(flat, weights=votes, minlength=size).reshape(n_rows, n_groups)
    # Absent answers cannot win, even when every present answer's total is negative.
    tally = np.where(present, tally, -np.inf)
    best = tally.max(axis=1, keepdims=True)
    winners = present & (tally >= best - _TIE_TOLERANCE * np.abs(best))
    hits = (winners & samples.group_correct[None, :]).sum(axis=1)
    n_winners = winners.sum(axis=1)
    return np.divide(hits, n_winners, out=np.zeros(n_rows), where=n_winners > 0)


@dataclass(frozen=True)
class Estimate:
    accuracy: float
    """Mean correctness of the selection over the subsets used."""
    subsets: int
    """How many b-subsets were averaged."""
    exhaustive: bool
    """True when those were all C(N, b) subsets (the exact mean)."""


def expected_accuracy(
    selection: str,
    samples: Samples,
    budget: int,
    *,
    seed: int = 0,
    max_exact: int = DEFAULT_MAX_EXACT,
    random_subsets: int = DEFAULT_RANDOM_SUBSETS,
) -> Estimate:
    """Mean correctness of ``selection`` over the ``budget``-subsets of the samples."""
    _check_budget(budget, samples)
    n = samples.size
    if math.comb(n, budget) <= max_exact:
        subsets = np.array(list(itertools.combinations(range(n), budget)), dtype=int)
        exhaustive = True
    else:
        rng = np.random.default_rng(seed)
        # Each row is a uniform b-subset: the first b entries of a random permutation.
        subsets = np.argsort(rng.random((random_subsets, n)), axis=1)[:, :budget]
        exhaustive = False
    credit = subset_credit(selection, samples, subsets)
    return Estimate(accuracy=float(credit.mean()), subsets=len(subsets), exhaustive=exhaustive)


def pass_at(samples: Samples, budget: int) -> float:
    """The chance that a uniform ``budget``-subset of the samples holds at
    least one correct answer (pass@b, or coverage): 1 - C(N - k, b) / C(N, b)
    with k correct samples out of N. It is what a selection that always finds
    a correct sample would score, so it bounds every selection above."""
    _check_budget(budget, samples)
    n, right = samples.size, int(samples.correct.sum())
    return 1.0 - math.comb(n - right, budget) / math.comb(n, budget)


def first_subset_choice(selection: str, samples: Samples, budget: int) -> int:
    """The sample the search would return had it drawn only the first
    ``budget`` samples (search-and-learn's estimate): the same selection
    functions as ``piscale.search``, so ties go the same way."""
    _check_selection(selection)
    _check_budget(budget, samples)
    scores = samples.scores[:budget]
    if selection == "bon":
        return max_weight(scores)
    groups = [None if g < 0 else int(g) for g in samples.groups[:budget]]
    masses = samples.masses[:budget] if selection == "wbon" else np.ones(budget)
    winner = heaviest_group(groups, masses)
    if selection == "sc":
        return 0 if winner is None else groups.index(winner)
    members = [i for i, g in enumerate(groups) if g == winner] if winner is not None else list(range(budget))
    return members[max_weight(scores[members])]


def _check_selection(selection: str) -> None:
    if selection not in SELECTIONS:
        raise ValueError(f"unknown selection {selection!r}; choose one of {', '.join(SELECTIONS)}")


def _check_budget(budget: int, samples: Samples) -> None:
    if not 1 <= budget <= samples.size:
        raise ValueError(f"budget {budget} must be between 1 and the number of samples ({samples.size})")
