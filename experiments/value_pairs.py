"""Particle filtering against best-of-N under the same learned reward, paired by problem.

Best-of-N and weighted best-of-N need no new generation to be measured under
a new reward: ``experiments/reward_table.py`` re-scores one stored set of
answers per problem and records, per problem, the accuracy of each selection
at each budget (the mean over subsets of that many answers, as ``piscale
report`` averages them). This
script pairs those with a particle-filtering run stored by ``piscale eval``
under the same reward on the same problems (its configuration names the
head file by hash), and writes the paired differences with their 95%
intervals as JSON.

PF's answer is taken twice: as the run chose it, and re-chosen from the same
final particles by the weighted vote (as ``piscale report`` does, †). Beside
the accuracies, what a vote has to work with: how many distinct answers the
final particles hold and how often one of them is correct, against the same
for ``budget`` independent samples (the mean over subsets of the stored
answers: pass@b and the expected number of distinct answers). A run with
several seeds counts each problem as the mean over its seeds. With
``--baseline-reward`` (and ``--baseline-table``) the baselines are bon and
wbon under another reward on the same answers, e.g. a free one the learned
value has to beat. With ``--pf-baseline-reward`` the run is also paired with
the pf run stored beside it under another reward, seed for seed.

    .venv/bin/python experiments/value_pairs.py \\
        --table experiments/values/reward-table-test-100.json --reward value \\
        --db runs/gsm8k-qwen2.5-coder-0.5b-value.sqlite --budget 8 \\
        --out experiments/values/value-pairs-test.json
"""

from __future__ import annotations

import argparse
import json
import math
import platform
from pathlib import Path

import numpy as np

from piscale.eval.grade import answer_by_selection, final_population, grade, samples_of
from piscale.eval.stats import paired_difference, wilson_interval
from piscale.eval.store import ResultStore
from piscale.eval.subsample import pass_at
from piscale.search.select import group_answers
from reward_table import answer_sets  # experiments/, the directory of this script


def pf_rows(
    store: ResultStore, reward: str, budget: int, head_sha256: str | None, variant: str | None
) -> dict[str, list[dict]]:
    """The stored pf results at ``budget`` under the reward spec ``reward``
    whose configuration holds the value head with this hash (the only such
    configuration, when None): per problem, one row per seed."""
    configs = [c for c in store.configs() if c["reward"] == reward]
    if head_sha256 is not None:
        configs = [
            c for c in configs if any(head_sha256 in m["identity"] for m in c["description"]["reward"]["models"])
        ]
    if len(configs) != 1:
        raise SystemExit(f"{len(configs)} configurations with reward {reward!r} match; pass --head-sha256")
    config = configs[0]["config_key"]
    rows = [r for r in store.results(config) if r["algorithm"] == "pf" and r["budget"] == budget]
    variants = sorted({r["variant"] for r in rows})
    if variant is None:
        if len(variants) != 1:
            raise SystemExit(f"pf@{budget} is stored in {len(variants)} variants ({variants}); pass --variant")
        variant = variants[0]
    found: dict[str, list[dict]] = {}
    for r in sorted(rows, key=lambda r: r["seed"]):
        if r["variant"] == variant:
            found.setdefault(r["problem_id"], []).append(r)
    return found


def independent_diversity(table: dict, budget: int) -> dict[str, tuple[float, float]]:
    """Per problem of the table's answer sets: pass@budget and the expected
    number of distinct answers among ``budget`` of them drawn without
    replacement (each answer group is present unless all ``budget`` draws
    miss it)."""
    databases = [Path(p) for p in table.get("databases") or [table["database"]]]
    _, _, sets, _ = answer_sets(databases, table.get("answer_budget", table["answers_per_problem"]), table["config"])
    first = ResultStore(databases[0], read_only=True)  # every problem paired is in the first database
    references = {r["problem_id"]: r["reference"] for r in first.results(table["config"])}
    found = {}
    for answer_set in sets:
        if answer_set["problem_id"] not in table["problems"]:
            continue
        candidates = answer_set["candidates"][: table["answers_per_problem"]]
        groups = [g for g in group_answers([c.get("answer") for c in candidates]) if g is not None]
        n = len(candidates)
        distinct = sum(1 - math.comb(n - groups.count(g), budget) / math.comb(n, budget) for g in set(groups))
        reference = references[answer_set["problem_id"]]
        found[answer_set["problem_id"]] = (pass_at(samples_of(candidates, reference), budget), distinct)
    return found


