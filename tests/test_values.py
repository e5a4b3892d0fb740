"""Collecting labelled rollouts and training a value head: collection on the
exact toy model resumes after an interruption without duplicating rows;
Monte-Carlo labels count correct completions; the fit recovers a planted
signal and not a shuffled one; the measures equal hand computations; the
commands run end to end on a tiny backbone."""

from __future__ import annotations

import asyncio
import itertools
import json

import numpy as np
import pytest
from typer.testing import CliRunner

from piscale.eval.store import ResultStore
from piscale.tasks import Problem, Task
from piscale.lm.toy import ToyLM
from piscale.values.collect import ALGORITHM, CollectConfig, CollectError, Collection, stored_rollouts
from piscale.values.train import (
    FeatureCache,
    LabelledRollout,
    TrainError,
    extract_features,
    fit_and_choose,
    fit_logistic,
    fit_mlp,
    labelled_rollouts,
    prefix_scores,
    reward_step_scores,
    validation_problems,
)
from piscale.values.measures import auroc, pairwise_accuracy, step_pairwise_accuracy

PROBLEMS = tuple(Problem(f"toy-{i}", f"Count from problem {i}.", str(2 + i % 3)) for i in range(6))
TASK = Task("toy_train", "test", "fingerprint-of-the-toy-problems", PROBLEMS)


class Interrupted(BaseException):
    """Stands for a kill: not an Exception, so nothing on the way catches it."""


def collect(path, config, lm=None, stop_after=None, parallel=2):
    store = ResultStore(path)
    collection = Collection(store, TASK, PROBLEMS, config)
    run_id = collection.start_run(["test"])
    stored = []

    def on_problem(problem, result):
        stored.append(problem.id)
        if stop_after is not None and len(stored) >= stop_after:
            raise Interrupted

    try:
        asyncio.run(collection.run(lm or ToyLM(), run_id, parallel=parallel, on_problem=on_problem))
    finally:
        store.close()
    return stored


def comparable(results):
    return {r["problem_id"]: [(x["steps"], x["correct"], x.get("mc_correct")) for x in r["rollouts"]] for r in results}


def test_collection_resumes_after_an_interruption_without_duplicates(tmp_path):
    config = CollectConfig(policy="toy", rollouts=3, seed=7, max_tokens=64)
    with pytest.raises(Interrupted):
        collect(tmp_path / "a.sqlite", config, stop_after=2, parallel=1)
    store = ResultStore(tmp_path / "a.sqlite")
    assert store.count("searches") == 2
    store.close()
    resumed = collect(tmp_path / "a.sqlite", config)
    assert len(resumed) == len(PROBLEMS) - 2  # only the missing problems were sampled
    assert collect(tmp_path / "a.sqlite", config) == []  # nothing left to do
    collect(tmp_path / "b.sqlite", config, parallel=3)  # one uninterrupted run
    a, b = ResultStore(tmp_path / "a.sqlite"), ResultStore(tmp_path / "b.sqlite")
    assert a.count("searches") == a.count("results") == len(PROBLEMS)
    rows = a.results()
    assert len({r["problem_id"] for r in rows}) == len(PROBLEMS)
    assert comparable(stored_rollouts(a)) == comparable(stored_rollouts(b))  # seeds per problem, not per batch
    for result, row in zip(sorted(stored_rollouts(a), key=lambda r: r["problem_id"]), sorted(rows, key=lambda r: r["problem_id"])):
        assert len(result["rollouts"]) == 3
        assert row["algorithm"] == ALGORITHM
        assert row["expected_accuracy"] == pytest.approx(np.mean([x["correct"] for x in result["rollouts"]]))
        for rollout in result["rollouts"]:
            assert "".join(rollout["steps"]).endswith("}")
    description = a.configs()[0]["description"]
    assert description["dataset"]["fingerprint"] == TASK.fingerprint
    assert description["collect"]["rollouts"] == 3 and description["model"]["spec"] == "toy"
    assert a.runs()[0]["info"]["packages"]["numpy"]


