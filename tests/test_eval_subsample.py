"""Subsampled best-of-N, weighted best-of-N and self-consistency against
references computed another way: by hand, by order statistics, and by the
multivariate hypergeometric distribution of vote counts."""

from __future__ import annotations

import itertools
from math import comb

import numpy as np
import pytest

from piscale.eval.subsample import Samples, expected_accuracy, first_subset_choice, pass_at

# Four samples: answer a (correct) with rewards 0.9 and 0.2, answer b (wrong)
# with 0.95, and one sample without an answer whose reward is the highest.
HAND = Samples.build(["a", "b", "a", None], {"a": True, "b": False}, [0.9, 0.95, 0.2, 0.99])


@pytest.mark.parametrize(
    ("selection", "budget", "expected"),
    [
        # b=2, the six pairs {01,02,03,12,13,23}:
        ("bon", 2, 1 / 6),  # best sample is correct only in {0,2}
        ("wbon", 2, 3 / 6),  # a wins in {0,2}, {0,3}, {2,3}; b (0.95) beats a (0.9 or 0.2) in {0,1}, {1,2}
        ("sc", 2, 4 / 6),  # a wins {0,2},{0,3},{2,3}; a-b ties in {0,1},{1,2} count 1/2 each
        ("sc", 3, 3 / 4),  # {012}: a 2-1; {013}: tie 1/2; {023}: a; {123}: tie 1/2
        ("bon", 1, 2 / 4),
        ("wbon", 4, 1.0),  # a: 1.1 > b: 0.95
        ("bon", 4, 0.0),  # the unanswered sample has the best reward
    ],
)
def test_hand_computed_example(selection: str, budget: int, expected: float) -> None:
    estimate = expected_accuracy(selection, HAND, budget)
    assert estimate.exhaustive and estimate.subsets == comb(4, budget)
    assert estimate.accuracy == pytest.approx(expected, abs=1e-12)


def bon_by_order_statistics(scores: np.ndarray, correct: np.ndarray, budget: int) -> float:
    """E[correctness of the best of a random b-subset]: the best score is v
    with probability (C(#<=v, b) - C(#<v, b)) / C(N, b); given that, the pick
    is uniform over the drawn samples scoring v, whose correct fraction is in
    expectation that of all samples scoring v."""
    n = len(scores)
    total = 0.0
    for value in np.unique(scores):
        at_most, below = int((scores <= value).sum()), int((scores < value).sum())
        p_max = (comb(at_most, budget) - comb(below, budget)) / comb(n, budget)
        tied = scores == value
        total += p_max * correct[tied].mean()
    return total


def sc_by_hypergeometric(counts: list[int], correct: list[bool], unanswered: int, budget: int) -> float:
    """E[majority vote is correct] summing over vote-count vectors x with
    probability prod C(c_i, x_i) * C(u, b - sum x) / C(N, b)."""
    n = sum(counts) + unanswered
    total = 0.0
    for drawn in itertools.product(*(range(c + 1) for c in counts)):
        rest = budget - sum(drawn)
        if not 0 <= rest <= unanswered:
            continue
        weight = np.prod([comb(c, x) for c, x in zip(counts, drawn)]) * comb(unanswered, rest) / comb(n, budget)
        top = max(drawn)
        if top == 0:
            continue
        winners = [i for i, x in enumerate(drawn) if x == top]
        total += weight * sum(correct[i] for i in winners) / len(winners)
    return total


def test_best_of_n_equals_order_statistics_with_ties() -> None:
    rng = np.random.default_rng(3)
    scores = rng.choice([0.1, 0.4, 0.4, 0.7, 0.9], size=9)
    keys = [None if i == 4 else ("right" if i % 3 == 0 else f"wrong{i % 2}") for i in range(9)]
    samples = Samples.build(keys, {"right": True, "wrong0": False, "wrong1": False}, scores)
    for budget in range(1, 10):
        reference = bon_by_order_statistics(scores, samples.correct, budget)
        assert expected_accuracy("bon", samples, budget).accuracy == pytest.approx(reference, abs=1e-12)


def test_self_consistency_equals_hypergeometric_vote_counts() -> None:
    # 3 votes for x (correct), 3 for y, 2 for z, 2 without an answer.
    keys = ["x", "y", None, "x", "z", "y", "x", None, "y", "z"]
    samples = Samples.build(keys, {"x": True, "y": False, "z": False}, np.zeros(10))
    for budget in range(1, 11):
        reference = sc_by_hypergeometric([3, 3, 2], [True, False, False], 2, budget)
        assert expected_accuracy("sc", samples, budget).accuracy == pytest.approx(reference, abs=1e-12)


def test_weighted_vote_with_equal_rewards_is_the_majority_vote() -> None:
    keys = ["x", "y", None, "x", "z", "y", "x", None, "y", "z"]
    unit = Samples.build(keys, {"x": True, "y": False, "z": False}, np.full(10, 0.7))
    for budget in (2, 5, 8):
        assert expected_accuracy("wbon", unit, budget).accuracy == pytest.approx(
            expected_accuracy("sc", unit, budget).accuracy, abs=1e-12
        )


def test_pass_at_b_counts_subsets_holding_a_right_answer() -> None:
    # HAND: samples 0 and 2 are right. Pairs without either: only {1, 3}.
    assert [pass_at(HAND, b) for b in (1, 2, 3, 4)] == pytest.approx([2 / 4, 5 / 6, 1.0, 1.0])
    keys = ["x", "y", None, "x", "z", "y", "x", None, "y", "z"]
    samples = Samples.build(keys, {"x": True, "y": False, "z": False}, np.zeros(10))
    for budget in range(1, 11):
        subsets = list(itertools.combinations(range(10), budget))
        by_enumeration = sum(any(keys[i] == "x" for i in subset) for subset in subsets) / len(subsets)
        assert pass_at(samples, budget) == pytest.approx(by_enumeration, abs=1e-12)
        # No selection beats an oracle.
        assert all(expected_accuracy(s, samples, budget).accuracy <= pass_at(samples, budget) + 1e-12
                   for s in ("bon", "wbon", "sc"))