def problem_means(
    store: ResultStore, found: dict[str, list[dict]], problems: list[str], names: tuple[str, ...], measure
) -> dict[str, list[float]]:
    """Per problem, the mean over its seeds of ``measure(result, row)``, a
    tuple of numbers named ``names``. The paired interval then resamples
    problems, with each problem's seeds kept together."""
    means: dict[str, list[float]] = {name: [] for name in names}
    for p in problems:
        per_seed = [measure(store.search(row["search_id"]), row) for row in found[p]]
        for name, value in zip(names, np.mean(per_seed, axis=0)):
            means[name].append(float(value))
    return means


def seed_means(store: ResultStore, found: dict[str, list[dict]], problems: list[str]) -> dict[str, list[float]]:
    """Per problem, the mean over its seeds of: the run's answer graded, the
    weighted vote of its final particles graded, whether those particles hold
    a correct answer, and how many distinct answers they hold."""

    def measure(result: dict, row: dict) -> tuple[float, ...]:
        answers, _ = final_population(result)
        return (
            float(row["expected_accuracy"]),
            float(grade(answer_by_selection(result, "weighted-vote"), row["reference"])),
            float(any(grade(a, row["reference"]) for a in set(answers) if a is not None)),
            len({g for g in group_answers(answers) if g is not None}),
        )

    return problem_means(store, found, problems, ("pf", "pf weighted vote", "covered", "distinct"), measure)


def comparisons(scores: dict[str, list[float]], pairs: list[tuple[str, str]]) -> dict:
    """Each accuracy (per-problem scores over the same problems) with its 95%
    Wilson interval, and each pair's paired difference (search - baseline)
    with its 95% interval over problems."""
    accuracy, paired = {}, {}
    for name, values in scores.items():
        mean = float(np.mean(values))
        accuracy[name] = {"mean": mean, "wilson_95": list(wilson_interval(mean, len(values)))}
    for search, baseline in pairs:
        mean, low, high = paired_difference(scores[search], scores[baseline])
        paired[f"{search} - {baseline}"] = {"mean": mean, "interval_95": [low, high]}
    return {"accuracy": accuracy, "paired": paired}


