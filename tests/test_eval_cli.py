"""``piscale eval`` end to end on the exact toy model: a run killed with
SIGKILL resumes to the same table as an uninterrupted run, two processes
writing one database leave it consistent, and the stored baselines agree with
the search's own choices."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from piscale.eval.grade import samples_of
from piscale.eval.subsample import first_subset_choice
from piscale.eval.summary import summarize

CLI = [sys.executable, "-c", "from piscale.cli import app; app()"]
GRID = ["--algorithms", "pf,bon,wbon,sc,dvts", "--budgets", "1,2,4,8", "--seeds", "0,1"]


@pytest.fixture(scope="module")
def questions(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("data") / "counting.jsonl"
    path.write_text(
        "".join(
            json.dumps({"question": f"How many marbles are in jar {k}?", "answer": str(k % 5)}) + "\n"
            for k in range(12)
        )
    )
    return path


def eval_command(questions: Path, db: Path, *extra: str) -> list[str]:
    # verify: the oracle reward, so rewards vary and the baselines differ.
    return [*CLI, "eval", "--dataset", str(questions), "--model", "toy", "--reward", "verify", *GRID,
            "--db", str(db), "--option", "dvts.beam_width=2", *extra]


def run(command: list[str]) -> subprocess.CompletedProcess:
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, env=_env())
    assert done.returncode == 0, done.stderr
    return done


def _env() -> dict[str, str]:
    # Wide enough that rich does not wrap the lines these tests read.
    return {**os.environ, "COLUMNS": "200"}


@pytest.fixture(scope="module")
def reference(questions: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    db = tmp_path_factory.mktemp("reference") / "whole.sqlite"
    run(eval_command(questions, db, "--chunk-size", "4"))
    return db


def rows(db: Path) -> list[tuple]:
    with sqlite3.connect(db) as connection:
        return sorted(
            connection.execute(
                "SELECT problem_id, algorithm, variant, budget, seed, answer, correct, expected_accuracy, "
                "generated_tokens, subsampled, samples_from FROM results"
            ).fetchall()
        )


def table(db: Path) -> dict:
    (group,) = summarize(db)
    return {(c.algorithm, c.budget): (c.accuracy, c.low, c.high, c.problems, c.seeds, c.generated_tokens)
            for c in group.cells}


def count(db: Path, table_name: str) -> int:
    if not db.exists():  # connecting would create it
        return 0
    connection = sqlite3.connect(db, timeout=30)
    try:
        return connection.execute(f"SELECT COUNT(*) FROM {table_name}").fetchone()[0]
    except sqlite3.OperationalError:  # the tables are not created yet
        return 0
    finally:
        connection.close()


def assert_consistent(db: Path) -> None:
    """Integrity holds and every stored search has all of its rows."""
    with sqlite3.connect(db) as connection:
        assert connection.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        per_search = connection.execute(
            "SELECT s.algorithm, s.budget, COUNT(r.result_id) FROM searches s "
            "LEFT JOIN results r ON r.search_id = s.search_id GROUP BY s.search_id"
        ).fetchall()
        keys = connection.execute(
            "SELECT COUNT(*), COUNT(DISTINCT problem_id || '|' || algorithm || '|' || variant || '|' || budget "
            "|| '|' || seed) FROM results"
        ).fetchone()
    assert keys[0] == keys[1]
    for algorithm, budget, n_rows in per_search:
        # One best-of-N style search at budget N stores rows for bon, wbon and
        # sc (they share samples) at each grid budget up to N.
        expected = 3 * sum(1 for b in (1, 2, 4, 8) if b <= budget) if algorithm in ("bon", "wbon", "sc") else 1
        assert n_rows == expected, (algorithm, budget, n_rows)
    with sqlite3.connect(db) as connection:
        searched = {a for (a,) in connection.execute("SELECT DISTINCT algorithm FROM searches")}
    assert not searched & {"wbon", "sc"}, "wbon and sc should reuse the samples of bon"


def test_the_reference_run_fills_the_grid(reference: Path) -> None:
    cells = table(reference)
    # dvts with beam width 2 cannot spend budget 1: that cell is skipped, not run.
    expected = {(a, b) for a in ("pf", "bon", "wbon", "sc") for b in (1, 2, 4, 8)}
    expected |= {("dvts[beam_width=2]", b) for b in (2, 4, 8)}
    # The report adds particle filtering's weighted vote, re-chosen from the
    # stored particles, and pass@n from best-of-N's samples.
    derived = {(a, b) for a in ("pf[selection=weighted-vote]", "pass@n") for b in (1, 2, 4, 8)}
    assert set(cells) == expected | derived
    # pass@1 is the mean correctness of one sample, as best-of-1 is, and
    # pass@b bounds every selection from the same samples.
    assert cells[("pass@n", 1)][0] == pytest.approx(cells[("bon", 1)][0])
    for b in (2, 4, 8):
        assert all(cells[("pass@n", b)][0] >= cells[(a, b)][0] - 1e-12 for a in ("bon", "wbon", "sc"))
    assert cells[("pass@n", 8)][0] > cells[("pass@n", 1)][0]
    assert all(problems == 12 and seeds == 2 for *_, problems, seeds, _ in cells.values())
    assert count(reference, "results") == 12 * 2 * len(expected)
    assert_consistent(reference)


def test_killed_run_resumes_to_the_same_table(questions: Path, reference: Path, tmp_path: Path) -> None:
    db = tmp_path / "killed.sqlite"
    command = eval_command(questions, db, "--chunk-size", "1")
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=_env())
    try:
        deadline = time.monotonic() + 120
        while count(db, "results") < 20:
            if process.poll() is not None:
                pytest.fail("the run finished before it could be killed")
            if time.monotonic() > deadline:
                pytest.fail("the run stored nothing within two minutes")
            time.sleep(0.02)
        process.send_signal(signal.SIGKILL)
    finally:
        process.wait(timeout=60)
    assert process.returncode == -signal.SIGKILL
    stored = count(db, "results")
    total = count(reference, "results")
    assert 20 <= stored < total
    assert_consistent(db)
    searches_before = count(db, "searches")

    resumed = run(command)
    # The resumed run only does what was missing.
    searches_run = int(resumed.stderr.split("Ran ")[1].split(" searches")[0])
    assert searches_run == count(reference, "searches") - searches_before
    assert rows(db) == rows(reference)
    assert table(db) == table(reference)
    assert_consistent(db)
    again = run(command)
    assert "nothing to run" in again.stderr


def test_two_concurrent_writers_leave_one_consistent_result_set(questions: Path, reference: Path, tmp_path: Path) -> None:
    db = tmp_path / "shared.sqlite"
    command = eval_command(questions, db, "--chunk-size", "2")
    first = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=_env())
    second = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=_env())
    errors = [first.communicate(timeout=300)[1], second.communicate(timeout=300)[1]]
    assert first.returncode == 0 and second.returncode == 0, errors
    assert count(db, "searches") == count(reference, "searches")
    assert rows(db) == rows(reference)
    assert table(db) == table(reference)
    assert_consistent(db)


def test_stored_baselines_match_the_searchs_own_choice(reference: Path) -> None:
    """At b = N the first-b rule must pick what the search picked, so the
    subsampled rows use the search's selection, not a look-alike."""
    with sqlite3.connect(reference) as connection:
        searches = connection.execute("SELECT algorithm, result FROM searches WHERE algorithm = 'bon'").fetchall()
    assert len(searches) == 12 * 2
    for algorithm, payload in searches:
        result = json.loads(payload)
        samples = samples_of(result["candidates"], "0", "probability")
        chosen = result["candidates"][first_subset_choice(algorithm, samples, result["budget"])]
        assert (chosen["answer"], chosen["text"]) == (result["answer"], result["text"])