def test_a_different_seed_is_a_different_cell(tmp_path):
    collect(tmp_path / "c.sqlite", CollectConfig(policy="toy", rollouts=2, seed=0, max_tokens=64))
    collect(tmp_path / "c.sqlite", CollectConfig(policy="toy", rollouts=2, seed=1, max_tokens=64))
    store = ResultStore(tmp_path / "c.sqlite")
    assert store.count("searches") == 2 * len(PROBLEMS)


def test_monte_carlo_labels_count_correct_completions_from_forks(tmp_path):
    config = CollectConfig(policy="toy", rollouts=2, seed=3, max_tokens=64, mc_completions=4, mc_problems=2)
    lm = ToyLM()
    collect(tmp_path / "mc.sqlite", config, lm=lm)
    results = {r["problem_id"]: r for r in stored_rollouts(ResultStore(tmp_path / "mc.sqlite"))}
    for i, problem in enumerate(PROBLEMS):
        result = results[problem.id]
        assert result["variant"] == ("mc=4" if i < 2 else "")
        for rollout in result["rollouts"]:
            if i >= 2:
                assert "mc_correct" not in rollout
                continue
            counts = rollout["mc_correct"]
            assert len(counts) == len(rollout["steps"])
            assert all(0 <= c <= 4 for c in counts)
            assert counts[-1] == 4 * rollout["correct"]
    rows = labelled_rollouts(ResultStore(tmp_path / "mc.sqlite"))
    with_mc = [r for r in rows if r.mc_values is not None]
    assert len(with_mc) == 4 and all(0 <= v <= 1 for r in with_mc for v in r.mc_values)


def test_bad_collection_settings_say_what_is_wrong(tmp_path):
    with pytest.raises(CollectError, match="rollouts must be a positive integer"):
        CollectConfig(policy="toy", rollouts=0)
    with pytest.raises(CollectError, match="needs mc_completions"):
        CollectConfig(policy="toy", mc_problems=3)
    with pytest.raises(ValueError, match="temperature"):
        CollectConfig(policy="toy", temperature=-1.0)
    with pytest.raises(CollectError, match="no problems"):
        Collection(ResultStore(tmp_path / "x.sqlite"), TASK, (), CollectConfig(policy="toy"))
    with pytest.raises(CollectError, match="holds no rollouts"):
        stored_rollouts(ResultStore(tmp_path / "x.sqlite"))


# -- fitting and measures ------------------------------------------------------------
def test_logistic_fit_recovers_a_planted_signal_and_not_a_shuffled_one():
    rng = np.random.default_rng(0)
    features = rng.normal(size=(3000, 20)) * rng.uniform(0.1, 10, size=20) + rng.normal(size=20)
    signal = features[:, 3] / features[:, 3].std() - features[:, 7] / features[:, 7].std()
    labels = (signal + 0.3 * rng.normal(size=3000) > 0).astype(float)
    train, test = slice(0, 2000), slice(2000, None)
    head = fit_logistic(features[train], labels[train], l2=1e-3)
    assert auroc(head.probabilities(features[test]), labels[test]) > 0.95
    shuffled = rng.permutation(labels)
    head = fit_logistic(features[train], shuffled[train], l2=1e-3)
    assert abs(auroc(head.probabilities(features[test]), shuffled[test]) - 0.5) < 0.06
    mlp = fit_mlp(features[train], labels[train], epochs=200)
    assert auroc(mlp.probabilities(features[test]), labels[test]) > 0.9


def test_auroc_equals_counting_pairs_with_ties_as_halves():
    rng = np.random.default_rng(1)
    scores = rng.integers(0, 5, size=40).astype(float)  # many ties
    labels = rng.integers(0, 2, size=40)
    pairs = [
        1.0 if p > n else 0.5 if p == n else 0.0
        for p, n in itertools.product(scores[labels == 1], scores[labels == 0])
    ]
    assert auroc(scores, labels) == pytest.approx(np.mean(pairs))
    with pytest.raises(ValueError, match="both positive and negative"):
        auroc(scores, np.ones(40))


