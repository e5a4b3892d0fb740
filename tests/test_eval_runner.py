"""The grid runner against a scripted search: planning, resuming, batching."""

from __future__ import annotations

import hashlib
import asyncio
import json
from pathlib import Path

import pytest

from piscale.eval.render import markdown
from piscale.eval.grid import EvalConfig, EvalError, Grid
from piscale.eval.runner import Evaluation
from piscale.eval.store import ResultStore
from piscale.eval.summary import summarize
from piscale.tasks import load_task


def unit(*parts: object) -> float:
    """A deterministic number in [0, 1) from its arguments."""
    digest = hashlib.sha256(json.dumps(parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") / 2**64


class ScriptedSearch:
    """Stands in for ``piscale.search.run_many``: each question's result
    depends only on (question, algorithm, budget, seed), never on its batch.
    The question "Q{k}" has the answer k; a sample is right with probability 0.5."""

    def __init__(self, fail_after_calls: int | None = None):
        self.calls: list[tuple[list[str], str, int, int]] = []
        self.fail_after_calls = fail_after_calls

    async def __call__(self, lm, reward, questions, algorithm, budget, seed, *, system, trace, **options):
        if self.fail_after_calls is not None and len(self.calls) >= self.fail_after_calls:
            raise KeyboardInterrupt("killed")
        self.calls.append((list(questions), algorithm, budget, seed))
        return [self.solve(q, algorithm, budget, seed, trace) for q in questions]

    @staticmethod
    def solve(question: str, algorithm: str, budget: int, seed: int, trace: bool) -> dict:
        truth = question.split("Q")[-1]
        candidates = []
        for i in range(budget):
            right = unit(question, algorithm, seed, i) < 0.5
            answer = truth if right else str(int(truth) + 1 + i % 2)
            candidates.append({"text": f"\\boxed{{{answer}}}", "answer": answer,
                               "score": unit("score", question, seed, i), "log_weight": 0.0, "finished": True})
        chosen = max(candidates, key=lambda c: c["score"])
        return {
            "question": question, "algorithm": algorithm, "budget": budget, "seed": seed, "settings": {},
            "answer": chosen["answer"], "text": chosen["text"], "candidates": candidates,
            "usage": {"generated_tokens": 10 * budget, "prompt_tokens": 7, "reward_calls": budget,
                      "reward_steps": budget, "wall_time": 0.01 * budget},
            "trace": {"steps": []} if trace else None,
        }


@pytest.fixture
def task(tmp_path: Path):
    path = tmp_path / "q.jsonl"
    path.write_text("".join(json.dumps({"question": f"Q{k}", "answer": str(k)}) + "\n" for k in range(1, 6)))
    return load_task(str(path))


CONFIG = EvalConfig(model="toy", reward="arith", system="sys", prompt_template="Solve {question}")
GRID = Grid.parse("pf,bon,sc", "1,2,4", "0,1")


def table(db: Path) -> dict:
    (group,) = summarize(db, derived=False)  # the stored rows only
    return {(c.algorithm, c.budget): (c.accuracy, c.problems, c.seeds, c.generated_tokens) for c in group.cells}


async def run_grid(
    db: Path, task, search: ScriptedSearch, grid: Grid = GRID, chunk_size: int = 2, limit=None, parallel: int = 1
) -> Evaluation:
    with ResultStore(db) as store:
        evaluation = Evaluation(store, task, CONFIG, grid, limit=limit, identity={"spec": "toy"})
        run_id = evaluation.start_run()
        await evaluation.run(None, None, run_id=run_id, solve_many=search, chunk_size=chunk_size, parallel=parallel)
        return evaluation


class OverlapSearch(ScriptedSearch):
    """Yields to the event loop inside each call and counts the calls in
    flight at once."""

    def __init__(self):
        super().__init__()
        self.in_flight = self.most_in_flight = 0

    async def __call__(self, *args, **kwargs):
        self.in_flight += 1
        self.most_in_flight = max(self.most_in_flight, self.in_flight)
        await asyncio.sleep(0.001 * (len(self.calls) % 3))  # return out of order
        try:
            return await super().__call__(*args, **kwargs)
        finally:
            self.in_flight -= 1


async def test_chunks_fit_an_engine_with_a_fixed_number_of_slots(tmp_path: Path, task) -> None:
    class Slots:
        max_sequences = 5

    search = ScriptedSearch()
    with ResultStore(tmp_path / "slots.sqlite") as store:
        evaluation = Evaluation(store, task, CONFIG, GRID, identity={"spec": "toy"})
        await evaluation.run(Slots(), None, run_id=evaluation.start_run(), solve_many=search, chunk_size=4)
    sizes = {}
    for questions, _algorithm, budget, _seed in search.calls:
        sizes.setdefault(budget, set()).add(len(questions))
    # 5 slots: budget 1 takes chunks of 4 (the chunk size), budget 2 of 2, budget 4 of 1
    assert max(sizes[1]) == 4 and max(sizes[2]) == 2 and max(sizes[4]) == 1
    await run_grid(tmp_path / "plain.sqlite", task, ScriptedSearch(), chunk_size=4)
    assert table(tmp_path / "slots.sqlite") == table(tmp_path / "plain.sqlite")


async def test_parallel_searches_fill_the_same_table(tmp_path: Path, task) -> None:
    await run_grid(tmp_path / "serial.sqlite", task, ScriptedSearch(), chunk_size=2)
    overlapping = OverlapSearch()
    await run_grid(tmp_path / "parallel.sqlite", task, overlapping, chunk_size=2, parallel=3)
    assert overlapping.most_in_flight == 3
    assert table(tmp_path / "parallel.sqlite") == table(tmp_path / "serial.sqlite")
    with ResultStore(tmp_path / "parallel.sqlite") as store:
        assert store.count("searches") == 5 * (3 + 1) * 2


class SlowFirstSearch(ScriptedSearch):
    """The first call returns once six calls have started, or after 3 s."""

    timed_out = False

    async def __call__(self, *args, **kwargs):
        first = not self.calls
        result = await super().__call__(*args, **kwargs)
        if first:
            async def six_started() -> None:
                while len(self.calls) < 6:
                    await asyncio.sleep(0.001)

            try:
                await asyncio.wait_for(six_started(), timeout=3)
            except TimeoutError:
                self.timed_out = True
        return result


async def test_a_slow_search_does_not_hold_back_the_next_ones(tmp_path: Path, task) -> None:
    # with fixed waves of three, the first call's wave could not start a
    # fourth call, and it would time out
    slow = SlowFirstSearch()
    await run_grid(tmp_path / "slow.sqlite", task, slow, chunk_size=2, parallel=3)
    assert not slow.timed_out
    await run_grid(tmp_path / "serial.sqlite", task, ScriptedSearch(), chunk_size=2)
    assert table(tmp_path / "slow.sqlite") == table(tmp_path / "serial.sqlite")


def test_grid_parsing_and_validation() -> None:
    assert Grid.parse("pf, bon", "8,1,2", "0") == Grid(("pf", "bon"), (1, 2, 8), (0,))
    with pytest.raises(EvalError, match="budgets: expected a comma-separated list of int"):
        Grid.parse("pf", "1,two", "0")
    with pytest.raises(EvalError, match="budgets must be >= 1"):
        Grid.parse("pf", "0,1", "0")
    with pytest.raises(EvalError, match="algorithms repeat"):
        Grid.parse("pf,pf", "1", "0")
    with pytest.raises(EvalError, match="at least one of seeds"):
        Grid.parse("pf", "1", "")


async def test_plan_runs_subsampled_baselines_once_at_the_largest_budget(tmp_path: Path, task) -> None:
    with ResultStore(tmp_path / "r.sqlite") as store:
        jobs = Evaluation(store, task, CONFIG, GRID, identity={"spec": "toy"}).pending()
    plan = sorted((j.algorithm, j.budget, j.seed, j.stores, len(j.problems)) for j in jobs)
    assert all(j.variant == "" and j.options == {} for j in jobs)
    assert plan == sorted(
        [("pf", b, s, (b,), 5) for b in (1, 2, 4) for s in (0, 1)] + [("bon", 4, s, (1, 2, 4), 5) for s in (0, 1)]
    )
    # sc takes the same options as bon, so it is read off bon's samples
    assert [j.shared for j in jobs if j.algorithm == "bon"] == [(("sc", (1, 2, 4)),)] * 2
    search = ScriptedSearch()
    await run_grid(tmp_path / "r.sqlite", task, search, chunk_size=2)
    # 6 pf jobs + 2 shared sample jobs, each of 5 problems in chunks of 2 -> 3 calls each.
    assert len(search.calls) == 24
    assert all(len(questions) <= 2 for questions, *_ in search.calls)
    assert search.calls[0][0] == ["Solve Q1", "Solve Q2"]  # the prompt template is applied
    with ResultStore(tmp_path / "r.sqlite") as store:
        assert store.count("results") == 5 * 3 * 3 * 2
        assert store.count("searches") == 5 * (3 + 1) * 2
        assert Evaluation(store, task, CONFIG, GRID, identity={"spec": "toy"}).pending() == []


async def test_interrupted_run_resumes_to_the_same_table(tmp_path: Path, task) -> None:
    await run_grid(tmp_path / "whole.sqlite", task, ScriptedSearch(), chunk_size=2)
    with pytest.raises(KeyboardInterrupt):
        await run_grid(tmp_path / "cut.sqlite", task, ScriptedSearch(fail_after_calls=7), chunk_size=2)
    with ResultStore(tmp_path / "cut.sqlite") as store:
        stored_searches = store.count("searches")
        stored_problems = {row["problem_id"] for row in store.results()}
    # Problems go through the grid two at a time (8 searches each: bon and
    # pf@1,2,4 for two seeds); the kill came during the 8th call of the first pair.
    assert stored_searches == 7 * 2
    assert stored_problems == {"q-0", "q-1"}
    resumed = ScriptedSearch()
    await run_grid(tmp_path / "cut.sqlite", task, resumed, chunk_size=3)
    # Nothing stored is asked for again.
    assert sum(len(q) for q, *_ in resumed.calls) == 40 - 14
    assert table(tmp_path / "cut.sqlite") == table(tmp_path / "whole.sqlite")


async def test_progress_counts_problems_whose_searches_have_all_finished(tmp_path: Path, task) -> None:
    seen = []
    with ResultStore(tmp_path / "r.sqlite") as store:
        evaluation = Evaluation(store, task, CONFIG, GRID, identity={"spec": "toy"})
        await evaluation.run(
            None, None, run_id=evaluation.start_run(), solve_many=ScriptedSearch(), chunk_size=2,
            on_progress=lambda p: seen.append((p.searches_done, p.problems_done, p.problems_total)),
        )
    # Two problems at a time through 8 searches each (bon, pf@1,2,4, two seeds).
    assert {(16, 2, 5), (32, 4, 5), (40, 5, 5)} <= set(seen)
    assert all(done <= searches // 8 for searches, done, _ in seen)
    resumed = []
    with ResultStore(tmp_path / "r.sqlite") as store:
        extended = Evaluation(store, task, CONFIG, Grid.parse("pf,bon,sc", "1,2,4,8", "0,1"), identity={"spec": "toy"})
        await extended.run(
            None, None, run_id=extended.start_run(), solve_many=ScriptedSearch(), chunk_size=2,
            on_progress=lambda p: resumed.append((p.searches_done, p.problems_done, p.problems_total)),
        )
    # Only pf@8 and the larger best-of-N searches are new: 4 per problem.
    assert resumed[0] == (0, 0, 5) and resumed[-1] == (20, 5, 5)


async def test_extending_the_grid_runs_only_the_new_cells(tmp_path: Path, task) -> None:
    db = tmp_path / "r.sqlite"
    await run_grid(db, task, ScriptedSearch(), grid=Grid.parse("pf,bon", "1,2", "0"))
    more = ScriptedSearch()
    await run_grid(db, task, more, grid=Grid.parse("pf,bon", "1,2,8", "0"))
    assert sorted({(a, b) for _, a, b, _ in more.calls}) == [("bon", 8), ("pf", 8)]
    cells = table(db)
    assert set(cells) == {(a, b) for a in ("pf", "bon") for b in (1, 2, 8)}
    # The earlier bon rows (from 2 samples) are kept, not replaced by subsamples of the 8.
    with ResultStore(db) as store:
        bon = {r["budget"]: r["samples_from"] for r in store.results() if r["algorithm"] == "bon"}
    assert bon == {1: 2, 2: 2, 8: 8}


async def test_config_changes_do_not_reuse_results(tmp_path: Path, task) -> None:
    db = tmp_path / "r.sqlite"
    await run_grid(db, task, ScriptedSearch(), grid=Grid.parse("pf", "1", "0"))
    with ResultStore(db) as store:
        same = Evaluation(store, task, CONFIG, Grid.parse("pf", "1", "0"), identity={"spec": "toy"})
        other_prompt = EvalConfig(model="toy", reward="arith", system="sys", prompt_template="Q: {question}")
        changed = Evaluation(store, task, other_prompt, Grid.parse("pf", "1", "0"), identity={"spec": "toy"})
        other_model = Evaluation(store, task, CONFIG, Grid.parse("pf", "1", "0"), identity={"spec": "toy", "identity": "sha256:x"})
        assert same.pending() == []
        assert len(changed.pending()[0].problems) == 5 and changed.config_key != same.config_key
        assert other_model.config_key not in (same.config_key, changed.config_key)


async def test_the_same_data_read_from_another_place_resumes_the_same_results(tmp_path: Path, task) -> None:
    db = tmp_path / "r.sqlite"
    await run_grid(db, task, ScriptedSearch(), grid=Grid.parse("pf", "1", "0"))
    moved = tmp_path / "elsewhere" / "q.jsonl"
    moved.parent.mkdir()
    moved.write_text(Path(task.source).read_text())
    edited = tmp_path / "edited.jsonl"
    edited.write_text(Path(task.source).read_text().replace('"answer": "5"', '"answer": "6"'))
    with ResultStore(db) as store:
        original = Evaluation(store, task, CONFIG, Grid.parse("pf", "1", "0"), identity={"spec": "toy"})
        same_data = Evaluation(store, load_task(str(moved)), CONFIG, Grid.parse("pf", "1", "0"), identity={"spec": "toy"})
        other_data = Evaluation(store, load_task(str(edited)), CONFIG, Grid.parse("pf", "1", "0"), identity={"spec": "toy"})
        assert same_data.config_key == original.config_key and same_data.pending() == []
        assert other_data.config_key != original.config_key and len(other_data.pending()[0].problems) == 5
        # A database whose key still held the file's place (as older versions
        # wrote it) is found by its description and resumed under that key.
        store._db.execute("PRAGMA foreign_keys = OFF")
        for table_name in ("configs", "runs", "searches", "results"):
            store._db.execute(
                f"UPDATE {table_name} SET config_key = 'legacy0000000000' WHERE config_key = ?", (original.config_key,)
            )
        store._db.commit()
        resumed = Evaluation(store, load_task(str(moved)), CONFIG, Grid.parse("pf", "1", "0"), identity={"spec": "toy"})
        assert resumed.config_key == "legacy0000000000" and resumed.pending() == []


async def test_scripted_accuracies_match_a_direct_count(tmp_path: Path, task) -> None:
    db = tmp_path / "r.sqlite"
    await run_grid(db, task, ScriptedSearch(), grid=Grid.parse("pf", "4", "0,1"))
    expected = []
    for k in range(1, 6):
        per_seed = [ScriptedSearch.solve(f"Solve Q{k}", "pf", 4, s, False)["answer"] == str(k) for s in (0, 1)]
        expected.append(sum(per_seed) / 2)
    accuracy, problems, seeds, tokens = table(db)[("pf", 4)]
    assert accuracy == pytest.approx(sum(expected) / 5)
    assert (problems, seeds, tokens) == (5, 2, 40)


async def test_trace_is_stored_when_asked(tmp_path: Path, task) -> None:
    db = tmp_path / "r.sqlite"
    with ResultStore(db) as store:
        evaluation = Evaluation(store, task, CONFIG, Grid.parse("pf", "1", "0"), limit=1, identity={"spec": "toy"})
        await evaluation.run(None, None, run_id=evaluation.start_run(), solve_many=ScriptedSearch(), trace=True)
        (result,) = store.results()
        assert store.search(result["search_id"])["trace"] == {"steps": []}


def test_options_reach_the_algorithms_that_take_them(tmp_path: Path, task) -> None:
    from piscale.eval.grid import algorithm_options, variant_label
    from piscale.eval.runner import oracle_reward

    options = algorithm_options(("pf", "bon", "dvts"), {"temperature": 0.6, "dvts.beam_width": 2, "resampler": "systematic"})
    assert options == {
        "pf": {"temperature": 0.6, "resampler": "systematic"},
        "bon": {"temperature": 0.6},
        "dvts": {"temperature": 0.6, "beam_width": 2},
    }
    assert variant_label(options["pf"]) == "resampler=systematic,temperature=0.6"
    with pytest.raises(EvalError, match="no algorithm of the grid .* takes the option 'beam_width'"):
        algorithm_options(("pf", "bon"), {"beam_width": 2})
    with pytest.raises(EvalError, match="names algorithm 'beam', which is not in the grid"):
        algorithm_options(("pf",), {"beam.beam_width": 2})
    with pytest.raises(EvalError, match="pf takes no option 'beam_width'"):
        algorithm_options(("pf",), {"pf.beam_width": 2})
    with pytest.raises(EvalError, match="unknown algorithm nope"):
        algorithm_options(("pf", "nope"), {})
    with pytest.raises(EvalError, match="potential"):
        with ResultStore(tmp_path / "r.sqlite") as store:
            config = EvalConfig(model="toy", reward="arith", options={"potential": "bogus"})
            Evaluation(store, task, config, Grid.parse("pf", "1", "0"), identity={"spec": "toy"})
    oracle = oracle_reward(task.problems, "Solve {question}")
    assert oracle.reference_for("Solve Q3") == "3"


async def test_variants_and_unsupported_budgets(tmp_path: Path, task) -> None:
    db = tmp_path / "r.sqlite"
    config = EvalConfig(model="toy", reward="arith", options={"dvts.beam_width": 2})
    search = ScriptedSearch()
    with ResultStore(db) as store:
        evaluation = Evaluation(store, task, config, Grid.parse("pf,dvts", "1,2,4", "0"), identity={"spec": "toy"})
        assert list(evaluation.unsupported) == [("dvts", 1)]
        assert "multiple of beam_width=2" in evaluation.unsupported[("dvts", 1)]
        assert evaluation.cell_count == 5 * (3 + 2)
        await evaluation.run(None, None, run_id=evaluation.start_run(), solve_many=search)
        variants = {(r["algorithm"], r["variant"]) for r in store.results()}
    assert variants == {("pf", ""), ("dvts", "beam_width=2")}
    assert sorted({(a, b) for _, a, b, _ in search.calls}) == [("dvts", 2), ("dvts", 4), ("pf", 1), ("pf", 2), ("pf", 4)]
    assert set(table(db)) == {("pf", 1), ("pf", 2), ("pf", 4), ("dvts[beam_width=2]", 2), ("dvts[beam_width=2]", 4)}


class FailingOn(ScriptedSearch):
    """Raises for questions containing ``bad`` (all of them when ``bad`` is empty)."""

    def __init__(self, bad: str):
        super().__init__()
        self.bad = bad

    async def __call__(self, lm, reward, questions, algorithm, budget, seed, **kwargs):
        if any(self.bad in q for q in questions):
            self.calls.append((list(questions), algorithm, budget, seed))
            raise ValueError("prompt and continuation exceed the context window")
        return await super().__call__(lm, reward, questions, algorithm, budget, seed, **kwargs)


async def test_a_failing_problem_is_recorded_and_retried_later(tmp_path: Path, task) -> None:
    db = tmp_path / "r.sqlite"
    grid = Grid.parse("pf", "1,2", "0")
    flaky = FailingOn("Q3")
    with ResultStore(db) as store:
        evaluation = Evaluation(store, task, CONFIG, grid, identity={"spec": "toy"})
        progress = await evaluation.run(None, None, run_id=evaluation.start_run(), solve_many=flaky, chunk_size=5)
        assert (progress.failures, progress.searches_done) == (2, 8)
        assert (progress.problems_done, progress.problems_total) == (5, 5)  # a failed search is finished too
        # Each failing chunk of 5 is retried one problem at a time: 1 + 5 calls per budget.
        assert len(flaky.calls) == 12
        failures = store.unresolved_failures()
        assert [(f["problem_id"], f["budget"]) for f in failures] == [("q-2", 1), ("q-2", 2)]
        assert "context window" in failures[0]["error"]
        assert [(j.budget, [p.id for p in j.problems]) for j in evaluation.pending()] == [(1, ["q-2"]), (2, ["q-2"])]
    (group,) = summarize(db)
    assert len(group.failures) == 2
    assert "2 search(es) failed and are missing" in markdown([group])
    await run_grid(db, task, ScriptedSearch(), grid=grid)
    with ResultStore(db) as store:
        assert store.unresolved_failures() == [] and store.count("failures") == 2
    assert table(db)[("pf", 1)][1] == 5


async def test_failures_in_a_row_stop_the_run(tmp_path: Path, task) -> None:
    with ResultStore(tmp_path / "r.sqlite") as store:
        evaluation = Evaluation(store, task, CONFIG, Grid.parse("pf", "1,2", "0"), identity={"spec": "toy"})
        with pytest.raises(EvalError, match="3 searches in a row failed.*context window"):
            await evaluation.run(
                None, None, run_id=evaluation.start_run(), solve_many=FailingOn(""), max_failures_in_a_row=3
            )
        assert store.count("failures") == 3 and store.count("results") == 0


def test_reward_identity_names_the_models_it_uses() -> None:
    from piscale.eval.identity import reward_identity

    judge = reward_identity("judge", "smollm2-135m-instruct")
    assert [m["spec"] for m in judge["models"]] == ["smollm2-135m-instruct"]
    # A catalog model is identified by its file's sha256 without being loaded.
    assert judge["models"][0]["identity"].startswith("sha256:")
    pair = reward_identity("cdr:qwen2.5-coder-1.5b-instruct, qwen2.5-coder-0.5b-instruct", "toy")
    assert [m["spec"] for m in pair["models"]] == ["qwen2.5-coder-1.5b-instruct", "qwen2.5-coder-0.5b-instruct"]
    assert pair["models"][0]["identity"] != pair["models"][1]["identity"]
    assert reward_identity("arith", "toy") == {"spec": "arith"}
    assert "identity_unavailable" in reward_identity("judge:./no/such/model", "toy")["models"][0]


def test_a_value_reward_is_identified_by_its_head_file_and_backbone(tmp_path: Path) -> None:
    import hashlib
    import shutil

    from piscale.eval.identity import reward_identity
    from piscale.rewards.value import shipped_head_path

    shipped = shipped_head_path()
    head, backbone = reward_identity("value", "toy")["models"]
    assert head["identity"] == "sha256:" + hashlib.sha256(shipped.read_bytes()).hexdigest()
    assert backbone["spec"] == "qwen2.5-coder-0.5b-instruct" and backbone["identity"].startswith("sha256:")
    copy = tmp_path / "head.safetensors"
    shutil.copyfile(shipped, copy)
    assert reward_identity(f"value:{copy}", "toy")["models"][0]["identity"] == head["identity"]
    with copy.open("ab") as file:
        file.write(b" ")  # a different file, though it may still load
    assert reward_identity(f"value:{copy}", "toy")["models"][0]["identity"] != head["identity"]
    assert "identity_unavailable" in reward_identity("value:./no/such/head.safetensors", "toy")["models"][0]
    # Kinds are read as the reward is built: case and spacing aside, with any exponent.
    assert reward_identity(" Value^2", "toy")["models"] == reward_identity("value", "toy")["models"]


def test_a_configuration_is_keyed_by_what_its_files_hold_not_where_they_lie(tmp_path: Path, task, monkeypatch) -> None:
    """The shipped head in another checkout of the package, and the same
    policy file named by another path, resume the stored results; a changed
    head file does not."""
    import shutil

    import piscale.rewards.value as value

    config = EvalConfig(model="toy", reward="value")
    grid = Grid.parse("bon", "1", "0")
    with ResultStore(tmp_path / "r.sqlite") as store:
        here = Evaluation(store, task, config, grid, identity={"spec": "toy", "identity": "sha256:ab"})
        elsewhere = tmp_path / "checkout" / "default.safetensors"
        elsewhere.parent.mkdir()
        shutil.copyfile(value.shipped_head_path(), elsewhere)
        monkeypatch.setattr(value, "shipped_head_path", lambda: elsewhere)
        there = Evaluation(store, task, config, grid, identity={"spec": "/models/toy.gguf", "identity": "sha256:ab"})
        assert there.config_key == here.config_key
        with elsewhere.open("ab") as file:
            file.write(b" ")
        changed = Evaluation(store, task, config, grid, identity={"spec": "toy", "identity": "sha256:ab"})
        assert changed.config_key != here.config_key


async def test_a_result_that_cannot_be_graded_is_a_recorded_failure(tmp_path: Path, task) -> None:
    class NoUsage(ScriptedSearch):
        async def __call__(self, *args, **kwargs):
            results = await super().__call__(*args, **kwargs)
            for result in results:
                if result["question"].endswith("Q2"):
                    del result["usage"]["generated_tokens"]
            return results

    with ResultStore(tmp_path / "r.sqlite") as store:
        evaluation = Evaluation(store, task, CONFIG, Grid.parse("bon", "1,2", "0"), identity={"spec": "toy"})
        progress = await evaluation.run(None, None, run_id=evaluation.start_run(), solve_many=NoUsage())
        assert (progress.searches_done, progress.failures) == (4, 1)
        (failure,) = store.unresolved_failures()
        assert failure["problem_id"] == "q-1" and "usage lacks generated_tokens" in failure["error"]
        assert store.count("results") == 4 * 2 and store.count("searches") == 4
