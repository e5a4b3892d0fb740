"""Do self-certainty and the learned value rank answers better together?

On the *training* rollouts only (the first ``--problems`` problems of the
value head's database; no test problem is read), this script puts three
scores side by side at every step of every rollout:

* the learned value V, out of fold: each of 4 folds of problems scored by a
  head fitted on the other three, as ``piscale prm train --folds`` does, on
  the shipped head's features (layer 18 of its backbone, read here in
  ``--dtype`` and cached under $PISCALE_HOME/value-features as ``prm
  train`` caches them);
* the arithmetic checker;
* self-certainty c, the policy's mean token log-probability of the partial
  answer, read once per rollout by the policy (transformers, bfloat16) and
  kept in ``--certainty`` (JSON lines, one problem per line; a killed run
  resumes there).

on the problems whose rollouts hold both outcomes (only they hold pairs,
and the within-problem head learns from nothing else), and measures, as
``prm train`` does (pairwise accuracy of finished answers,
pairwise accuracy at equal depth, step AUROC), the log-likelihoods

    log V + log arith + w * c      for w in --weights

(w = 0 is ``value*arith``) and c alone. A weight w makes the policy's
per-token confidence count w-fold against the value's log-odds: certainty
spreads by about 0.1 nat between answers, the value by about 1, so w = 1
barely moves the product. The weight is chosen here, on training problems,
before anything under it is run on test problems.

    .venv/bin/python experiments/value_certainty.py \\
        --db experiments/db/values-gsm8k_train-qwen2.5-coder-0.5b.sqlite --problems 300 \\
        --certainty experiments/values/train-certainty-300.jsonl --out experiments/values/value-certainty-300.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import time
from pathlib import Path

import numpy as np

from piscale.eval.store import ResultStore
from piscale.models import piscale_home
from piscale.rewards import ArithmeticReward
from piscale.rewards.certainty import SelfCertaintyReward
from piscale.rewards.value import HeadFile, load_value_reward, shipped_head_path
from piscale.values.train import (
    FeatureCache, cross_validated_scores, evaluate_scores, extract_features, labelled_rollouts, reward_step_scores,
    scores_in_table, step_table,
)

DEFAULT_WEIGHTS = "0,1,2,5,10,20,50"


async def read_certainty(rollouts, policy: str, dtype: str, path: Path) -> dict[int, np.ndarray]:
    """Self-certainty of every prefix of every rollout (rollout index ->
    [steps]), read by the policy one problem at a time and appended to
    ``path``; problems already there are not read again."""
    done: dict[str, dict[str, list[float]]] = {}
    if path.is_file():
        for line in path.read_text().splitlines():
            if line.strip():
                record = json.loads(line)
                done[record["problem_id"]] = record["certainty"]
    by_problem: dict[str, list[int]] = {}
    for i, r in enumerate(rollouts):
        by_problem.setdefault(r.problem_id, []).append(i)
    missing = [p for p in by_problem if p not in done]
    if missing:
        from piscale.lm import load

        systems = {r.system for r in rollouts}
        if len(systems) != 1:
            raise SystemExit(f"the rollouts were written under {len(systems)} system prompts; read them apart")
        lm = load(policy, engine="hf", dtype=dtype)
        certainty = SelfCertaintyReward(policy=lm, system=systems.pop() or None)
        started = time.perf_counter()
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            with path.open("a") as out:
                for n, problem in enumerate(missing, 1):
                    chosen = [rollouts[i] for i in by_problem[problem]]
                    # Read step by step, as the policy wrote them.
                    scores = await certainty.score([r.question for r in chosen], [list(r.steps) for r in chosen])
                    record = {r.key: s for r, s in zip(chosen, scores)}
                    done[problem] = record
                    out.write(json.dumps({"problem_id": problem, "certainty": record}) + "\n")
                    out.flush()
                    if n % 10 == 0:
                        print(f"certainty: {n}/{len(missing)} problems, {time.perf_counter() - started:.0f} s", flush=True)
        finally:
            await lm.close()
    return {i: np.asarray(done[r.problem_id][r.key]) for i, r in enumerate(rollouts)}


def shipped_head_features(rollouts, dtype: str) -> list[np.ndarray]:
    """[1, steps, hidden] per rollout: the shipped head's layer of its backbone."""
    metadata = HeadFile.read(shipped_head_path()).metadata
    reward = load_value_reward(None, dtype=dtype)
    layers = [int(metadata["layer"])]
    cache = FeatureCache(piscale_home() / "value-features", metadata["backbone"], layers,
                         {**metadata["layout"], "dtype": dtype})
    return extract_features(reward, rollouts, layers, cache,
                            progress=lambda done, todo: print(f"features: {done}/{todo} rollouts", flush=True))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--db", type=Path, required=True)
    parser.add_argument("--problems", type=int, default=None)
    parser.add_argument("--dtype", default="float32", help="the backbones' dtype (float32 | bfloat16)")
    parser.add_argument("--certainty", type=Path, required=True, help="JSON lines of certainty per problem (resumes)")
    parser.add_argument("--policy", default="qwen2.5-coder-0.5b-instruct")
    parser.add_argument("--folds", type=int, default=4)
    parser.add_argument("--weights", default=DEFAULT_WEIGHTS, help="comma-separated weights w of certainty")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()

    every = labelled_rollouts(ResultStore(args.db, read_only=True), args.problems)
    outcomes: dict[str, set[bool]] = {}
    for r in every:
        outcomes.setdefault(r.problem_id, set()).add(r.correct)
    rollouts = [r for r in every if len(outcomes[r.problem_id]) == 2]
    print(f"{len(rollouts)} rollouts of the {sum(len(o) == 2 for o in outcomes.values())} problems "
          f"(of {len(outcomes)}) with both outcomes", flush=True)
    started = time.perf_counter()
    features = shipped_head_features(rollouts, args.dtype)
    feature_seconds = time.perf_counter() - started
    table = step_table(rollouts, features, 0)
    everything = np.arange(len(rollouts))

    started = time.perf_counter()
    certainty = scores_in_table(asyncio.run(read_certainty(rollouts, args.policy, args.dtype, args.certainty)), table)
    certainty_seconds = time.perf_counter() - started
    value, _ = cross_validated_scores(rollouts, features, [0], args.folds, seed=0, kind="logistic", objective="within")
    arith = scores_in_table(reward_step_scores(ArithmeticReward(), rollouts, list(everything)), table)
    with np.errstate(divide="ignore"):
        log_value_arith = np.log(value) + np.log(arith)  # a step the checker rejects keeps its zero

    measures = {
        "certainty": evaluate_scores(certainty, table, rollouts, everything),
        "value (out of fold)": evaluate_scores(value, table, rollouts, everything),
        "arith": evaluate_scores(arith, table, rollouts, everything),
    }
    for weight in (float(w) for w in args.weights.split(",")):
        name = "value*arith" if weight == 0 else f"value*arith*certainty^{weight:g}"
        measures[name] = evaluate_scores(log_value_arith + weight * certainty, table, rollouts, everything)
    for name, measured in measures.items():
        print(f"{name:32s} pairwise {measured.pairwise.accuracy:.3f}  step pairwise "
              f"{measured.step_pairwise.accuracy:.3f}  step AUROC {measured.step_auroc:.3f}", flush=True)
    finals = {"certainty": certainty[table.last], "log-odds of value": np.log(value / (1 - value))[table.last]}
    owners = np.array([rollouts[i].problem_id for i in table.rollout[table.last]])
    # How far apart a problem's answers lie on each scale: what sets the
    # weight that lets certainty move the product at all.
    spread = {name: float(np.mean([np.std(x[owners == p]) for p in np.unique(owners)])) for name, x in finals.items()}
    print(f"within-problem spread of final scores: {spread}", flush=True)
    report = {
        "db": str(args.db), "problems": args.problems, "rollouts": len(rollouts), "folds": args.folds,
        "policy": args.policy, "dtype": args.dtype, "feature_seconds": round(feature_seconds, 1),
        "certainty_seconds": round(certainty_seconds, 1),
        "within_problem_std": spread,
        "machine": f"{platform.machine()}, 2 cores shared with other jobs",
        "measures": {name: m.to_dict() for name, m in measures.items()},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
