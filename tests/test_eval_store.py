"""The results database: atomic, idempotent writes and clear refusals."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from piscale.eval.store import ResultRow, ResultStore, StoreError


def row(problem_id: str, budget: int, answer: str | None = "1", correct: bool = True, algorithm: str = "bon") -> ResultRow:
    return ResultRow(
        problem_id=problem_id, algorithm=algorithm, budget=budget, seed=0, reference="1", answer=answer,
        correct=correct, expected_accuracy=float(correct), subsampled=budget < 4, samples_from=4, subsets=1,
        generated_tokens=10.0 * budget, prompt_tokens=5.0, reward_calls=float(budget), wall_time=0.1 * budget,
    )


def derive_from_answer(result: dict) -> list[ResultRow]:
    return [row(result["problem"], b, answer=result["answer"]) for b in (1, 2, 4)]


@pytest.fixture
def store(tmp_path: Path) -> ResultStore:
    db = ResultStore(tmp_path / "r.sqlite")
    db.ensure_config("cfg", "gsm8k", "toy", "arith", {"model": {"spec": "toy"}})
    yield db
    db.close()


def test_a_search_and_its_rows_are_stored_once(store: ResultStore) -> None:
    run = store.start_run("cfg", {"argv": ["piscale", "eval"]})
    cell = ("p1", "bon", "", 4, 0)
    assert store.save_search("cfg", run, cell, {"problem": "p1", "answer": "1"}, derive_from_answer) == 3
    assert store.save_search("cfg", run, cell, {"problem": "p1", "answer": "1"}, derive_from_answer) == 0
    assert store.count("searches") == 1 and store.count("results") == 3
    assert store.stored_cells("cfg") == {("p1", "bon", "", 1, 0), ("p1", "bon", "", 2, 0), ("p1", "bon", "", 4, 0)}
    stored = store.results("cfg")
    assert [(r["budget"], r["generated_tokens"], r["subsampled"]) for r in stored] == [(1, 10, 1), (2, 20, 1), (4, 40, 0)]
    assert store.search(stored[0]["search_id"]) == {"problem": "p1", "answer": "1"}
    assert store.runs("cfg")[0]["info"] == {"argv": ["piscale", "eval"]}


def test_a_failure_while_deriving_stores_nothing(store: ResultStore) -> None:
    run = store.start_run("cfg", {})

    def half_then_fail(result: dict):
        yield row("p1", 1)
        raise RuntimeError("grading crashed")

    with pytest.raises(RuntimeError, match="grading crashed"):
        store.save_search("cfg", run, ("p1", "bon", "", 4, 0), {"problem": "p1", "answer": "1"}, half_then_fail)
    assert store.count("searches") == 0 and store.count("results") == 0
    # The database is still usable afterwards.
    assert store.save_search("cfg", run, ("p1", "bon", "", 4, 0), {"problem": "p1", "answer": "1"}, derive_from_answer) == 3


def test_a_second_writer_derives_rows_from_the_stored_search(tmp_path: Path, store: ResultStore) -> None:
    run = store.start_run("cfg", {})
    store.save_search("cfg", run, ("p1", "bon", "", 4, 0), {"problem": "p1", "answer": "first"}, lambda r: [row("p1", 4, r["answer"])])
    with ResultStore(tmp_path / "r.sqlite") as other:
        other_run = other.start_run("cfg", {})
        added = other.save_search(
            "cfg", other_run, ("p1", "bon", "", 4, 0), {"problem": "p1", "answer": "second"}, derive_from_answer
        )
    # Budgets 1 and 2 were missing; they come from the first writer's search, like budget 4.
    assert added == 2
    assert {r["budget"]: r["answer"] for r in store.results("cfg")} == {1: "first", 2: "first", 4: "first"}
    assert len({r["search_id"] for r in store.results("cfg")}) == 1


def test_configs_keep_results_apart(store: ResultStore) -> None:
    store.ensure_config("other", "gsm8k", "smollm", "judge", {})
    run = store.start_run("other", {})
    store.save_search("other", run, ("p1", "bon", "", 4, 0), {"problem": "p1", "answer": "1"}, derive_from_answer)
    assert store.stored_cells("cfg") == set()
    assert len(store.stored_cells("other")) == 3
    assert [c["config_key"] for c in store.configs()] == ["cfg", "other"]
    assert store.searches("cfg") == []
    [listed] = store.searches("other")
    assert (listed["problem_id"], listed["algorithm"], listed["budget"]) == ("p1", "bon", 4)
    assert store.search(listed["search_id"]) == {"problem": "p1", "answer": "1"}


def test_wal_mode_and_integrity(store: ResultStore, tmp_path: Path) -> None:
    connection = sqlite3.connect(tmp_path / "r.sqlite")
    assert connection.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    connection.close()
    assert store.integrity_ok()


def test_refuses_files_it_cannot_use(tmp_path: Path) -> None:
    junk = tmp_path / "junk.sqlite"
    junk.write_bytes(b"this is not a database, just some bytes " * 50)
    with pytest.raises(StoreError, match="not a usable SQLite database"):
        ResultStore(junk)
    with pytest.raises(StoreError, match="does not exist"):
        ResultStore(tmp_path / "missing" / "r.sqlite")
    newer = tmp_path / "newer.sqlite"
    ResultStore(newer).close()
    connection = sqlite3.connect(newer)
    connection.execute("UPDATE meta SET value = '99' WHERE key = 'schema_version'")
    connection.commit()
    connection.close()
    with pytest.raises(StoreError, match="schema version 99"):
        ResultStore(newer)


def test_stored_cells_of_some_problems(store: ResultStore) -> None:
    run = store.start_run("cfg", {})
    for problem in ("p1", "p2", "p3"):
        store.save_search("cfg", run, (problem, "bon", "", 4, 0), {"problem": problem, "answer": "1"}, derive_from_answer)
    assert {c[0] for c in store.stored_cells("cfg", ["p1", "p3", "p9"])} == {"p1", "p3"}
    assert store.stored_cells("cfg", []) == set()
    assert len(store.stored_cells("cfg")) == 9