def test_random_subsets_when_there_are_too_many() -> None:
    rng = np.random.default_rng(11)
    scores = rng.random(20)
    correct = rng.random(20) < 0.4
    keys = ["right" if c else f"wrong{i}" for i, c in enumerate(correct)]
    samples = Samples.build(keys, {k: k == "right" for k in keys}, scores)
    estimate = expected_accuracy("bon", samples, 10, seed=5)
    assert not estimate.exhaustive and estimate.subsets == 2000
    exact = bon_by_order_statistics(scores, correct, 10)
    # 2,000 Bernoulli-like draws: standard error <= 0.5 / sqrt(2000) = 0.011.
    assert abs(estimate.accuracy - exact) < 0.045
    assert expected_accuracy("bon", samples, 10, seed=5) == estimate  # seeded: reproducible


def test_first_subset_choice_is_search_and_learns_prefix_rule() -> None:
    assert first_subset_choice("bon", HAND, 2) == 1  # 0.95 beats 0.9
    assert first_subset_choice("bon", HAND, 4) == 3
    assert first_subset_choice("sc", HAND, 2) == 0  # a-b tie: the earliest answer wins
    assert first_subset_choice("wbon", HAND, 2) == 1
    assert first_subset_choice("wbon", HAND, 3) == 0  # a: 1.1 beats b: 0.95
    nothing = Samples.build([None, None], {}, [0.3, 0.4])
    assert first_subset_choice("sc", nothing, 2) == 0  # no answer to vote for: the first sample
    assert first_subset_choice("wbon", nothing, 2) == 1  # no answer: the best-scoring sample
    assert expected_accuracy("sc", nothing, 1).accuracy == 0.0


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="between 1 and the number of samples"):
        expected_accuracy("bon", HAND, 5)
    with pytest.raises(ValueError, match="between 1 and the number of samples"):
        first_subset_choice("sc", HAND, 0)
    with pytest.raises(ValueError, match="unknown selection"):
        expected_accuracy("pf", HAND, 2)
    with pytest.raises(ValueError, match="no correctness given"):
        Samples.build(["a"], {}, [1.0])
    with pytest.raises(ValueError, match="not NaN"):
        Samples.build(["a"], {"a": True}, [float("nan")])
    with pytest.raises(ValueError, match="masses must be finite"):
        Samples.build(["a"], {"a": True}, [0.5], [float("inf")])


def test_unscored_samples_lose_best_of_n() -> None:
    # Scores: None, 0.3 (wrong), None (right), 0.1 (right).
    samples = Samples.build(["r", "w", "r", "r"], {"r": True, "w": False}, [None, 0.3, None, 0.1])
    # Pairs: {01} w; {02} tie of two unscored right ones -> 1; {03} r; {12} w; {13} w; {23} r -> 3/6.
    assert expected_accuracy("bon", samples, 2).accuracy == pytest.approx(3 / 6)
    assert first_subset_choice("bon", samples, 4) == 1
    # Unscored samples carry no mass in the weighted vote: w (0.3) beats r (0.1).
    assert expected_accuracy("wbon", samples, 4).accuracy == 0.0


def test_log_scale_rewards_vote_as_likelihoods() -> None:
    from piscale.eval.grade import samples_of

    candidates = [{"answer": "1", "score": -1.0}, {"answer": "2", "score": -1.2}, {"answer": "2", "score": -1.3}]
    as_log = samples_of(candidates, "1", "log")
    # Masses exp(s - max): answer 1 has 1.0; answer 2 has exp(-0.2) + exp(-0.3) = 1.56, and wins.
    assert as_log.masses == pytest.approx([1.0, np.exp(-0.2), np.exp(-0.3)])
    assert expected_accuracy("wbon", as_log, 3).accuracy == 0.0
    assert first_subset_choice("wbon", as_log, 3) == 1
    # Summed as raw scores, answer 1 (-1.0) would beat answer 2 (-2.5).
    as_probability = samples_of(candidates, "1", "probability")
    assert expected_accuracy("wbon", as_probability, 3).accuracy == 1.0
    # Pairs under the log scale: {0,1}: 1.0 vs 0.82 -> right; {0,2}: right; {1,2}: wrong -> 2/3.
    assert expected_accuracy("wbon", as_log, 2).accuracy == pytest.approx(2 / 3)


def test_equivalent_answers_vote_together() -> None:
    from piscale.eval.grade import samples_of

    candidates = [{"answer": "\\frac{1}{2}", "score": 0.1}, {"answer": "0.5", "score": 0.1}, {"answer": "3", "score": 0.9}]
    samples = samples_of(candidates, "1/2", "probability")
    assert list(samples.groups) == [0, 0, 1]
    assert list(samples.group_correct) == [True, False]
    assert expected_accuracy("sc", samples, 3).accuracy == 1.0


def test_samples_without_any_answer() -> None:
    from piscale.eval.grade import samples_of

    candidates = [{"answer": None, "score": 0.4}, {"answer": None, "score": None}]
    samples = samples_of(candidates, "3", "probability")
    assert list(samples.correct) == [False, False]
    for selection in ("bon", "wbon", "sc"):
        assert expected_accuracy(selection, samples, 1).accuracy == 0.0
        assert expected_accuracy(selection, samples, 2).accuracy == 0.0
