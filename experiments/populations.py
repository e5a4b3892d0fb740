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

A database holding several configurations (model, reward, dataset) gets one
table per configuration.

    python experiments/populations.py experiments/db/NAME.sqlite
"""

from __future__ import annotations

import sys
from collections import defaultdict
from pathlib import Path

from piscale.eval.grade import final_population, grade
from piscale.eval.store import ResultStore
from piscale.search.select import group_answers, tied_answers


# best-of-N's samples are the ones weighted best-of-N and self-consistency choose from
SHARED_SAMPLES = "bon, wbon, sc (shared samples)"

Row = tuple[str, int, int, float, float, "float | None"]


def population_rows(store: ResultStore, config_key: str) -> list[Row]:
    searches = store.searches(config_key)
    references = {r["problem_id"]: r["reference"] for r in store.results(config_key)}
    cells = {(s["algorithm"], s["budget"]) for s in searches}
    reached = defaultdict(set)
    for s in searches:
        reached[s["problem_id"]].add((s["algorithm"], s["budget"]))
    complete = {problem for problem, done in reached.items() if done == cells}
    stats = defaultdict(list)
    for s in searches:
        if s["problem_id"] not in complete:
            continue
        answers, log_weights = final_population(store.search(s["search_id"]))
        reference = references[s["problem_id"]]
        stats[(s["algorithm"], s["budget"])].append((
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


def table(rows: list[Row]) -> list[str]:
    lines = [
        "| algorithm | budget | searches | distinct final answers | a correct one among them | largest weight tied across answers |",
        "|---|---|---|---|---|---|",
    ]
    for algorithm, budget, n, distinct, covered, tied in rows:
        shown = SHARED_SAMPLES if algorithm == "bon" else algorithm
        tied_text = "–" if tied is None else f"{tied:.0f}%"
        lines.append(f"| {shown} | {budget} | {n} | {distinct:.1f} | {covered:.0f}% | {tied_text} |")
    return lines


def markdown(db: Path) -> str:
    with ResultStore(db, read_only=True) as store:
        configs = store.configs()
        if not configs:
            sys.exit(f"{db} holds no results")
        blocks = []
        for config in configs:
            lines = table(population_rows(store, config["config_key"]))
            if len(configs) > 1:
                heading = f"{config['dataset']}, {config['model']}, reward {config['reward']} ({config['config_key']}):"
                lines = [heading, ""] + lines
            blocks.append("\n".join(lines))
    return "\n\n".join(blocks) + "\n"


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python experiments/populations.py DB")
    print(markdown(Path(sys.argv[1])), end="")
