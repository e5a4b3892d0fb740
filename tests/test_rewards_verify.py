"""The final-answer verifier and the arithmetic step checker."""

from __future__ import annotations

from fractions import Fraction

import pytest

from piscale.rewards import ArithmeticReward, VerifierReward, find_equations, score_trajectories
from piscale.rewards.verify import ArithmeticSyntaxError, evaluate


async def test_verifier_scores_equivalent_answers():
    verifier = VerifierReward("\\frac{1}{2}")
    steps = ["Half of it is left.", "So the answer is \\boxed{0.5}."]
    assert await verifier.score(["q"], [steps]) == [[0.5, 1.0]]
    wrong = ["So the answer is \\boxed{2/3}."]
    assert await verifier.score(["q"], [wrong]) == [[0.0]]
    assert verifier.outcome_only


async def test_verifier_with_a_reference_per_prompt():
    verifier = VerifierReward({"p1": "7", "p2": "42"}, unanswered=0.0)
    scores = await score_trajectories(
        verifier, ["p1", "p2", "p2"], [["\\boxed{7}"], ["\\boxed{7}"], ["no box"]], "model"
    )
    assert scores == [1.0, 0.0, 0.0]
    with pytest.raises(KeyError, match="no reference answer"):
        await verifier.score(["p3"], [["\\boxed{1}"]])
    with pytest.raises(ValueError, match="empty"):
        VerifierReward("  ")


@pytest.mark.parametrize(
    ("text", "claims"),
    [
        ("12 * 7 = 84", [("12 * 7", "84", True)]),
        ("3+4=7", [("3 + 4", "7", True)]),
        ("48/2 = 24", [("48 / 2", "24", True)]),
        ("$5 \\times 3 = 15$", [("5 * 3", "15", True)]),
        ("She has <<16-3-4=9>>9 eggs left", [("16 - 3 - 4", "9", True)]),
        ("so 12 * 7 = 86 dollars", [("12 * 7", "86", False)]),
        ("$\\frac{3}{4} \\div 3 = 0.25$", [("( ( 3 ) / ( 4 ) ) / 3", "0.25", True)]),
        ("10 / 3 = 3.33, roughly", [("10 / 3", "3.33", True)]),
        ("10 / 3 = 3.3", [("10 / 3", "3.3", True)]),
        ("10 / 3 = 3.4", [("10 / 3", "3.4", False)]),
        ("1,250 + 750 = 2,000", [("1250 + 750", "2000", True)]),
        ("2 + 3 = 5 = 6", [("2 + 3", "5", True), ("5", "6", False)]),
        ("(4 x 5 = 20)", [("4 * 5", "20", True)]),
        ("25% * 80 = 20", [("25% * 80", "20", True)]),
        ("2^5 - 2 = 30", [("2 ^ 5 - 2", "30", True)]),
        ("9 / 0 = 0", [("9 / 0", "0", False)]),
        ("In 2024 there were 3 cats = many", []),
        ("x = 5 and 7 = 7", []),
    ],
)
def test_find_equations(text, claims):
    found = [(e.left, e.right, e.holds) for e in find_equations(text)]
    assert found == claims


def test_evaluate_is_exact_and_refuses_code():
    assert evaluate("(1 + 2) * 3 / 4") == Fraction(9, 4)
    assert evaluate("0.1 + 0.2") == Fraction(3, 10)
    assert evaluate("-2^2") == -4
    with pytest.raises(ArithmeticSyntaxError):
        evaluate("__import__('os')")
    with pytest.raises(ArithmeticSyntaxError):
        evaluate("2 ^ 1000")


async def test_arithmetic_reward_fraction_of_true_equations():
    reward = ArithmeticReward()
    steps = [
        "Natalia sold 48 / 2 = 24 clips in May.",  # 1 of 1
        "Altogether 48 + 24 = 72, and 72 * 2 = 140.",  # 1 of 2
        "3 + 4 = 7, 7 * 3 = 20, and 20 - 1 = 18.",  # 1 of 3
        "She is happy.",  # no equation
    ]
    scores = await reward.score(["q"], [steps])
    assert scores == [[1.0, 0.5, pytest.approx(1 / 3), 0.5]]
    # Under 'model' aggregation the whole answer is one step: 3 of 6 hold.
    assert await score_trajectories(reward, ["q"], [steps], "model") == [0.5]
    neutral = ArithmeticReward(no_equation=1.0)
    assert (await neutral.score(["q"], [["No numbers here."]])) == [[1.0]]