def test_shared_samples_give_what_separate_searches_give(questions: Path, reference: Path, tmp_path: Path) -> None:
    """wbon and sc rows derived from bon's samples equal the rows of wbon and
    sc searched on their own with the same seed: sharing changes no answer."""

    def full_budget_rows(db: Path, algorithm: str) -> dict:
        with sqlite3.connect(db) as connection:
            return {
                (problem, seed): (answer, correct)
                for problem, seed, answer, correct in connection.execute(
                    "SELECT problem_id, seed, answer, correct FROM results WHERE algorithm = ? AND budget = 8",
                    (algorithm,),
                )
            }

    for algorithm in ("wbon", "sc"):
        db = tmp_path / f"{algorithm}.sqlite"
        command = eval_command(questions, db)
        command[command.index("pf,bon,wbon,sc,dvts")] = algorithm
        command.remove("--option")
        command.remove("dvts.beam_width=2")
        run(command)
        alone = full_budget_rows(db, algorithm)
        assert len(alone) == 12 * 2
        assert full_budget_rows(reference, algorithm) == alone
    # and the selections do differ somewhere, or this would test nothing
    assert full_budget_rows(reference, "sc") != full_budget_rows(reference, "bon")


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["--dataset", "no-such-task"], "unknown dataset 'no-such-task'"),
        (["--algorithms", "pf,nope"], "unknown algorithm nope"),
        (["--budgets", "1,x"], "budgets: expected a comma-separated list of int"),
        (["--prompt", "no placeholder"], "must contain {question}"),
        (["--option", "temperature"], "--option expects KEY=VALUE"),
        (["--option", "beam_width=2", "--algorithms", "pf"], "takes the option 'beam_width'"),
    ],
)
def test_bad_arguments_fail_with_a_message(questions: Path, tmp_path: Path, arguments: list[str], message: str) -> None:
    import typer
    from typer.testing import CliRunner

    from piscale.cli.eval import register

    app = typer.Typer()
    register(app)
    base = {"--dataset": str(questions), "--model": "toy", "--reward": "verify", "--db": str(tmp_path / "r.sqlite")}
    for flag in arguments[::2]:
        base.pop(flag, None)
    command = ["eval", *[x for pair in base.items() for x in pair], *arguments]
    result = CliRunner().invoke(app, command)
    assert result.exit_code == 2, result.output
    assert message in " ".join(result.output.split())


