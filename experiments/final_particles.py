"""What a particle filter's final particles hold, for several rewards on the same problems.

Reads the pf runs stored by ``piscale eval`` in one database, one per reward
spec, and measures each over the problems they all hold (the mean over a
problem's seeds, then over problems):

* the accuracy of the run's answer (largest weight) and of the weighted vote;
* how often a final particle holds a correct answer, and how many distinct
  answers and distinct texts the final particles hold;
* the effective sample size of the final weights;
* how many final particles hold no boxed answer;
* generated tokens per problem.

    .venv/bin/python experiments/final_particles.py experiments/db/gsm8k-qwen2.5-coder-0.5b-terminal-pf.sqlite \\
        --reward 'value*arith' --reward 'value*arith*final:certainty^10' --seeds 0 --out final.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from piscale.eval.grade import final_population
from piscale.eval.store import ResultStore
from piscale.grading import extract_boxed
from piscale.smc import effective_sample_size
from value_pairs import pf_rows, problem_means, seed_means  # experiments/, the directory of this script


def particle_means(store: ResultStore, found: dict[str, list[dict]], problems: list[str]) -> dict[str, list[float]]:
    """Per problem, the mean over its seeds of the distinct texts, the final
    ESS, the particles without a boxed answer and the generated tokens."""

    def measure(result: dict, row: dict) -> tuple[float, ...]:
        _, log_weights = final_population(result)
        weights = np.exp(np.asarray(log_weights) - np.max(log_weights))
        texts = [c["text"] for c in result["candidates"]]
        return (
            len(set(texts)),
            effective_sample_size(weights / weights.sum()),
            sum(extract_boxed(text) is None for text in texts),
            float(row["generated_tokens"]),
        )

    names = ("distinct texts", "final ESS", "without a boxed answer", "generated tokens")
    return problem_means(store, found, problems, names, measure)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("db", help="a database holding a pf run under each --reward")
    parser.add_argument("--reward", action="append", required=True, help="a pf run's reward spec (repeatable)")
    parser.add_argument("--budget", type=int, default=8)
    parser.add_argument("--seeds", default=None, help="comma-separated seeds (default: every stored seed)")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()

    store = ResultStore(args.db)
    seeds = None if args.seeds is None else {int(s) for s in args.seeds.split(",")}
    runs = {}
    for reward in args.reward:
        found = pf_rows(store, reward, args.budget, None, None)
        if seeds is not None:
            found = {p: [r for r in rows if r["seed"] in seeds] for p, rows in found.items()}
        runs[reward] = {p: rows for p, rows in found.items() if rows}
    problems = sorted(set.intersection(*(set(found) for found in runs.values())))
    if not problems:
        raise SystemExit("no problem holds a pf run under every --reward")
    table = {}
    for reward, found in runs.items():
        means = {**seed_means(store, found, problems), **particle_means(store, found, problems)}
        table[reward] = {name: float(np.mean(values)) for name, values in means.items()}
        print(reward, {name: round(value, 3) for name, value in table[reward].items()})
    args.out.write_text(json.dumps({
        "db": args.db, "budget": args.budget, "seeds": args.seeds, "problems": len(problems), "table": table,
    }, indent=2) + "\n")


if __name__ == "__main__":
    main()