def print_comparisons(report: dict) -> None:
    """A report's accuracies and paired differences, in points."""
    for name, cell in report["accuracy"].items():
        print(f"  {name:28s} {100 * cell['mean']:5.1f}")
    for name, cell in report["paired"].items():
        low, high = cell["interval_95"]
        print(f"  {name:40s} {100 * cell['mean']:+6.1f} [{100 * low:+.1f}, {100 * high:+.1f}]")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--table", type=Path, required=True, help="reward_table.py's JSON")
    parser.add_argument("--reward", required=True, help="the table's row for the reward spec the pf run used")
    parser.add_argument("--db", type=Path, required=True, help="the pf run's database")
    parser.add_argument("--baseline-reward", default=None,
                        help="the table's row whose bon and wbon the pf run is paired with (default: --reward)")
    parser.add_argument("--baseline-table", type=Path, default=None,
                        help="reward_table.py's JSON holding that row, over the same answers (default: --table)")
    parser.add_argument("--pf-baseline-reward", default=None,
                        help="also pair with the pf run stored in --db under this reward spec, over the same seeds")
    parser.add_argument("--budget", type=int, default=8)
    parser.add_argument("--head-sha256", default=None, help="the value head of the pf run's configuration")
    parser.add_argument("--variant", default=None, help="the pf variant (its options), when several are stored")
    parser.add_argument("--from-problem", type=int, default=0,
                        help="pair only problems numbered from this index on (e.g. past those an earlier choice looked at)")
    parser.add_argument("--seeds", type=lambda text: [int(s) for s in text.split(",")], default=None,
                        help="the pf seeds to average per problem, comma-separated (default: every stored seed)")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()

    table = json.loads(args.table.read_text())
    baseline_path = args.baseline_table or args.table
    baseline_table = json.loads(baseline_path.read_text())
    baseline_reward = args.baseline_reward or args.reward
    row = next((r for r in baseline_table["rewards"] if r["reward"] == baseline_reward), None)
    if row is None:
        raise SystemExit(
            f"no row {baseline_reward!r} in {baseline_path}; it has {[r['reward'] for r in baseline_table['rewards']]}"
        )
    if baseline_table["problems"] != table["problems"] or baseline_table["config"] != table["config"]:
        raise SystemExit(f"{baseline_path} and {args.table} measure different answer sets")
    voting = table.get("self_consistency_per_problem", {})  # tables written before it have none
    baselines = {name: dict(zip(table["problems"], values))
                 for name, values in {**row["selection_per_problem"], **voting}.items()}

    store = ResultStore(args.db, read_only=True)
    stored = "stored (the run's reward)"
    reward = table["stored_reward"] if args.reward == stored else args.reward
    found = pf_rows(store, reward, args.budget, args.head_sha256, args.variant)
    # A problem counts once every seed of the run has reached it, so that a
    # run stopped part-way through a later seed is still paired over the
    # same seeds on every problem.
    seeds = sorted({r["seed"] for rows in found.values() for r in rows})
    if args.seeds is not None:
        seeds = [s for s in seeds if s in args.seeds]
        found = {p: [r for r in rows if r["seed"] in seeds] for p, rows in found.items()}
    problems = [
        p for p in table["problems"]
        if len(found.get(p, [])) == len(seeds) and int(p.rsplit("-", 1)[1]) >= args.from_problem
    ]
    other = None
    if args.pf_baseline_reward is not None:
        other = pf_rows(store, args.pf_baseline_reward, args.budget, args.head_sha256, args.variant)
        other = {p: [r for r in rows if r["seed"] in seeds] for p, rows in other.items()}
        problems = [p for p in problems if len(other.get(p, [])) == len(seeds)]
    if not problems:
        raise SystemExit("the pf run and the table share no problem")
    means = seed_means(store, found, problems)
    pf, voted, covered, distinct = means["pf"], means["pf weighted vote"], means["covered"], means["distinct"]
    if other is not None:
        other_means = seed_means(store, other, problems)
        for name in ("pf", "pf weighted vote"):
            baselines[f"{name} under {args.pf_baseline_reward}"] = dict(zip(problems, other_means[name]))
    independent = independent_diversity(table, args.budget)

    searches = {"pf": pf, "pf weighted vote": voted}
    report = {
        "table": str(args.table),
        "reward": args.reward,
        "baseline_reward": baseline_reward,
        "baseline_table": str(baseline_path),
        "pf_baseline_reward": args.pf_baseline_reward,
        "database": str(args.db),
        "budget": args.budget,
        "pf_variant": found[problems[0]][0]["variant"],
        "seeds": seeds,
        "from_problem": args.from_problem,
        "problems": problems,
        "machine": f"{platform.machine()}, 2 cores",
        "accuracy": {},
        "paired": {},
        "final_answers": {
            "pf_holds_a_correct_answer": float(np.mean(covered)),
            f"pass@{args.budget}": float(np.mean([independent[p][0] for p in problems])),
            "pf_distinct_answers": float(np.mean(distinct)),
            f"distinct_answers_of_{args.budget}_samples": float(np.mean([independent[p][1] for p in problems])),
        },
    }
    per_problem = {**searches, **{k: [baselines[k][p] for p in problems] for k in baselines}}
    report.update(comparisons(per_problem, [(name, baseline) for name in searches for baseline in baselines]))
    # Each problem's accuracies, so that runs over disjoint problems can be
    # pooled and paired again (experiments/pool_pairs.py).
    report["per_problem"] = {name: dict(zip(problems, map(float, scores))) for name, scores in per_problem.items()}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"{len(problems)} problems; pf variant {report['pf_variant']}, seeds {seeds}")
    print_comparisons(report)
    for name, value in report["final_answers"].items():
        print(f"  {name:36s} {value:.2f}")


if __name__ == "__main__":
    main()