def test_llamacpp_slots_are_sized_for_a_wave_of_the_grid() -> None:
    import io
    from types import SimpleNamespace

    from rich.console import Console

    from piscale.cli.eval import _slots_for_the_grid
    from piscale.eval.grid import EvalConfig

    jobs = [SimpleNamespace(budget=b) for b in (1, 4, 16)]
    out = Console(file=io.StringIO())
    model = "qwen2.5-coder-0.5b-instruct"
    llamacpp = EvalConfig(model=model, reward="arith", engine="llamacpp", system="", prompt_template="{question}")
    assert _slots_for_the_grid(llamacpp, None, {}, jobs, 2, 1, out) == {"max_sequences": 34}  # 2 for scoring
    assert _slots_for_the_grid(llamacpp, None, {}, jobs, 8, 3, out) == {"max_sequences": 64}  # capped
    assert _slots_for_the_grid(llamacpp, None, {}, jobs[:1], 2, 1, out) == {"max_sequences": 16}  # the engine's floor
    given = {"max_sequences": 40, "n_threads": 2}
    assert _slots_for_the_grid(llamacpp, None, given, jobs, 4, 1, out) == given
    hf = EvalConfig(model=model, reward="arith", engine="hf", system="", prompt_template="{question}")
    assert _slots_for_the_grid(hf, None, {}, jobs, 4, 1, out) == {}
    assert "34 cache slots" in out.file.getvalue()


def test_a_log_file_gets_lines_with_problems_done_and_time_left(questions: Path, tmp_path: Path, monkeypatch) -> None:
    import typer
    from typer.testing import CliRunner

    import piscale.cli.eval as eval_cli

    monkeypatch.setattr(eval_cli, "LOG_EVERY_S", 0.0)  # a line at every update
    app = typer.Typer()
    eval_cli.register(app)
    command = ["eval", "--dataset", str(questions), "--model", "toy", "--reward", "verify", "--algorithms", "pf",
               "--budgets", "1,2", "--seeds", "0", "--limit", "4", "--chunk-size", "2", "--db", str(tmp_path / "r.sqlite")]
    result = CliRunner().invoke(app, command, env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    lines = [line for line in result.output.splitlines() if " searches, accuracy " in line]
    # Two problems at a time through pf@1 and pf@2: a pair is done after 4 searches.
    assert lines[0].startswith("0/4 problems, 0/8 searches")
    assert any(line.startswith("2/4 problems, 4/8 searches") for line in lines)
    assert lines[-1].startswith("4/4 problems, 8/8 searches, accuracy ")
    assert "elapsed" in lines[-1]


def test_skip_runs_the_problems_after_the_first_ones(questions: Path, reference: Path, tmp_path: Path) -> None:
    # Problems 8 and 9 alone; a search depends only on its problem and
    # seed, so their results are the whole run's results for them (pf: the
    # baselines' smaller budgets are subsampled from their largest there).
    db = tmp_path / "held-out.sqlite"
    run([*CLI, "eval", "--dataset", str(questions), "--model", "toy", "--reward", "verify", "--algorithms", "pf",
         "--budgets", "2", "--seeds", "1", "--db", str(db), "--skip", "8", "--limit", "2"])
    found = rows(db)
    assert sorted({row[0] for row in found}) == ["counting-8", "counting-9"]
    whole = [row for row in rows(reference) if row[0] in ("counting-8", "counting-9")
             and row[1] == "pf" and row[3] == 2 and row[4] == 1]
    assert [row[:8] for row in found] == [row[:8] for row in whole]
