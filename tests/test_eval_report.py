"""Reports: interval arithmetic, averaging, Markdown, plots and the command."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from piscale.eval.plots import write_plots
from piscale.eval.render import markdown
from piscale.eval.stats import wilson_interval
from piscale.eval.store import ResultRow, ResultStore
from piscale.eval.summary import summarize


def test_wilson_interval_known_values() -> None:
    # Textbook values (e.g. Newcombe 1998; any Wilson calculator) at z = 1.96.
    assert wilson_interval(0.8, 10) == pytest.approx((0.4902, 0.9433), abs=1e-4)
    assert wilson_interval(0.0, 10) == pytest.approx((0.0, 0.2775), abs=1e-4)
    assert wilson_interval(1.0, 10) == pytest.approx((0.7225, 1.0), abs=1e-4)
    assert wilson_interval(0.5, 100) == pytest.approx((0.4038, 0.5962), abs=1e-4)
    with pytest.raises(ValueError, match="at least one observation"):
        wilson_interval(0.5, 0)
    with pytest.raises(ValueError, match=r"in \[0, 1\]"):
        wilson_interval(1.5, 3)


def stored_row(problem: str, algorithm: str, budget: int, seed: int, expected: float, correct: bool, tokens: float,
               subsampled: bool = False) -> ResultRow:
    return ResultRow(
        problem_id=problem, algorithm=algorithm, budget=budget, seed=seed, reference="1",
        answer="1" if correct else "2", correct=correct, expected_accuracy=expected, subsampled=subsampled,
        samples_from=4, subsets=1, generated_tokens=tokens, prompt_tokens=0.0, reward_calls=0.0, wall_time=1.0,
    )


@pytest.fixture
def db(tmp_path: Path) -> Path:
    path = tmp_path / "r.sqlite"
    rows = [
        # pf at budget 4: p1 right on both seeds, p2 on one of two, p3 on neither -> (1 + 0.5 + 0) / 3.
        stored_row("p1", "pf", 4, 0, 1.0, True, 100), stored_row("p1", "pf", 4, 1, 1.0, True, 120),
        stored_row("p2", "pf", 4, 0, 1.0, True, 80), stored_row("p2", "pf", 4, 1, 0.0, False, 100),
        stored_row("p3", "pf", 4, 0, 0.0, False, 90), stored_row("p3", "pf", 4, 1, 0.0, False, 110),
        # bon at budget 2, subsampled: expected accuracies differ from the first-b grades.
        stored_row("p1", "bon", 2, 0, 0.75, False, 50, True), stored_row("p2", "bon", 2, 0, 0.25, True, 50, True),
        stored_row("p3", "bon", 2, 0, 0.5, True, 50, True),
    ]
    with ResultStore(path) as store:
        store.ensure_config("cfg", "gsm8k", "toy", "arith", {"model": {"spec": "toy"}})
        run = store.start_run("cfg", {"argv": ["/venv/bin/piscale", "eval", "--dataset", "gsm8k"], "platform": "Linux",
                                      "cpus": 2, "versions": {"piscale": "0.1.0", "torch": None}})
        for r in rows:
            store.save_search("cfg", run, r.key, {"stub": r.key}, lambda result, r=r: [r])
    return path


def test_summary_averages_seeds_then_problems(db: Path) -> None:
    (group,) = summarize(db)
    pf = group.cell("pf", 4)
    assert pf.accuracy == pytest.approx(0.5)
    assert (pf.low, pf.high) == pytest.approx(wilson_interval(0.5, 3))
    assert (pf.problems, pf.seeds, pf.rows) == (3, 2, 6)
    assert pf.generated_tokens == pytest.approx(100.0)
    assert not pf.subsampled
    bon = group.cell("bon", 2)
    assert bon.accuracy == pytest.approx(0.5) and bon.subsampled
    (first,) = summarize(db, estimator="first")
    assert first.cell("bon", 2).accuracy == pytest.approx(2 / 3)
    assert group.algorithms == ["pf", "bon"] and group.budgets == [2, 4]


def test_markdown_table_and_notes(db: Path) -> None:
    text = markdown(summarize(db))
    lines = text.splitlines()
    assert "| algorithm | 2 | 4 |" in lines
    low, high = wilson_interval(0.5, 3)
    assert f"| pf | – | 50.0 [{100 * low:.1f}, {100 * high:.1f}] |" in lines
    assert f"| bon | 50.0* [{100 * low:.1f}, {100 * high:.1f}] | – |" in lines
    assert "| pf | – | 100 |" in lines  # tokens per problem
    assert "Wilson score intervals" in text and "C(N, b) subsets" in text
    assert "Cells differ in problems x seeds" in text
    assert "Made by `piscale eval --dataset gsm8k` (1 run, 9 searches, 0:00:00 of running) on Linux, 2 CPUs; piscale 0.1.0." in text


def test_provenance_names_each_distinct_command_of_a_resumed_grid(db: Path) -> None:
    with ResultStore(db) as store:
        run = store.start_run("cfg", {"argv": ["/venv/bin/piscale", "eval", "--dataset", "gsm8k", "--limit", "5"],
                                      "platform": "Linux", "cpus": 2, "versions": {"piscale": "0.2.0"}})
        row = stored_row("p4", "pf", 4, 0, 1.0, True, 100)
        store.save_search("cfg", run, row.key, {"stub": row.key}, lambda result: [row])
        again = store.start_run("cfg", {"argv": ["/venv/bin/piscale", "eval", "--dataset", "gsm8k"],
                                        "platform": "Linux", "cpus": 2, "versions": {"piscale": "0.1.0"}})
        row = stored_row("p5", "pf", 4, 0, 1.0, True, 100)
        store.save_search("cfg", again, row.key, {"stub": row.key}, lambda result: [row])
    text = markdown(summarize(db))
    assert (
        "Made by `piscale eval --dataset gsm8k`, then `piscale eval --dataset gsm8k --limit 5` (3 runs, 11 searches"
        in text
    )
    assert "piscale 0.1.0 (in the first run; later runs had other versions)." in text


def test_plots_are_written_as_png_and_svg(db: Path, tmp_path: Path) -> None:
    files = write_plots(summarize(db), tmp_path / "plots")
    assert sorted(p.name.split("-accuracy-vs-")[1] for p in files) == ["budget.png", "budget.svg", "tokens.png", "tokens.svg"]
    for path in files:
        data = path.read_bytes()
        assert data.startswith(b"\x89PNG") if path.suffix == ".png" else b"<svg" in data[:2000]
    again = write_plots(summarize(db), tmp_path / "again")
    assert [p.read_bytes() for p in again] == [p.read_bytes() for p in files]  # reproducible, byte for byte


def test_report_command(db: Path, tmp_path: Path) -> None:
    import typer

    from piscale.cli.eval import register

    app = typer.Typer()
    register(app)
    out = tmp_path / "out"
    result = CliRunner().invoke(app, ["report", str(db), "--out", str(out), "--markdown"])
    assert result.exit_code == 0, result.output
    assert "| pf | – | 50.0 [" in result.output
    assert (out / "report.md").read_text().startswith("### gsm8k")
    payload = json.loads((out / "report.json").read_text())
    assert {(c["algorithm"], c["budget"]) for c in payload["groups"][0]["cells"]} == {("pf", 4), ("bon", 2)}
    assert len(list(out.glob("*.svg"))) == 2
    missing = CliRunner().invoke(app, ["report", str(tmp_path / "nope.sqlite")])
    assert missing.exit_code == 2 and "no results database" in missing.output


def test_report_restricted_to_chosen_problems(db: Path, tmp_path: Path) -> None:
    import typer

    from piscale.cli.eval import register

    (group,) = summarize(db, problems=["p2", "p3"])
    # pf on p2 (1 of 2 seeds) and p3 (none): 0.25; bon's expected accuracies 0.25 and 0.5.
    assert group.cell("pf", 4).accuracy == pytest.approx(0.25) and group.cell("pf", 4).problems == 2
    assert group.cell("bon", 2).accuracy == pytest.approx(0.375)
    assert group.chosen == 2 and "Restricted to 2 chosen problem(s)" in markdown([group])
    with pytest.raises(ValueError, match=r"no results for problem id\(s\) 'p7', 'p9'$"):
        summarize(db, problems=["p1", "p9", "p7"])

    app = typer.Typer()
    register(app)
    ids = tmp_path / "ids.txt"
    ids.write_text("# the hard ones\np3\n\n")
    result = CliRunner().invoke(app, ["report", str(db), "--out", str(tmp_path / "o"), "--markdown", "--problems", f"@{ids}"])
    assert result.exit_code == 0, result.output
    assert "| pf | – | 0.0 [" in result.output
    typo = CliRunner().invoke(app, ["report", str(db), "--no-plots", "--problems", "p1,px"])
    assert typo.exit_code == 2 and "no results for problem id(s) 'px'" in typo.output
    unreadable = CliRunner().invoke(app, ["report", str(db), "--problems", f"@{tmp_path / 'none.txt'}"])
    assert unreadable.exit_code == 2 and "cannot read" in unreadable.output


def test_paired_difference_known_values() -> None:
    from piscale.eval.stats import paired_difference

    # differences 1, 0, 0, -1, 1: mean 0.2, sample sd sqrt(0.7), se sqrt(0.7 / 5)
    mean, low, high = paired_difference([1, 1, 0, 0, 1], [0, 1, 0, 1, 0])
    half = 1.959963984540054 * (0.7 / 5) ** 0.5
    assert (mean, low, high) == pytest.approx((0.2, 0.2 - half, 0.2 + half))
    assert paired_difference([0.5, 0.5], [0.5, 0.5]) == (0.0, 0.0, 0.0)
    with pytest.raises(ValueError, match="same, non-zero number"):
        paired_difference([1.0], [])


def test_comparisons_pair_problems_and_common_problems_drop_partial_ones(tmp_path: Path) -> None:
    path = tmp_path / "partial.sqlite"
    rows = [
        # pf and bon at budget 2 on p1..p3; dvts reached only p1 and p2
        stored_row("p1", "pf", 2, 0, 1.0, True, 10), stored_row("p2", "pf", 2, 0, 1.0, True, 10),
        stored_row("p3", "pf", 2, 0, 0.0, False, 10),
        stored_row("p1", "bon", 2, 0, 0.5, True, 10), stored_row("p2", "bon", 2, 0, 0.0, False, 10),
        stored_row("p3", "bon", 2, 0, 0.0, False, 10),
        stored_row("p1", "dvts", 2, 0, 0.0, False, 10), stored_row("p2", "dvts", 2, 0, 1.0, True, 10),
    ]
    with ResultStore(path) as store:
        store.ensure_config("cfg", "gsm8k", "toy", "arith", {"model": {"spec": "toy"}})
        run = store.start_run("cfg", {})
        for r in rows:
            store.save_search("cfg", run, r.key, {"stub": r.key}, lambda result, r=r: [r])
    (common,) = summarize(path)
    assert common.left_out == 1 and {c.problems for c in common.cells} == {2}
    assert common.cell("pf", 2).accuracy == 1.0 and common.cell("bon", 2).accuracy == 0.25
    versus_bon = common.comparison("bon", 2)
    assert (versus_bon.problems, versus_bon.difference) == (2, pytest.approx(0.75))
    assert common.comparison("dvts", 2).difference == pytest.approx(0.5)
    assert "1 problem(s) that some cells lack are left out" in markdown([common])
    (everything,) = summarize(path, common=False)
    assert everything.left_out == 0 and everything.cell("pf", 2).accuracy == pytest.approx(2 / 3)
    assert everything.comparison("bon", 2).problems == 3 and everything.comparison("dvts", 2).problems == 2
    (versus_bon_reference,) = summarize(path, reference="bon")
    assert versus_bon_reference.comparison("pf", 2).difference == pytest.approx(-0.75)
    # The terminal report shows the same paired table as the Markdown one.
    from rich.console import Console

    from piscale.eval.render import print_report

    console = Console(record=True, width=200)
    print_report([common], console=console)
    shown = console.export_text()
    assert "versus" in shown and "+75.0 [" in shown and "+50.0 [" in shown


def test_report_counts_searches_whose_largest_weight_was_tied_across_answers(tmp_path: Path, db: Path) -> None:
    path = tmp_path / "ties.sqlite"
    populations = {
        "p1": (["1", "2"], [0.0, 0.0]),  # tied between different answers: the pick was arbitrary
        "p2": (["1", "1.0"], [0.0, 0.0]),  # tied, but every pick gives the same answer
        "p3": (["3", "2"], [1.0, 0.0]),  # the reward decided (and no candidate is right)
    }
    with ResultStore(path) as store:
        store.ensure_config("cfg", "gsm8k", "toy", "arith", {"model": {"spec": "toy"}})
        run = store.start_run("cfg", {})
        for problem, (answers, log_weights) in populations.items():
            for selection in ("max-weight", "weighted-vote"):
                variant = "" if selection == "max-weight" else "selection=weighted-vote"
                row = stored_row(problem, "pf", 2, 0, 1.0, True, 10)
                row = dataclasses.replace(row, variant=variant)
                result = {"algorithm": "pf", "settings": {"selection": selection},
                          "candidates": [{"answer": a, "log_weight": w} for a, w in zip(answers, log_weights)]}
                store.save_search("cfg", run, row.key, result, lambda r, row=row: [row])
    (group,) = summarize(path)
    assert group.tied == {("pf", 2): (1, 3)}  # the weighted-vote searches are not counted
    assert "an arbitrary pick (pf at budget 2: 1 of 3)" in markdown([group])
    # What the final candidates hold, one row per stored search cell (the
    # reference is "1"; "1.0" is the same answer, so p2 has one distinct answer)
    from piscale.eval.summary import Population

    assert group.populations == [
        Population("pf", 2, 3, distinct_answers=pytest.approx(5 / 3), covered=pytest.approx(2 / 3),
                   tied=pytest.approx(1 / 3)),
        Population("pf[selection=weighted-vote]", 2, 3, distinct_answers=pytest.approx(5 / 3),
                   covered=pytest.approx(2 / 3), tied=pytest.approx(1 / 3)),
    ]
    assert "| pf | 2 | 3 | 1.7 | 67% | 33% |" in markdown([group])
    assert "arbitrary pick" not in markdown(summarize(db))  # stored rows whose searches hold no population


@pytest.mark.parametrize(
    ("algorithm", "options"), [("pf", {}), ("pg", {"iterations": 2}), ("pt", {"iterations": 2, "chains": 2})]
)
def test_answers_re_chosen_from_a_stored_population_equal_a_run_with_that_rule(algorithm: str, options: dict) -> None:
    import asyncio

    from piscale.eval.grade import answer_by_selection
    from piscale.lm.toy import ToyLM
    from piscale.search import run
    from test_search import QUESTION, BoxReward

    differ = 0
    for seed in range(8):
        results = {
            rule: asyncio.run(run(ToyLM(), BoxReward(), QUESTION, algorithm, 16, seed, selection=rule, **options))
            for rule in ("max-weight", "weighted-vote")
        }
        for rule, result in results.items():
            other = "weighted-vote" if rule == "max-weight" else "max-weight"
            assert answer_by_selection(result.to_dict(), other) == results[other].answer
            assert answer_by_selection(result.to_dict(), rule) == result.answer
        differ += results["max-weight"].answer != results["weighted-vote"].answer
    assert differ > 0  # the two rules disagree on some seeds, so the check above has teeth


def test_report_adds_the_other_selection_rule_for_stored_particle_searches(tmp_path: Path) -> None:
    import asyncio

    from piscale.eval.grade import rows_from_result
    from piscale.lm.toy import ToyLM
    from piscale.search import run
    from test_search import QUESTION, BoxReward

    def search(seed: int, **options):
        return asyncio.run(run(ToyLM(), BoxReward(), QUESTION, "pf", 8, seed, max_tokens=64, **options))

    # Each problem's reference is the answer the weighted vote gives, so the
    # re-chosen cell must score 100%, and the heaviest particles must not.
    searches = {f"q{seed}": search(seed) for seed in range(6)}
    references = {p: search(int(p[1:]), selection="weighted-vote").answer for p in searches}
    assert any(searches[p].answer != references[p] for p in searches)
    path = tmp_path / "pf.sqlite"
    with ResultStore(path) as store:
        store.ensure_config("cfg", "toy", "toy", "box", {})
        run_id = store.start_run("cfg", {})
        for problem, result in searches.items():
            store.save_search(
                "cfg", run_id, (problem, "pf", "max_tokens=64", 8, 0), result.to_dict(),
                lambda r, p=problem: rows_from_result(r, p, references[p], [8], variant="max_tokens=64"),
            )
    (group,) = summarize(path)
    assert group.algorithms == ["pf[max_tokens=64]", "pf[max_tokens=64,selection=weighted-vote]"]
    voted, heaviest = group.cell(group.algorithms[1], 8), group.cell(group.algorithms[0], 8)
    assert (voted.derived, heaviest.derived) == ("re-chosen", "")
    assert voted.accuracy == 1.0 and heaviest.accuracy < 1.0
    assert voted.generated_tokens == heaviest.generated_tokens
    assert group.references == group.algorithms  # each pf variant is compared with the other
    assert group.comparison(group.algorithms[0], 8, reference=group.algorithms[1]).difference == pytest.approx(
        1.0 - heaviest.accuracy
    )
    assert "100.0† [" in markdown([group]) and "† Re-chosen" in markdown([group])
    # Tables name the options every row shares once, and keep the ones that differ.
    assert group.shared_options == {"max_tokens": "64"}
    assert [group.short_label(a) for a in group.algorithms] == ["pf", "pf[selection=weighted-vote]"]
    text = markdown([group])
    assert "| pf[selection=weighted-vote] | " in text and "| pf | " in text and "[max_tokens=64" not in text
    assert "Every algorithm ran with max_tokens=64." in text
    # On the terminal too: rich would read "[selection=weighted-vote]" as a markup tag and drop it.
    from rich.console import Console

    from piscale.eval.render import print_report

    console = Console(record=True, width=200)
    print_report([group], console=console)
    shown = console.export_text()
    assert "pf[selection=weighted-vote] minus" in shown
    assert "│ pf[selection=weighted-vote] │" in shown
    (plain,) = summarize(path, derived=False)
    assert plain.algorithms == ["pf[max_tokens=64]"]


def test_reports_leave_the_database_file_untouched(db: Path, tmp_path: Path) -> None:
    import hashlib
    import sqlite3

    from piscale.eval.store import StoreError

    # A snapshot as experiments/snapshot.sh writes it: one file, rollback journal.
    connection = sqlite3.connect(db)
    connection.execute("PRAGMA journal_mode = DELETE")
    connection.close()
    before = hashlib.sha256(db.read_bytes()).hexdigest()
    (group,) = summarize(db)
    assert group.cell("pf", 4).accuracy == pytest.approx(0.5)
    assert hashlib.sha256(db.read_bytes()).hexdigest() == before
    assert sorted(p.name for p in db.parent.iterdir() if p.name.startswith(db.name)) == [db.name]
    other = tmp_path / "other.sqlite"
    sqlite3.connect(other).execute("CREATE TABLE t (x)").connection.close()
    with pytest.raises(StoreError, match="not a piscale results database"):
        summarize(other)
