"""Best-of-N, weighted best-of-N and self-consistency at every budget from one run.

The three baselines draw N independent samples and then *select* an answer:

* ``bon``: the sample with the largest reward;
* ``wbon``: the answer whose samples have the largest summed reward;
* ``sc``: the answer given by the most samples (majority vote).

A run at budget b is therefore b i.i.d. samples followed by the selection, and
any b of the N samples drawn for the largest budget are distributed exactly
like a fresh run at budget b. search-and-learn (Beeching, Tunstall and Rush,
2024) exploits this by scoring budget b on the *first* b samples. This module
computes that estimate (:func:`first_subset_choice`, the answer stored with a
row) and its Rao-Blackwellisation (:func:`expected_accuracy`): the mean
correctness of the selection over *all* b-subsets of the N samples, which has
the same expectation and a smaller variance. When there are more than
``max_exact`` subsets, the mean is taken over ``random_subsets`` subsets drawn
uniformly without replacement of samples (seeded, so it is reproducible), and
the number of subsets used is reported.

Ties are split evenly: when k answers tie for the selection, each counts 1/k.
Samples without an answer take part in best-of-N (the best sample may have no
answer, and then the selection is wrong) but cast no vote in ``wbon`` or ``sc``.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

SELECTIONS = ("bon", "wbon", "sc")

DEFAULT_MAX_EXACT = 5000
DEFAULT_RANDOM_SUBSETS = 2000

# Sums of the same rewards in a different order may differ in the last bits;
# answers whose summed rewards agree to this many decimals count as tied.
_TIE_DECIMALS = 9


@dataclass(frozen=True)
class Samples:
    """The N samples of one run, reduced to what selection needs.

    ``groups[i]`` is the answer class of sample i (equal answers share a
    class), or -1 for a sample without an answer; ``group_correct[g]`` says
    whether class g is a correct answer; ``scores[i]`` is the reward of
    sample i (``weights[i]`` its weight in the weighted vote); ``correct[i]``
    whether sample i's answer is correct.
    """

    groups: np.ndarray
    group_correct: np.ndarray
    scores: np.ndarray
    weights: np.ndarray

    def __post_init__(self) -> None:
        n = len(self.groups)
        if n == 0:
            raise ValueError("no samples to select from")
        if len(self.scores) != n or len(self.weights) != n:
            raise ValueError(f"{n} samples but {len(self.scores)} scores and {len(self.weights)} weights")
        if self.groups.max() >= len(self.group_correct) or self.groups.min() < -1:
            raise ValueError("sample groups must be -1 or index group_correct")
        if not np.all(np.isfinite(self.scores)) or not np.all(np.isfinite(self.weights)):
            raise ValueError("sample scores and weights must be finite")

    @property
    def size(self) -> int:
        return len(self.groups)

    @property
    def correct(self) -> np.ndarray:
        return np.where(self.groups >= 0, self.group_correct[np.maximum(self.groups, 0)], False)

    @classmethod
    def build(
        cls,
        keys: Sequence[str | None],
        key_correct: dict[str, bool],
        scores: Sequence[float],
        weights: Sequence[float] | None = None,
    ) -> Samples:
        """From per-sample answer keys (None: no answer), the correctness of
        each key, and per-sample scores (and vote weights, default the scores)."""
        index: dict[str, int] = {}
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
            group_correct[g] = key_correct[key]
        scores_array = np.asarray(scores, dtype=float)
        weights_array = scores_array if weights is None else np.asarray(weights, dtype=float)
        return cls(np.asarray(groups, dtype=int), group_correct, scores_array, weights_array)


def subset_credit(selection: str, samples: Samples, subsets: np.ndarray) -> np.ndarray:
    """Correctness of ``selection`` on each row of ``subsets`` (an integer
    array, one subset of sample indices per row), ties split evenly."""
    if selection not in SELECTIONS:
        raise ValueError(f"unknown selection {selection!r}; choose one of {', '.join(SELECTIONS)}")
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
    if selection == "sc":
        tally = np.bincount(flat, minlength=n_rows * n_groups).reshape(n_rows, n_groups)
        present = tally > 0
    else:
        votes = samples.weights[subsets][voting]
        tally = np.bincount(flat, weights=votes, minlength=n_rows * n_groups).reshape(n_rows, n_groups)
        tally = np.round(tally, _TIE_DECIMALS)
        present = np.bincount(flat, minlength=n_rows * n_groups).reshape(n_rows, n_groups) > 0
    # Absent answers cannot win, even when every present answer's summed weight is negative.
    tally = np.where(present, tally, -np.inf)
    winners = present & (tally == tally.max(axis=1, keepdims=True))
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
    n = samples.size
    if not 1 <= budget <= n:
        raise ValueError(f"budget {budget} must be between 1 and the number of samples ({n})")
    total = math.comb(n, budget)
    if total <= max_exact:
        subsets = np.array(list(itertools.combinations(range(n), budget)), dtype=int)
        exhaustive = True
    else:
        rng = np.random.default_rng(seed)
        # Each row is a uniform b-subset: the first b entries of a random permutation.
        subsets = np.argsort(rng.random((random_subsets, n)), axis=1)[:, :budget]
        exhaustive = False
    credit = subset_credit(selection, samples, subsets)
    return Estimate(accuracy=float(credit.mean()), subsets=len(subsets), exhaustive=exhaustive)


def first_subset_choice(selection: str, samples: Samples, budget: int) -> int | None:
    """The sample whose answer ``selection`` picks from the first ``budget``
    samples (search-and-learn's estimate), ties going to the earliest sample;
    None when no sample among them has an answer to pick (``wbon``, ``sc``)."""
    if not 1 <= budget <= samples.size:
        raise ValueError(f"budget {budget} must be between 1 and the number of samples ({samples.size})")
    if selection not in SELECTIONS:
        raise ValueError(f"unknown selection {selection!r}; choose one of {', '.join(SELECTIONS)}")
    if selection == "bon":
        return int(np.argmax(samples.scores[:budget]))
    tally: dict[int, float] = {}
    first_seen: dict[int, int] = {}
    for i in range(budget):
        g = int(samples.groups[i])
        if g < 0:
            continue
        vote = 1.0 if selection == "sc" else float(samples.weights[i])
        tally[g] = tally.get(g, 0.0) + vote
        first_seen.setdefault(g, i)
    if not tally:
        return None
    best = max(round(v, _TIE_DECIMALS) for v in tally.values())
    winner = min((g for g, v in tally.items() if round(v, _TIE_DECIMALS) == best), key=first_seen.__getitem__)
    return first_seen[winner]
