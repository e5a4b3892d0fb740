"""How well each reward ranks answers to held-out test problems.

The evaluation grid (``experiments/run.sh gsm8k-0.5b-value``) samples one set
of 32 whole answers per problem for best-of-N and keeps every one of them,
with the score the run's reward gave it. This script grades those answers
against the references and measures, on exactly the same answers:

* the run's reward (the stored scores: the learned value);
* ``arith`` (the arithmetic checker), re-scored here;
* self-certainty (``certainty`` and ``certainty:group:32``, unless
  ``--no-certainty``) from the policy's log-probabilities of the answer,
  read here by the policy (the transformers engine, in bfloat16 where the
  device has it natively and float32 elsewhere, or ``--engine llamacpp``:
  one forward pass per answer of the problems that hold pairs; in a search
  the backend returns them with every step, for free);
* the answer's length in characters (shorter first), a baseline that needs no
  model at all;
* any reward spec given with ``--reward`` (``value``, ``value:HEAD``,
  ``value*arith``, ``value*arith*certainty^20``, ``judge:MODEL`` ...; a
  product is the likelihood prod_k p_k^{w_k} of its terms, as the search's
  ``WeightedSum`` takes it, each term read once), scored here on every answer of the
  problems whose answers are neither all right nor all wrong: only those
  hold pairs, and on the others every reward's top answer is right or
  wrong alike.

For each: the pairwise accuracy over (correct, incorrect) pairs of answers to
the same problem (ties one half), pooled over problems, with a 95% bootstrap
interval over problems; how often its top answer is correct; and, at each
budget of ``--select-budgets``, the accuracy of best-of-N and weighted
best-of-N under it (the mean over subsets of that many answers: all of
them, or 2,000 seeded ones where there are more than 5,000, as ``piscale
report`` computes it), per problem too, so that a search run under
the same reward on the same problems can be paired with it; and once,
self-consistency's (the majority answer), which reads no reward. Results are
written as JSON, with every answer's score under every reward. For ``arith`` and every ``--reward`` spec also the
measures of partial answers, on every prefix (first t steps) of the answers
to the problems that hold pairs: AUROC against the answer's outcome, and the
pairwise accuracy of a correct and an incorrect answer at equal depth, as
``piscale prm train`` reports them on training problems.

    .venv/bin/python experiments/reward_table.py runs/gsm8k-qwen2.5-coder-0.5b-value.sqlite \
        --out experiments/values/reward-table-test.json
    .venv/bin/python experiments/reward_table.py experiments/db/gsm8k-qwen2.5-coder-0.5b.sqlite \
        --budget 16 --no-certainty --reward value --reward value:runs/head.safetensors \
        --out experiments/values/reward-table-test-100.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import time
from pathlib import Path

import numpy as np

from piscale.eval.grade import samples_of
from piscale.eval.identity import keyed_description
from piscale.eval.store import ResultStore
from piscale.eval.subsample import expected_accuracy
from piscale.grading import answers_equal
from piscale.rewards import ArithmeticReward, Reward, answer_steps, from_spec, score_trajectories
from piscale.rewards.certainty import SelfCertaintyReward
from piscale.rewards.spec import product_terms, spec_scale, split_exponent
from piscale.search import DEFAULT_SYSTEM_PROMPT
from piscale.smc import log_reward
from piscale.tasks import load_task
from piscale.values.measures import auroc, pairwise_accuracy, step_pairwise_accuracy
from piscale.values.train import prefix_scores

from kept_scores import ScoreFile, kept_scores  # experiments/, the directory of this script


def stored_answer_sets(store: ResultStore, budget: int, config: str | None) -> tuple[str, list[dict]]:
    """Best-of-N's candidates at ``budget`` of one configuration, per problem;
    a problem searched with several seeds gets their candidates in seed
    order, as one larger set of independent answers."""
    searches = [s for s in store.searches() if s["algorithm"] == "bon" and s["budget"] == budget]
    configs = sorted({s["config_key"] for s in searches})
    if config is None:
        if len(configs) != 1:
            raise SystemExit(f"{len(configs)} configurations hold bon@{budget} answers ({configs}); pass --config")
        config = configs[0]
    found: dict[str, dict] = {}
    for entry in sorted(searches, key=lambda s: s["seed"]):
        if entry["config_key"] != config:
            continue
        result = store.search(entry["search_id"])
        if entry["problem_id"] in found:
            found[entry["problem_id"]]["candidates"] += result["candidates"]
        else:
            found[entry["problem_id"]] = {"problem_id": entry["problem_id"], **result}
    return config, list(found.values())


def answer_sets(databases: list[Path], budget: int, config: str | None) -> tuple[str, str, list[dict], list[str]]:
    """The answer sets of one configuration held in ``databases`` (e.g. one
    per seed), a problem's candidates concatenated in the order given; only
    the problems every database holds. ``config`` picks the first database's
    configuration; in the others it is the one with the same keyed
    description (a database started by an older piscale may hold it under
    another key). Returns the first database's configuration key, its reward
    spec, the sets, and the problems left out for want of a database."""
    per_database, first_key, keyed, spec = [], None, None, ""
    for path in databases:
        store = ResultStore(path, read_only=True)
        if first_key is None:
            first_key, sets = stored_answer_sets(store, budget, config)
            chosen = next(c for c in store.configs() if c["config_key"] == first_key)
            keyed, spec = keyed_description(chosen["description"]), chosen["reward"]
        else:
            same = [c["config_key"] for c in store.configs() if keyed_description(c["description"]) == keyed]
            if not same:
                raise SystemExit(f"{path} holds no configuration like {first_key} of {databases[0]}")
            _, sets = stored_answer_sets(store, budget, same[0])
        per_database.append({s["problem_id"]: s for s in sets})
    assert first_key is not None
    shared = set.intersection(*(set(d) for d in per_database))
    if not shared:
        raise SystemExit(f"no problem has bon@{budget} answers in every one of {[str(p) for p in databases]}")
    left_out = sorted(set.union(*(set(d) for d in per_database)) - shared)
    merged = []
    for problem in sorted(shared):
        first, *others = (d[problem] for d in per_database)
        merged.append({**first, "candidates": [c for d in (first, *others) for c in d["candidates"]]})
    return first_key, spec, merged, left_out


def bootstrap_pairwise(wins_pairs: list[tuple[float, int]], draws: int = 2000, seed: int = 0) -> list[float]:
    """95% interval of pooled pairwise accuracy, resampling problems."""
    rng = np.random.default_rng(seed)
    per_problem = np.array([w for w, n in wins_pairs if n]), np.array([n for _, n in wins_pairs if n])
    if len(per_problem[1]) == 0:
        return [float("nan"), float("nan")]
    samples = []
    for _ in range(draws):
        pick = rng.integers(0, len(per_problem[1]), len(per_problem[1]))
        samples.append(per_problem[0][pick].sum() / per_problem[1][pick].sum())
    return [float(np.percentile(samples, 2.5)), float(np.percentile(samples, 97.5))]


def selection_accuracy(
    sets: list[dict], scores: list[list[float]], budgets: list[int], scale: str, selections=("bon", "wbon")
) -> dict:
    """Per problem, best-of-N's and weighted best-of-N's accuracy at each
    budget when the answers carry ``scores``. Problems whose answers are all
    right or all wrong select alike under any scores."""
    found: dict[str, list[float]] = {}
    for budget in budgets:
        for selection in selections:
            found[f"{selection}@{budget}"] = [
                expected_accuracy(
                    selection,
                    samples_of([{**c, "score": v} for c, v in zip(s["candidates"], values)], s["reference"], scale),
                    budget,
                    seed=0,
                ).accuracy
                for s, values in zip(sets, scores)
            ]
    return found


def measure(
    name: str, sets: list[dict], scores: list[list[float]], budgets: list[int] = (), scale: str = "probability"
) -> dict:
    flat_scores, flat_correct, flat_problems, per_problem, top = [], [], [], [], 0
    for answer_set, values in zip(sets, scores):
        correct = answer_set["correct"]
        flat_scores += values
        flat_correct += correct
        flat_problems += [answer_set["problem_id"]] * len(values)
        one = pairwise_accuracy(values, correct, [answer_set["problem_id"]] * len(values))
        per_problem.append(((one.accuracy or 0.0) * one.pairs, one.pairs))
        top += bool(correct[int(np.argmax(values))])
    pooled = pairwise_accuracy(flat_scores, flat_correct, flat_problems)
    per_problem_selection = selection_accuracy(sets, scores, list(budgets), scale)
    return {
        "reward": name,
        "pairwise_accuracy": pooled.accuracy,
        "interval_95": bootstrap_pairwise(per_problem),
        "pairs": pooled.pairs,
        "problems_with_pairs": pooled.problems,
        "top_answer_correct": top / len(sets),
        "selection": {key: float(np.mean(values)) for key, values in per_problem_selection.items()},
        "selection_per_problem": per_problem_selection,
        # Every answer's score, problem by problem in the order of "problems",
        # so that products and mixtures of rewards can be measured without
        # reading any answer again (zeros where a set holds no pair).
        "scores": [[float(f"{v:.6g}") for v in values] for values in scores],
    }


def reading_policy(policy: str, engine: str):
    """The policy, loaded to read its own log-probabilities of stored answers."""
    from piscale.lm import load
    from piscale.models import serving_dtype

    if engine != "hf":
        return load(policy, engine=engine)
    # As the value is served: bfloat16 only where the device does not emulate it.
    return load(policy, engine="hf", dtype=serving_dtype("cpu"))


async def spec_scores(
    reward: Reward, sets: list[dict], kept: ScoreFile | None = None
) -> tuple[list[list[float]], list[list[np.ndarray]]]:
    """``reward``'s score of every answer of the sets that hold pairs (zeros
    elsewhere, where no pair and no choice of top answer depends on them),
    and of every prefix of those answers (none elsewhere). One problem per
    call, so that a problem's answers share the backbone's prompt cache; the
    prefixes are scored after their answers, so a learned value reads them
    from its cache of the answers instead of reading them again. With
    ``kept``, answers found there are not read again, and a problem's new
    scores are written there as soon as they are read."""
    kept = kept or ScoreFile(None)
    finals, prefixes = [], []
    for answer_set in sets:
        if not holds_pairs(answer_set):
            finals.append([0.0] * len(answer_set["candidates"]))
            prefixes.append([])
            continue
        question = answer_set["question"]
        texts = [c["text"] for c in answer_set["candidates"]]
        missing = [text for text in dict.fromkeys(texts) if kept.get(question, text) is None]
        if missing:
            trajectories = [answer_steps(text) for text in missing]
            questions = [question] * len(missing)
            if reward.needs_logprobs:
                # Self-certainty's step t judges steps 0..t already, and its
                # last step is the whole answer's statistic: one read per
                # answer, where a prefix at a time would read each t times.
                written = [written_steps(text) for text in missing]
                new_prefixes = [np.asarray(p) for p in await reward.score(questions, written)]
                new_finals = [float(p[-1]) for p in new_prefixes]
            else:
                new_finals = await score_trajectories(reward, questions, trajectories, "model")
                new_prefixes = await prefix_scores(reward, questions, trajectories)
            kept.put(answer_set["problem_id"], question, missing, new_finals, new_prefixes)
        found = [kept.get(question, text) for text in texts]
        finals.append([f for f, _ in found])
        prefixes.append([np.asarray(p) for _, p in found])
    return finals, prefixes


def holds_pairs(answer_set: dict) -> bool:
    """Whether the set has both a correct and an incorrect answer: only then
    does any pair, or any choice of top answer, depend on the scores."""
    return len(set(answer_set["correct"])) > 1


def written_steps(text: str) -> list[str]:
    """``answer_steps`` with the blank lines after each step kept on it, so
    that they join into the text as the policy wrote it: what a reward that
    reads the policy's log-probabilities must be given."""
    starts, position = [], 0
    for step in answer_steps(text):
        position = text.index(step, position)
        starts.append(position)
        position += len(step)
    bounds = [0, *starts[1:], len(text)]
    return [text[a:b] for a, b in zip(bounds[:-1], bounds[1:])]


