"""Pool paired comparisons over disjoint sets of problems.

``experiments/value_pairs.py`` pairs a particle-filtering run with its
baselines over the problems of one run and keeps every problem's accuracies.
Runs over different problems (test problems 0-99 in one database, 100-199 in
another) are pooled here: the problems are put together, each keeping the
accuracies its own run gave it, and every accuracy and paired difference that
all the inputs share is computed again over the union. A problem may appear
in one input only: counting it twice would narrow the intervals for nothing.

    .venv/bin/python experiments/pool_pairs.py experiments/values/value-pairs-test-100-2seeds.json \\
        experiments/values/value-pairs-test-100-199.json --out experiments/values/value-pairs-test-200.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from value_pairs import comparisons, print_comparisons  # experiments/, the directory of this script


def pool(reports: list[dict]) -> dict:
    """The accuracies and paired differences shared by every report, over
    the union of their problems."""
    for report in reports:
        if "per_problem" not in report:
            raise SystemExit(f"{report.get('database')}: written without per-problem accuracies; run value_pairs.py again")
    names = [n for n in reports[0]["per_problem"] if all(n in r["per_problem"] for r in reports)]
    problems: list[str] = []
    for report in reports:
        shared = set(problems) & set(report["problems"])
        if shared:
            raise SystemExit(f"problems {sorted(shared)[:5]} appear in more than one input")
        problems += report["problems"]
    scores = {n: [v for r in reports for v in (r["per_problem"][n][p] for p in r["problems"])] for n in names}
    pairs = [tuple(key.split(" - ", 1)) for key in reports[0]["paired"] if all(key in r["paired"] for r in reports)]
    pairs = [(search, baseline) for search, baseline in pairs if search in scores and baseline in scores]
    return {"problems": len(problems), **comparisons(scores, pairs)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("reports", type=Path, nargs="+", help="value_pairs.py's JSON files, over disjoint problems")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    reports = [json.loads(path.read_text()) for path in args.reports]
    pooled = pool(reports)
    pooled["inputs"] = [
        {"file": str(path), "database": r["database"], "reward": r["reward"], "baseline_reward": r["baseline_reward"],
         "seeds": r["seeds"], "problems": len(r["problems"])}
        for path, r in zip(args.reports, reports)
    ]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(pooled, indent=2) + "\n")
    print(f"{pooled['problems']} problems from {len(reports)} runs")
    print_comparisons(pooled)


if __name__ == "__main__":
    main()