def test_pairwise_accuracy_by_hand():
    scores = [0.9, 0.2, 0.5, 0.7, 0.7, 0.1, 0.3]
    correct = [True, False, False, True, False, True, True]
    problems = ["a", "a", "a", "b", "b", "c", "c"]  # c has no incorrect answer: no pairs
    result = pairwise_accuracy(scores, correct, problems)
    assert (result.pairs, result.problems) == (3, 2)
    assert result.accuracy == pytest.approx((1 + 1 + 0.5) / 3)


def test_step_pairwise_accuracy_compares_unfinished_prefixes_at_equal_depth_by_hand():
    steps = [[0.2, 0.9, 0.4], [0.3, 0.1], [0.5, 0.5, 0.5, 0.5], [0.1, 0.7]]
    correct = [True, False, False, True]
    problems = ["a", "a", "a", "b"]  # b has no incorrect rollout: no pairs
    result = step_pairwise_accuracy(steps, correct, problems)
    # (r0, r1): depth 0 only (r1's last step is its answer): 0.2 < 0.3 -> 0
    # (r0, r2): depths 0 and 1: 0.2 < 0.5 -> 0; 0.9 > 0.5 -> 1
    assert (result.pairs, result.problems) == (3, 1)
    assert result.accuracy == pytest.approx(1 / 3)


def test_within_problem_fit_ignores_a_feature_that_only_tells_problems_apart():
    """Labels follow logit = a_g + 2 z_0 - z_1 with a problem intercept a_g;
    z_2 = a_g / 2 plus a little noise encodes the problem's difficulty. The
    pooled fit leans on z_2 (it predicts the label across problems); the
    within-problem fit gives it no weight and recovers the within-problem
    coefficients."""
    rng = np.random.default_rng(3)
    groups = np.repeat(np.arange(300), 40)
    intercepts = rng.normal(0, 2, size=300)
    z = rng.normal(size=(len(groups), 3))
    z[:, 2] = intercepts[groups] / 2 + 0.05 * rng.normal(size=len(groups))
    labels = (rng.uniform(size=len(groups)) < 1 / (1 + np.exp(-(intercepts[groups] + 2 * z[:, 0] - z[:, 1])))).astype(float)
    raw = lambda head: head.weights[0] / head.scale  # noqa: E731  (weights per unit of the raw feature)
    within = raw(fit_logistic(z, labels, l2=1e-3, groups=groups))
    pooled = raw(fit_logistic(z, labels, l2=1e-3))
    assert pooled[2] > 1.0
    assert abs(within[2]) < 0.5
    assert within[0] == pytest.approx(2.0, rel=0.2) and within[1] == pytest.approx(-1.0, rel=0.2)
    with pytest.raises(TrainError, match="labels differ"):
        fit_logistic(z[:80], np.repeat([0.0, 1.0], 40), groups=groups[:80])


def test_unknown_objective_and_within_mlp_are_refused():
    with pytest.raises(TrainError, match="unknown objective"):
        fit_and_choose([], [], [0], set(), objective="global")
    with pytest.raises(TrainError, match="logistic head"):
        fit_and_choose([], [], [0], set(), kind="mlp", objective="within")


def test_split_is_by_problem_and_deterministic():
    ids = [f"p{i}" for i in range(40) for _ in range(4)]
    held_out = validation_problems(ids, 0.25, seed=0)
    assert len(held_out) == 10 and held_out == validation_problems(ids, 0.25, seed=0)
    assert held_out != validation_problems(ids, 0.25, seed=1)
    with pytest.raises(TrainError, match="too few"):
        validation_problems(["only"], 0.5, seed=0)
    with pytest.raises(TrainError, match="labels must lie"):
        fit_logistic(np.zeros((3, 2)), np.array([0, 1, 2]))


# -- features and the commands, on a tiny backbone ---------------------------------------
TINY = "tiny-backbone"


