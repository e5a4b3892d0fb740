"""Answer extraction and equivalence, on hand-checked cases."""

import pytest

from piscale.grading import answers_equal, extract_answer, gsm8k_reference, is_correct, normalize_answer


@pytest.mark.parametrize(
    ("text", "answer"),
    [
        (r"so \boxed{42}.", "42"),
        (r"first \boxed{1} then \boxed{\frac{3}{4}}", r"\frac{3}{4}"),
        (r"\boxed{\left( 3, \frac{\pi}{2} \right)}", r"\left( 3, \frac{\pi}{2} \right)"),
        (r"an unclosed \boxed{12", None),
        ("no box at all: 12", None),
    ],
)
def test_extract_answer_takes_the_last_complete_box(text, answer):
    assert extract_answer(text) == answer


@pytest.mark.parametrize(
    ("predicted", "reference", "equal"),
    [
        (r"\frac{1}{2}", "0.5", True),
        ("6/8", r"\frac{3}{4}", True),
        (r"\$18", "18", True),
        ("18", "18.0", True),
        ("x+1", "1+x", True),
        ("0.7", "3/4", False),
        ("19", "18", False),
        (None, "18", False),
    ],
)
def test_answers_equal(predicted, reference, equal):
    assert answers_equal(predicted, reference) is equal


def test_votes_group_equivalent_forms():
    assert normalize_answer(r"\frac{6}{8}") == normalize_answer("3/4")
    assert normalize_answer(r"\$18") == normalize_answer("18")


def test_gsm8k_reference_and_grading():
    assert gsm8k_reference("She makes 9 * 2 = $18.\n#### 1,018") == "1018"
    with pytest.raises(ValueError, match="####"):
        gsm8k_reference("no marker")
    assert is_correct(r"The total is \boxed{1018}.", "1018")
    assert not is_correct("The total is 1018.", "1018")
