"""Grading through the harness: search results become graded rows."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from piscale.eval.grade import rows_from_result
from piscale.tasks import load_task
from piscale.grading import extract_answer

USAGE = {"generated_tokens": 120, "prompt_tokens": 40, "reward_calls": 8, "reward_steps": 16, "wall_time": 2.0}


def search_result(text: str, algorithm: str = "pf", budget: int = 4, seed: int = 0, candidates=None) -> dict:
    """A SearchResult.to_dict() as the search returns it: the answer is the
    last boxed expression of the chosen text."""
    return {
        "question": "q",
        "algorithm": algorithm,
        "budget": budget,
        "seed": seed,
        "settings": {},
        "answer": extract_answer(text),
        "text": text,
        "candidates": candidates or [],
        "usage": dict(USAGE),
        "trace": None,
    }


@pytest.mark.parametrize(
    ("response", "reference", "correct"),
    [
        ("So the sum is $\\boxed{\\frac{1}{2}}$.", "0.5", True),  # fraction vs decimal
        ("Simplify 6/8: \\boxed{\\frac{6}{8}}", "\\frac{3}{4}", True),  # equivalent fractions
        ("\\boxed{\\dfrac{3}{4}}", "0.75", True),
        ("The point is \\boxed{(3, \\frac{\\pi}{2})}", "\\left( 3, \\frac{\\pi}{2} \\right)", True),  # \left \right
        ("\\boxed{2\\sqrt{2}}", "\\sqrt{8}", True),
        ("\\boxed{(x+1)^2}", "x^2+2x+1", True),
        ("\\boxed{\\text{Evelyn}}", "\\text{Evelyn}", True),
        ("first \\boxed{3}, then corrected: \\boxed{4}", "4", True),  # the last box counts
        ("first \\boxed{4}, then corrected: \\boxed{3}", "4", False),
        ("\\boxed{0.4}", "0.5", False),  # wrong answers
        ("\\boxed{28}", "27", False),
        ("The answer is 27.", "27", False),  # no boxed answer
        ("\\boxed{27", "27", False),  # an unclosed box is no answer
    ],
)
def test_hand_checked_answers(response: str, reference: str, correct: bool) -> None:
    (row,) = rows_from_result(search_result(response), "p1", reference, [4])
    assert row.correct is correct
    assert row.expected_accuracy == float(correct)
    assert (row.problem_id, row.algorithm, row.budget, row.seed) == ("p1", "pf", 4, 0)
    assert not row.subsampled and row.samples_from == 4
    assert row.generated_tokens == 120 and row.wall_time == 2.0


def test_gsm8k_references_from_hash_lines(tmp_path: Path) -> None:
    path = tmp_path / "gsm.jsonl"
    path.write_text(
        json.dumps({"question": "Total cost?", "answer": "1000 + 234 = <<1000+234=1234>>1234\n#### 1,234"}) + "\n"
        + json.dumps({"question": "Eggs?", "answer": "16-3-4=9, 9*2=18\n#### 18"}) + "\n"
    )
    problems = load_task(str(path)).problems
    cases = [
        (problems[0], "That is \\boxed{1234} dollars.", True),
        (problems[0], "That is \\boxed{1,234} dollars.", True),
        (problems[0], "That is \\boxed{1243}.", False),
        (problems[1], "She makes \\boxed{18}", True),
        (problems[1], "She makes 18 dollars", False),
    ]
    for problem, response, correct in cases:
        (row,) = rows_from_result(search_result(response), problem.id, problem.reference, [4])
        assert row.correct is correct, (problem.reference, response)


def test_subsampled_rows_from_one_best_of_n_run() -> None:
    # Samples in order: a correct 1/2 (0.9), a wrong 0.4 (0.95), a correct 2/4 (0.2), no answer (0.99).
    texts = ["\\boxed{\\frac{1}{2}}", "\\boxed{0.4}", "\\boxed{2/4}", "I am not sure."]
    scores = [0.9, 0.95, 0.2, 0.99]
    candidates = [
        {"text": t, "answer": extract_answer(t), "score": s, "log_weight": 0.0, "finished": True}
        for t, s in zip(texts, scores)
    ]
    for algorithm, expected in (("bon", [0.5, 1 / 6, 0.0]), ("wbon", [0.5, 0.5, 1.0]), ("sc", [0.5, 4 / 6, 1.0])):
        result = search_result("I am not sure.", algorithm=algorithm, budget=4, seed=3, candidates=candidates)
        result["answer"] = {"bon": None, "wbon": "\\frac{1}{2}", "sc": "\\frac{1}{2}"}[algorithm]
        rows = rows_from_result(result, "p", "0.5", [1, 2, 4])
        assert [r.budget for r in rows] == [1, 2, 4]
        assert [r.expected_accuracy for r in rows] == pytest.approx(expected, abs=1e-12), algorithm
        assert [r.subsampled for r in rows] == [True, True, False]
        assert all(r.samples_from == 4 and r.seed == 3 for r in rows)
        # Costs scale with the samples used.
        assert [r.generated_tokens for r in rows] == [30, 60, 120]
        assert [r.reward_calls for r in rows] == [2, 4, 8]
        # The stored answers: first-b selections, and the search's own at b = N.
        assert rows[-1].answer == result["answer"]
    bon = rows_from_result({**search_result("x", "bon", 4, 0, candidates), "answer": None}, "p", "0.5", [1, 2])
    assert [(r.answer, r.correct) for r in bon] == [("\\frac{1}{2}", True), ("0.4", False)]


def test_bad_results_are_refused() -> None:
    with pytest.raises(ValueError, match="cannot give rows for budgets"):
        rows_from_result(search_result("\\boxed{1}", "pf", 4), "p", "1", [1, 4])
    with pytest.raises(ValueError, match="returned 1 samples"):
        rows_from_result(
            search_result("\\boxed{1}", "bon", 4, candidates=[{"answer": "1", "score": 0.5}]), "p", "1", [4]
        )
    incomplete = search_result("\\boxed{1}")
    del incomplete["usage"]["generated_tokens"]
    with pytest.raises(ValueError, match="usage lacks generated_tokens"):
        rows_from_result(incomplete, "p", "1", [4])
    two = [{"answer": "1", "score": 0.5}, {"answer": "2", "score": 0.1}]
    with pytest.raises(ValueError, match="outside 1..2"):
        rows_from_result(search_result("\\boxed{1}", "sc", 2, candidates=two), "p", "1", [1, 4])