@pytest.fixture
def tiny_folder(monkeypatch):
    """A backbone spec that ``piscale.models.load_transformers`` resolves to
    a tiny random-weight model (the character tokenizer does not survive a
    save and reload, so the model is handed over in memory)."""
    from piscale import models
    from tiny_models import tiny_causal_lm

    model, tokenizer = tiny_causal_lm("qwen2", seed=5)
    real = models.load_transformers

    def load(spec, **options):
        return (model, tokenizer) if str(spec) == TINY else real(spec, **options)

    monkeypatch.setattr(models, "load_transformers", load)
    return TINY


def test_feature_cache_serves_a_retrain_without_the_backbone(tmp_path, tiny_folder):
    from piscale.models import load_transformers
    from piscale.rewards.value import StepValueReward, ValueHead

    collect(tmp_path / "f.sqlite", CollectConfig(policy="toy", rollouts=2, seed=0, max_tokens=64))
    rollouts = labelled_rollouts(ResultStore(tmp_path / "f.sqlite"))
    model, tokenizer = load_transformers(str(tiny_folder))
    size = model.config.hidden_size
    head = ValueHead(np.zeros(size), np.ones(size), [np.zeros(size)], [np.float32(0)])
    reward = StepValueReward(model, tokenizer, head, system_prompt=rollouts[0].system)
    cache = FeatureCache(tmp_path / "cache", str(tiny_folder), [1, -1], {"kind": "parts"})
    first = extract_features(reward, rollouts, [1, -1], cache, batch=3)
    read = reward.usage.scored_tokens
    assert read > 0
    again = extract_features(reward, rollouts, [1, -1], cache, batch=3)
    assert reward.usage.scored_tokens == read  # nothing read twice
    for a, b, r in zip(first, again, rollouts):
        assert a.shape == (2, len(r.steps), size)
        np.testing.assert_array_equal(a, b)
    direct = reward.read_features([rollouts[0].question], [list(rollouts[0].steps)], [1, -1])[0]
    np.testing.assert_allclose(first[0], direct, atol=1e-2)  # the cache stores float16


def test_collect_and_train_commands_end_to_end(tmp_path, tiny_folder, monkeypatch):
    from piscale.cli import app
    from piscale.rewards.value import HeadFile, load_value_reward

    monkeypatch.setenv("PISCALE_HOME", str(tmp_path / "home"))
    data = tmp_path / "toy_train.jsonl"
    data.write_text("".join(
        json.dumps({"id": f"toy-{i}", "question": f"Count from problem {i}.", "answer": str(2 + i % 3)}) + "\n"
        for i in range(12)
    ))
    runner = CliRunner()
    db = tmp_path / "rollouts.sqlite"
    arguments = ["prm", "collect", "--dataset", str(data), "--model", "toy", "--engine", "auto",
                 "--rollouts", "3", "--max-tokens", "64", "--db", str(db)]
    result = runner.invoke(app, arguments)
    assert result.exit_code == 0, result.output
    assert "stored 12 problems" in result.output
    again = runner.invoke(app, arguments)
    assert again.exit_code == 0 and "12 of 12 problems stored; 0 to collect" in again.output
    head = tmp_path / "head.safetensors"
    result = runner.invoke(app, ["prm", "train", "--db", str(db), "--backbone", str(tiny_folder), "--layers", "1,2",
                                 "--out", str(head), "--cache-dir", str(tmp_path / "features"),
                                 "--report", str(tmp_path / "report.json")])
    assert result.exit_code == 0, result.output
    metadata = HeadFile.read(head).metadata
    assert metadata["layer"] in (1, 2) and metadata["training"]["seed"] == 0
    assert len(metadata["training"]["data_sha256"]) == 64
    assert "arith" in metadata["metrics"]["baselines_on_validation"]
    crossed = json.loads((tmp_path / "report.json").read_text())["cross_validation"]
    assert crossed["value*arith"]["steps"] == crossed["arith"]["steps"] == crossed["value"]["steps"]
    too_many = runner.invoke(app, ["prm", "train", "--db", str(db), "--backbone", str(tiny_folder), "--problems", "50",
                                   "--out", str(tmp_path / "other.safetensors")])
    assert too_many.exit_code == 2 and "holds 12 problem collections, fewer than the 50" in too_many.output
    # The database grows (more rollouts of problems it already holds); --problems 12 still trains on the same data.
    more = runner.invoke(app, [*arguments[:-2], "--seed", "1", "--limit", "4", "--db", str(db)])
    assert more.exit_code == 0 and "stored 4 problems" in more.output, more.output
    again = tmp_path / "again.safetensors"
    common = ["prm", "train", "--db", str(db), "--backbone", str(tiny_folder), "--layers", "1,2", "--folds", "0",
              "--cache-dir", str(tmp_path / "features")]
    assert runner.invoke(app, [*common, "--problems", "12", "--out", str(again)]).exit_code == 0
    assert HeadFile.read(again).metadata["training"]["data_sha256"] == metadata["training"]["data_sha256"]
    assert runner.invoke(app, [*common, "--out", str(again)]).exit_code == 0
    grown = HeadFile.read(again).metadata["training"]
    assert grown["rollouts"] == 12 * 3 + 4 * 3 and grown["data_sha256"] != metadata["training"]["data_sha256"]
    reward = load_value_reward(head)
    [scores] = asyncio.run(reward.score(["Count from problem 1."], [["Add 1\n\n", "\\boxed{4}"]]))
    assert len(scores) == 2 and all(0 < s < 1 for s in scores)


