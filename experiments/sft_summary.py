"""Per model of an SFT results database (experiments/sft.sh): pass@1 (the
mean accuracy of the samples), best-of-4 by the arithmetic checker, pass@4,
each with a 95% Wilson interval over the problems every model was
evaluated on, and two checks of the answer
format: how many samples end with a boxed answer (the grader reads only
that), and how many would be right by a lenient grade (the last number of
the answer equals the reference).

    python experiments/sft_summary.py runs/sft/gsm8k-smollm2-135m.sqlite
"""

from __future__ import annotations

import json
import re
import sqlite3
import sys

from piscale.eval.stats import wilson_interval
from piscale.grading import answers_equal, extract_answer


def cell(successes: float, n: int) -> str:
    """A percentage over ``n`` problems with its 95% Wilson interval."""
    low, high = wilson_interval(successes / n, n)
    return f"{100 * successes / n:.1f} [{100 * low:.1f}, {100 * high:.1f}]"


def main(path: str) -> None:
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    print("| model | problems | samples | pass@1 | best-of-4 (arith) | pass@4 | boxed answers | last number right |")
    print("|---|---|---|---|---|---|---|---|")
    configs = db.execute("SELECT config_key, model FROM configs ORDER BY created_at").fetchall()
    # only the problems every model was evaluated on, so the rows compare like with like
    common = set.intersection(
        *({p for (p,) in db.execute("SELECT problem_id FROM searches WHERE config_key = ?", (key,))} for key, _ in configs)
    )
    for key, model in configs:
        rows = db.execute(
            "SELECT s.problem_id, s.result, r.reference, r.correct FROM searches s JOIN results r "
            "ON r.search_id = s.search_id AND r.budget = s.budget WHERE s.config_key = ? ORDER BY s.problem_id", (key,)
        ).fetchall()
        rows = [row[1:] for row in rows if row[0] in common]
        samples = boxed = lenient = 0
        per_problem, best, any_right = [], 0, 0
        for result, reference, correct in rows:
            right = 0
            for candidate in json.loads(result)["candidates"]:
                samples += 1
                answer = extract_answer(candidate["text"])
                boxed += answer is not None
                right += answer is not None and answers_equal(answer, reference)
                numbers = re.findall(r"-?\d[\d,]*(?:\.\d+)?", candidate["text"])
                lenient += bool(numbers) and answers_equal(numbers[-1].replace(",", ""), reference)
            per_problem.append(right / len(json.loads(result)["candidates"]))
            best += int(correct)
            any_right += right > 0
        n = len(rows)
        if not n:
            continue
        print(f"| {model} | {n} | {samples} | {cell(sum(per_problem), n)} | {cell(best, n)} | {cell(any_right, n)} | "
              f"{boxed}/{samples} | {lenient}/{samples} |")


if __name__ == "__main__":
    main(sys.argv[1])
