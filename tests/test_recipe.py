"""The shared fine-tuning recipe: its settings and the early-stopping rule."""

from __future__ import annotations

import math

import pytest

from piscale.recipe import (
    Indicators,
    Recipe,
    RecipeError,
    early_indicators,
    rank_agreement,
    rank_by_early_indicators,
)


def test_early_indicators_average_the_first_steps_only():
    found = early_indicators([3.0, 2.0, 1.0, 100.0], [0.5, 1.5, 1.0, 100.0], steps=3)
    assert found == Indicators(steps=3, grad_norm=1.0, loss=2.0)


def test_early_indicators_refuse_short_or_diverged_runs():
    with pytest.raises(RecipeError, match="has 2 steps"):
        early_indicators([1.0, 1.0], [1.0, 1.0], steps=3)
    with pytest.raises(RecipeError, match="diverged"):
        early_indicators([1.0, math.nan], [1.0, 1.0], steps=2)
    with pytest.raises(RecipeError, match="2 losses but 1"):
        early_indicators([1.0, 1.0], [1.0], steps=1)


def indicators(grad_norm: float, loss: float) -> Indicators:
    return Indicators(steps=5, grad_norm=grad_norm, loss=loss)


def test_the_rule_prefers_low_gradient_norm_and_high_loss():
    runs = {
        "calm-and-slow": indicators(grad_norm=0.5, loss=2.0),  # best on both indicators
        "middling": indicators(grad_norm=1.0, loss=1.5),
        "noisy-and-fast": indicators(grad_norm=2.0, loss=1.0),  # worst on both
    }
    assert rank_by_early_indicators(runs) == ["calm-and-slow", "middling", "noisy-and-fast"]
    # the order of the mapping does not matter
    assert rank_by_early_indicators(dict(reversed(runs.items()))) == ["calm-and-slow", "middling", "noisy-and-fast"]


def test_the_rule_averages_the_two_ranks_and_breaks_ties_by_gradient_norm():
    runs = {
        # ranks (norm, loss): a (1, 4) -> 2.5; b (2, 3) -> 2.5; c (3, 1) -> 2.0; d (4, 2) -> 3.0
        "a": indicators(grad_norm=0.1, loss=1.0),
        "b": indicators(grad_norm=0.2, loss=1.1),
        "c": indicators(grad_norm=0.3, loss=3.0),
        "d": indicators(grad_norm=0.4, loss=2.0),
    }
    # c has the best mean rank; a and b tie at 2.5, and a's norm is lower
    assert rank_by_early_indicators(runs) == ["c", "a", "b", "d"]


def test_tied_values_share_their_rank():
    runs = {"x": indicators(1.0, 2.0), "y": indicators(1.0, 2.0), "z": indicators(0.5, 1.0)}
    # x and y: norm rank 2.5, loss rank 1.5 -> 2.0; z: norm 1, loss 3 -> 2.0; all tie, z has the lower norm
    assert rank_by_early_indicators(runs) == ["z", "x", "y"]


def test_rank_agreement_is_spearmans_correlation():
    assert rank_agreement(["a", "b", "c"], ["a", "b", "c"]) == pytest.approx(1.0)
    assert rank_agreement(["a", "b", "c"], ["c", "b", "a"]) == pytest.approx(-1.0)
    # d = (0, 1, 1, 0... ) for a swap of the last two of four: 1 - 6*2/(4*15) = 0.8
    assert rank_agreement(["a", "b", "c", "d"], ["a", "b", "d", "c"]) == pytest.approx(0.8)
    assert math.isnan(rank_agreement(["a"], ["a"]))
    with pytest.raises(RecipeError):
        rank_agreement(["a", "b"], ["a", "c"])


def test_recipe_refuses_bad_settings():
    Recipe()
    for bad in ({"learning_rate": 0}, {"examples_per_step": 0}, {"micro_batch": 1.5}, {"max_grad_norm": 0}):
        with pytest.raises(RecipeError):
            Recipe(**bad)