def test_commands_refuse_evaluation_sets(tmp_path):
    from piscale.cli import app

    result = CliRunner().invoke(app, ["prm", "collect", "--dataset", "gsm8k", "--db", str(tmp_path / "x.sqlite")])
    assert result.exit_code == 2 and "evaluation set" in result.output


def test_cross_validation_scores_every_step_out_of_fold_and_finds_a_planted_signal():
    from piscale.values.train import LabelledRollout, cross_validated_scores, fold_problems, step_table

    rng = np.random.default_rng(2)
    rollouts, features = [], []
    for p in range(40):
        for _ in range(4):
            correct = bool(rng.random() < 0.4)
            steps = int(rng.integers(2, 6))
            rollouts.append(LabelledRollout(f"p{p}", "q", "s", tuple(["step\n\n"] * steps), correct))
            f = rng.normal(size=(2, steps, 6))
            f[1, :, 0] += 2.0 if correct else -2.0  # the second layer carries the outcome
            features.append(f)
    folds = fold_problems([r.problem_id for r in rollouts], 4, seed=0)
    assert sorted(len(f) for f in folds) == [10, 10, 10, 10] and set().union(*folds) == {f"p{p}" for p in range(40)}
    scores, layers = cross_validated_scores(rollouts, features, [0, 1], 4, l2_grid=(1e-2,))
    assert not np.isnan(scores).any() and layers == [1, 1, 1, 1]
    table = step_table(rollouts, features, 0)
    assert auroc(scores, table.outcome) > 0.95
    with pytest.raises(TrainError, match="folds"):
        fold_problems(["a", "b"], 3, seed=0)


class CountsX:
    """A reward on the probability scale: a tenth of the x's in the text it
    is sent (one joined step under ``model`` aggregation)."""

    name = "count-x"
    scale = "probability"
    needs_logprobs = False

    async def score(self, prompts, trajectories):
        return [[step.count("x") / 10 for step in steps] for steps in trajectories]


def test_prefix_scores_score_every_prefix_as_a_search_sees_it():
    found = asyncio.run(prefix_scores(CountsX(), ["q", "q"], [["x", "yx", "xx"], ["y"]]))
    assert [list(s) for s in found] == [pytest.approx([0.1, 0.2, 0.4]), [0.0]]
    rollouts = [
        LabelledRollout("p0", "q", "s", ("x",), True),
        LabelledRollout("p1", "q", "s", ("xx", "x"), False),
    ]
    by_rollout = reward_step_scores(CountsX(), rollouts, [1])
    assert list(by_rollout) == [1] and list(by_rollout[1]) == pytest.approx([0.2, 0.3])