def step_measures(sets: list[dict], prefixes: list[list[np.ndarray]]) -> dict:
    """On every prefix of the answers that have prefix scores: AUROC against
    the answer's outcome (every prefix labelled as its answer ended), and the
    pairwise accuracy of a correct and an incorrect answer to the same
    problem compared at equal depth (``step_pairwise_accuracy``)."""
    scores, labels, per_answer, correct, problems = [], [], [], [], []
    for answer_set, answers in zip(sets, prefixes):
        for values, right in zip(answers, answer_set["correct"]):
            scores += list(values)
            labels += [float(right)] * len(values)
            per_answer.append(values)
            correct.append(right)
            problems.append(answer_set["problem_id"])
    if not scores:
        return {}
    steps = step_pairwise_accuracy(per_answer, correct, problems)
    return {
        "step_auroc": auroc(np.asarray(scores), np.asarray(labels)),
        "step_pairwise_accuracy": steps.accuracy,
        "step_pairs": steps.pairs,
        "prefixes": len(scores),
    }


def plain_product(weighted: list[tuple[str, float]], scales: dict[str, str]) -> bool:
    """Whether every term is a probability with exponent 1, so that their
    product is again a probability."""
    return all(scales[t] == "probability" and w == 1.0 for t, w in weighted)


def combined(values: list, weighted: list[tuple[str, float]], scales: dict[str, str]) -> np.ndarray:
    """A product's score from its terms' scores (``values[k]`` of term k):
    the plain product where ``plain_product`` holds, else the
    log-likelihood sum_k w_k log p_k, with log-scale terms counted as log p_k
    already, as ``WeightedSum`` sums them."""
    if plain_product(weighted, scales):
        return np.prod(np.asarray(values, dtype=float), axis=0)
    return sum(w * log_reward(np.asarray(v, dtype=float), scales[t]) for v, (t, w) in zip(values, weighted))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("db", type=Path, nargs="+", help="database(s) of one configuration's bon answers (e.g. one per seed)")
    parser.add_argument("--budget", type=int, default=32, help="the bon budget whose stored answers are read")
    parser.add_argument("--config", default=None, help="configuration key (default: the only one with bon answers)")
    parser.add_argument("--dataset", default="gsm8k")
    parser.add_argument("--policy", default="qwen2.5-coder-0.5b-instruct")
    parser.add_argument(
        "--answers",
        type=int,
        default=None,
        help="measure every reward on the first K answers of each set only (certainty costs a forward pass each)",
    )
    parser.add_argument(
        "--engine", default="hf",
        help="engine that reads the log-probabilities (llamacpp: the GGUF that sampled the answers, as a search reads them)",
    )
    parser.add_argument("--no-certainty", action="store_true", help="skip the policy's forward passes")
    parser.add_argument(
        "--reward",
        action="append",
        default=[],
        metavar="SPEC",
        help="a reward spec to measure besides the stored scores (repeatable)",
    )
    parser.add_argument(
        "--select-budgets",
        default="8",
        help="comma-separated budgets at which to measure bon and wbon under each reward",
    )
    parser.add_argument(
        "--keep-scores", type=Path, default=None, metavar="FOLDER",
        help="keep each --reward term's scores there, per problem, as they are read; a rerun reads none twice "
        "(files are named by term, so another --engine or --policy needs another folder)",
    )
    parser.add_argument(
        "--only-kept", action="store_true",
        help="measure only the problems, in table order, up to the first whose answers some --reward term has not "
        "kept scores for (a partial table of a run still going)",
    )
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    if not args.no_certainty:
        args.reward += [spec for spec in ("certainty", "certainty:group:32") if spec not in args.reward]

    config, stored_spec, sets, left_out = answer_sets(args.db, args.budget, args.config)
    if left_out:
        print(f"{len(left_out)} problems are not in every database and are left out: {', '.join(left_out)}", flush=True)
    references = {p.id: p.reference for p in load_task(args.dataset).problems}
    for answer_set in sets:
        answer_set["reference"] = references[answer_set["problem_id"]]
        answer_set["correct"] = [answers_equal(c["answer"], answer_set["reference"]) for c in answer_set["candidates"]]
    sets.sort(key=lambda s: s["problem_id"])
    for answer_set in sets:
        answer_set["candidates"] = answer_set["candidates"][: args.answers]
        answer_set["correct"] = answer_set["correct"][: args.answers]
    if args.only_kept:
        if args.keep_scores is None:
            raise SystemExit("--only-kept reads the scores kept with --keep-scores; pass that folder")
        # A term with nothing kept yet (a cheap one, scored after the costly
        # term it multiplies) is read in full below.
        files = [kept_scores(args.keep_scores, split_exponent(term)[0])
                 for spec in args.reward for term in product_terms(spec)]
        files = [f for f in files if f.found]
        # Sets are scored in table order, so the scored ones are those before
        # the first unscored set that holds pairs: keep exactly those (with
        # the sets between them that need no score), a clean prefix.
        unread = [k for k, s in enumerate(sets) if holds_pairs(s) and any(
            f.get(s["question"], c["text"]) is None for f in files for c in s["candidates"])]
        if unread:
            dropped = [s["problem_id"] for s in sets[unread[0]:]]
            print(f"--only-kept: the {len(dropped)} problems from {dropped[0]} on (table order) are left out", flush=True)
            sets = sets[: unread[0]]
            left_out = sorted(left_out + dropped)
            if not sets:
                raise SystemExit("--only-kept: the first problem that needs scores has none kept yet")
    answers = min(len(s["candidates"]) for s in sets)
    print(f"{len(sets)} problems x {answers} answers; {sum(sum(s['correct']) for s in sets)} correct", flush=True)

    budgets = [int(b) for b in args.select_budgets.split(",") if b]
    # Log-scale rewards (products, certainty, cdr, embed) vote with exp(score - max).
    stored_scale = spec_scale(stored_spec)
    table = [
        measure(
            "stored (the run's reward)",
            sets,
            [[c["score"] for c in s["candidates"]] for s in sets],
            budgets,
            stored_scale,
        )
    ]
    arith = ArithmeticReward()
    prompts, trajectories, owners = [], [], []
    for k, answer_set in enumerate(sets):
        for candidate in answer_set["candidates"]:
            prompts.append(answer_set["question"])
            trajectories.append(answer_steps(candidate["text"]))
            owners.append(k)
    flat = asyncio.run(score_trajectories(arith, prompts, trajectories, "model"))
    table.append(
        measure("arith", sets, [[v for v, o in zip(flat, owners) if o == k] for k in range(len(sets))], budgets)
    )
    # Prefix scores on the problems that hold pairs, the ones every spec
    # below is scored on, so that the step measures compare on one set.
    term_prefixes: dict[str, list[list[np.ndarray]]] = {"arith": asyncio.run(spec_scores(arith, sets))[1]}
    table[-1].update(step_measures(sets, term_prefixes["arith"]))
    table.append(measure("shorter answer", sets, [[-len(c["text"]) for c in s["candidates"]] for s in sets]))
    # A product A*B^w is scored from its terms' scores, each term read once
    # however many specs share it (the value's backbone is the cost).
    term_scores: dict[str, list[list[float]]] = {}
    term_scales: dict[str, str] = {}
    spec_seconds = {}
    policy = None  # loaded for the first term that reads the policy's log-probabilities
    try:
        for spec in args.reward:
            started = time.perf_counter()
            weighted = [split_exponent(term) for term in product_terms(spec)]
            for term, _ in weighted:
                if term in term_scores:
                    continue
                reward = from_spec(term)
                if isinstance(reward, SelfCertaintyReward):
                    policy = policy or reading_policy(args.policy, args.engine)
                    reward = SelfCertaintyReward(reward.statistic, reward.window, policy=policy,
                                                 system=DEFAULT_SYSTEM_PROMPT)
                term_scales[term] = reward.scale
                kept = kept_scores(args.keep_scores, term) if args.keep_scores is not None else None
                term_scores[term], term_prefixes[term] = asyncio.run(spec_scores(reward, sets, kept))
            scores = [combined([term_scores[t][k] for t, _ in weighted], weighted, term_scales) for k in range(len(sets))]
            prefixes = [
                [combined(list(values), weighted, term_scales) for values in zip(*(term_prefixes[t][k] for t, _ in weighted))]
                for k in range(len(sets))
            ]
            table.append(measure(spec, sets, [list(map(float, v)) for v in scores], budgets,
                                 "probability" if plain_product(weighted, term_scales) else "log"))
            table[-1].update(step_measures(sets, prefixes))
            spec_seconds[spec] = round(time.perf_counter() - started, 1)
            print(f"{spec}: {spec_seconds[spec]} s", flush=True)
    finally:
        if policy is not None:
            asyncio.run(policy.close())
    # Self-consistency (the majority answer) reads no reward at all.
    voting = selection_accuracy(sets, [[0.0] * len(s["candidates"]) for s in sets], budgets, "probability", ("sc",))
    report = {
        "databases": [str(path) for path in args.db],
        "config": config,
        "left_out": left_out,
        "stored_reward": stored_spec,
        "problems": [s["problem_id"] for s in sets],
        "answers_per_problem": answers,
        "answer_budget": args.budget,
        "sample_accuracy": float(np.mean([np.mean(s["correct"]) for s in sets])),
        "reward_seconds": spec_seconds,
        "machine": f"{platform.machine()}, 2 cores shared with other jobs",
        "self_consistency": {key: float(np.mean(values)) for key, values in voting.items()},
        "self_consistency_per_problem": voting,
        "rewards": table,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    for row in table:
        low, high = row["interval_95"]
        selections = "".join(f"; {key} {value:.3f}" for key, value in row["selection"].items())
        print(
            f"{row['reward']:28s} pairwise {row['pairwise_accuracy']:.3f} [{low:.3f}, {high:.3f}] "
            f"on {row['pairs']} pairs / {row['problems_with_pairs']} problems; top answer correct "
            f"{row['top_answer_correct']:.2f}{selections}"
            + (f"; step AUROC {row['step_auroc']:.3f}, step pairwise {row['step_pairwise_accuracy']:.3f}"
               if "step_auroc" in row else "")
        )
    print("self-consistency: " + "; ".join(f"{key} {value:.3f}" for key, value in report["self_consistency"].items()))


if __name__ == "__main__":
    main()
