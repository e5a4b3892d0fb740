"""What the final populations of a results database hold: a table for
docs/results.md that explains the accuracy tables.

For each algorithm and budget that ran (stored searches, not subsampled
rows), over the problems every search reached:

* distinct answers among the final candidates (equivalent answers pooled, as
  the weighted vote pools them), averaged over searches;
* the share of searches with a correct answer among the final candidates:
  what a perfect final choice would reach (for best-of-N this is pass@N);
* the share of searches whose largest final weight is shared by particles
  with different answers, where the largest-weight rule has nothing to go
  on and returns the first of them ("–" where a search has a single
  candidate).

    python experiments/populations.py experiments/db/NAME.sqlite
"""

from __future__ import annotations

import json
import sqlite3
import sys
from collections import defaultdict
from pathlib import Path

from piscale.eval.grade import final_population, grade
from piscale.search.select import group_answers, tied_answers


# best-of-N's samples are the ones weighted best-of-N and self-consistency choose from
SHARED_SAMPLES = "bon, wbon, sc (shared samples)"


def population_rows(db: Path) -> list[tuple[str, int, int, float, float, float | None]]:
    connection = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    searches = connection.execute(
        """SELECT s.problem_id, s.algorithm, s.budget, s.result, r.reference
           FROM searches s JOIN results r
             ON r.search_id = s.search_id AND r.algorithm = s.algorithm AND r.budget = s.budget
                AND r.variant = s.variant"""
    ).fetchall()
    connection.close()
    cells = {(algorithm, budget) for _, algorithm, budget, _, _ in searches}
    reached = defaultdict(set)
    for problem, algorithm, budget, _, _ in searches:
        reached[problem].add((algorithm, budget))
    complete = {problem for problem, done in reached.items() if done == cells}
    stats = defaultdict(list)
    for problem, algorithm, budget, result, reference in searches:
        if problem not in complete:
            continue
        answers, log_weights = final_population(json.loads(result))
        stats[(algorithm, budget)].append((
            len({g for g in group_answers(answers) if g is not None}),
            any(grade(a, reference) for a in answers),
            None if len(answers) < 2 else tied_answers(answers, log_weights),
        ))
    rows = []
    for (algorithm, budget), found in sorted(stats.items()):
        n = len(found)
        ties = [f[2] for f in found if f[2] is not None]
        rows.append((algorithm, budget, n, sum(f[0] for f in found) / n, 100 * sum(f[1] for f in found) / n,
                     100 * sum(ties) / len(ties) if ties else None))
    return rows


def markdown(db: Path) -> str:
    lines = [
        "| algorithm | budget | searches | distinct final answers | a correct one among them | largest weight tied across answers |",
        "|---|---|---|---|---|---|",
    ]
    for algorithm, budget, n, distinct, covered, tied in population_rows(db):
        shown = SHARED_SAMPLES if algorithm == "bon" else algorithm
        tied_text = "–" if tied is None else f"{tied:.0f}%"
        lines.append(f"| {shown} | {budget} | {n} | {distinct:.1f} | {covered:.0f}% | {tied_text} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python experiments/populations.py DB")
    print(markdown(Path(sys.argv[1])), end="")
