"""``piscale solve`` on the exact toy model: progress lines, grading against
a reference, and the comparison with one sample at the same seed."""

from __future__ import annotations

import re

from typer.testing import CliRunner

from piscale import api
from piscale.cli import app
from piscale.lm.toy import ToyLM


def run(*args: str):
    result = CliRunner().invoke(app, ["solve", *args], env={"COLUMNS": "300"})
    return result.exit_code, result.stdout, result.stderr


def test_progress_reference_and_comparison_match_the_searches_they_describe() -> None:
    code, out, err = run("2 + 3", "--model", "toy", "--reward", "arith", "--budget", "4", "--seed", "0",
                         "--reference", "5", "--progress", "--compare")
    assert code == 0, out + err
    search = api.solve("2 + 3", model=ToyLM(), reward="arith", budget=4, seed=0, trace=True)
    single = api.solve("2 + 3", model=ToyLM(), reward=None, algorithm="bon", budget=1, seed=0)
    assert (search.answer, single.answer) == ("5", "3")  # the case this test is about
    steps = [line for line in err.splitlines() if line.strip().startswith("step")]
    assert len(steps) == len(search.trace["steps"])  # one line per step of the sweep
    assert re.match(r"\s*step +1 · \d/4 particles alive · ESS [\d.]+", steps[0])
    assert f"{search.usage['generated_tokens']} tokens" in steps[-1]
    assert "answer: 5 (right)" in out
    assert (
        f"one sample (seed 0): 3 (wrong), {single.usage['generated_tokens']} tokens" in out
        and f"pf at budget 4: 5 (right), {search.usage['generated_tokens']} tokens" in out
    )


def test_without_a_reference_nothing_is_graded() -> None:
    code, out, err = run("2 + 3", "--model", "toy", "--reward", "arith", "--budget", "2")
    assert code == 0, out + err
    assert "(right)" not in out and "(wrong)" not in out and "particles alive" not in err
