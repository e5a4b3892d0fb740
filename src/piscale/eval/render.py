"""Report groups as text: the tables of one configuration, their notes on
method and provenance, and the report as Markdown, as rich tables on the
terminal and as JSON."""

from __future__ import annotations

import datetime
import json
import shlex
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

from piscale.eval.summary import PASS_AT, RECHOSEN, Cell, Comparison, Group, label_options

INTERVAL_NOTE = (
    "Intervals: 95% Wilson score intervals over problems (each problem's accuracy is first averaged over "
    "its seeds; n = number of problems)."
)

SUBSAMPLING_NOTE = (
    "Best-of-N (bon), weighted best-of-N (wbon) and self-consistency (sc) ran once per problem and seed at "
    "the largest budget N, from one shared set of N samples (they differ only in how they pick one); a "
    "smaller budget b reuses those N samples. Its accuracy is the mean correctness "
    "of the selection over all C(N, b) subsets of b samples (or over 2,000 uniformly random subsets when "
    "there are more than 5,000), ties split evenly; this has the same expectation as a fresh run at budget "
    "b with a smaller variance. The answer stored for budget b is the one picked from the first b samples "
    "(search-and-learn's estimate); its tokens and wall time are the run's, scaled by b / N."
)

RESELECTION_NOTE = (
    "Re-chosen. Particle filtering (and particle Gibbs, parallel tempering) picks its answer from the final "
    "particles after the last step: the heaviest particle (selection=max-weight) or the answer with the most "
    "total weight (selection=weighted-vote). These cells apply the other rule to the final particles of the "
    "stored searches, which is exactly what those searches return with that option; they cost no extra tokens "
    "and pair with the stored cells problem by problem."
)

PASS_AT_NOTE = (
    "pass@n: the share of problems where a correct answer is among b samples, averaged over all b-subsets of "
    "best-of-N's N samples (1 - C(N - k, b) / C(N, b) with k correct). It is what a reward that always picks a "
    "correct sample would score: a bound for best-of-N, weighted best-of-N and self-consistency, not an algorithm."
)

DERIVED_MARKS = {RECHOSEN: "†", PASS_AT: "‡"}


def _accuracy_text(cell: Cell | None) -> str:
    if cell is None:
        return "–"
    mark = ("*" if cell.subsampled else "") + DERIVED_MARKS.get(cell.derived, "")
    return f"{100 * cell.accuracy:.1f}{mark} [{100 * cell.low:.1f}, {100 * cell.high:.1f}]"


def _comparison_text(comparison: Comparison | None) -> str:
    if comparison is None:
        return "–"
    c = comparison
    return f"{100 * c.difference:+.1f} [{100 * c.low:+.1f}, {100 * c.high:+.1f}]"


def _tokens_text(cell: Cell | None) -> str:
    return "–" if cell is None else f"{cell.generated_tokens:,.0f}"


def _counts_note(group: Group) -> str:
    counts = {(c.problems, c.seeds) for c in group.cells}
    if len(counts) == 1:
        problems, seeds = counts.pop()
        note = f"Every cell: {problems} problems x {seeds} seeds."
    else:
        note = "Cells differ in problems x seeds (a run is incomplete): " + ", ".join(
            f"{c.algorithm}@{c.budget}: {c.problems}x{c.seeds}" for c in group.cells
        ) + "."
    if group.shared_options:
        from piscale.eval.grid import variant_label

        note += f" Every algorithm ran with {variant_label(group.shared_options).replace(',', ', ')}."
    if group.tied:
        cells = "; ".join(f"{group.short_label(a)} at budget {b}: {t} of {n}" for (a, b), (t, n) in group.tied.items())
        note += (
            " The largest final weight was shared by particles with different answers in some searches, so the "
            f"largest-weight rule took the first of them, an arbitrary pick ({cells}); the weighted vote uses them all."
        )
    if group.chosen is not None:
        note += f" Restricted to {group.chosen} chosen problem(s) (--problems)."
    if group.left_out:
        note += (
            f" {group.left_out} problem(s) that some cells lack are left out of every cell "
            "(see all stored problems with --all-problems)."
        )
    if group.failures:
        first = group.failures[0]
        note += (
            f" {len(group.failures)} search(es) failed and are missing; the first: {first['algorithm']} at budget "
            f"{first['budget']}, seed {first['seed']}, problem {first['problem_id']}: {first['error']}"
        )
    return note


Table = tuple[str, list[str], list[list[str]]]
"""A title, the column headers and the rows, as text."""


def tables(group: Group) -> list[Table]:
    """The tables of one configuration: accuracy and tokens (algorithm x
    budget), then each reference algorithm minus the others, paired."""
    budgets = group.budgets
    by_budget = ["algorithm", *map(str, budgets)]
    name = group.short_label
    found = [
        ("Accuracy % [95% CI] by budget", by_budget,
         [[name(a), *(_accuracy_text(group.cell(a, b)) for b in budgets)] for a in group.algorithms]),
        ("Generated tokens per problem by budget", by_budget,
         [[name(a), *(_tokens_text(group.cell(a, b)) for b in budgets)] for a in group.algorithms]),
    ]
    for reference in group.references:
        mine = [c for c in group.comparisons if c.reference == reference]
        shown = [b for b in budgets if any(c.budget == b for c in mine)]
        others = list(dict.fromkeys(c.other for c in mine))
        found.append((
            f"{name(reference)} minus each other algorithm at equal budget, percentage points "
            "[95% CI, paired over problems]",
            ["versus", *map(str, shown)],
            [[name(other), *(_comparison_text(group.comparison(other, b, reference)) for b in shown)]
             for other in others],
        ))
    if group.populations:
        found.append((
            "Final candidates of the stored searches: distinct answers (mean), searches with a correct one "
            "among them (what a perfect final choice would reach), and searches whose largest weight or score "
            "was shared by different answers",
            ["algorithm", "budget", "searches", "distinct answers", "a correct one among them",
             "largest weight tied across answers"],
            [[_population_label(group, p.algorithm), str(p.budget), str(p.searches), f"{p.distinct_answers:.1f}",
              f"{100 * p.covered:.0f}%", "–" if p.tied is None else f"{100 * p.tied:.0f}%"]
             for p in group.populations],
        ))
    return found


def _population_label(group: Group, algorithm: str) -> str:
    """Best-of-N's samples are also those weighted best-of-N and
    self-consistency chose from: say so where they are in the table."""
    name = label_options(algorithm)[0]
    label = group.short_label(algorithm)
    if name != "bon":
        return label
    sharing = [a for a in ("wbon", "sc") if any(label_options(c)[0] == a for c in group.algorithms)]
    return f"{label} (the samples {', '.join(sharing)} also chose from)" if sharing else label


def markdown(groups: Sequence[Group], *, estimator: str = "expected") -> str:
    """The report as Markdown: per configuration, its ``tables`` and how they
    were made, then the notes on method."""
    lines: list[str] = []
    for group in groups:
        lines += [f"### {group.title}"]
        for title, header, rows in tables(group):
            lines += ["", f"{title}:", "", "| " + " | ".join(header) + " |", "|---|" + "---|" * (len(header) - 1)]
            lines += ["| " + " | ".join(row) + " |" for row in rows]
        lines += ["", _counts_note(group), ""]
        if group.runs:
            lines += [_provenance(group), ""]
    lines += [_method_note(groups, estimator), ""]
    return "\n".join(lines)


def _provenance(group: Group) -> str:
    """How the numbers were made: the commands (each distinct one, in the
    order first run: a resumed grid may have been run with another limit),
    the machine, the versions and the time the runs spent (each from its
    start to its last stored search)."""
    first = group.runs[0]
    commands = list(dict.fromkeys(
        "piscale " + shlex.join(run["argv"][1:]) if run.get("argv") else "unknown" for run in group.runs
    ))
    seconds = sum(max(run["last_search_at"] - run["started_at"], 0.0) for run in group.runs)
    searches = sum(run["searches"] for run in group.runs)
    versions = first.get("versions") or {}
    shown = ", ".join(f"{name} {versions[name]}" for name in ("piscale", "torch", "transformers", "llama-cpp-python")
                      if versions.get(name))
    if any((run.get("versions") or {}) != versions for run in group.runs):
        shown += " (in the first run; later runs had other versions)"
    machine = f"{first.get('platform', 'unknown platform')}, {first.get('cpus', '?')} CPUs"
    if first.get("device"):
        machine += f", device {first['device']}"
    return (
        "Made by " + ", then ".join(f"`{c}`" for c in commands)
        + f" ({len(group.runs)} run{'s' if len(group.runs) > 1 else ''}, {searches} searches, "
        f"{datetime.timedelta(seconds=round(seconds))} of running) on {machine}; {shown}."
    )


def _method_note(groups: Sequence[Group], estimator: str) -> str:
    notes = [INTERVAL_NOTE]
    if any(c.subsampled for g in groups for c in g.cells):
        notes.append("* subsampled. " + SUBSAMPLING_NOTE)
        if estimator == "first":
            notes.append("This report scores subsampled cells by the first-b answer, not the subset mean.")
    kinds = {c.derived for g in groups for c in g.cells}
    for kind, note in ((RECHOSEN, RESELECTION_NOTE), (PASS_AT, PASS_AT_NOTE)):
        if kind in kinds:
            notes.append(f"{DERIVED_MARKS[kind]} {note}")
    return "\n\n".join(notes)


def print_report(groups: Sequence[Group], *, estimator: str = "expected", console=None) -> None:
    """The report as rich tables on the terminal."""
    from rich.console import Console
    from rich.table import Table as RichTable
    from rich.text import Text

    # Every string as Text: labels such as "pf[max_tokens=512]" read as markup
    # tags otherwise, and rich would drop them.
    console = console or Console()
    for group in groups:
        for title, header, rows in tables(group):
            table = RichTable(title=Text(f"{group.title}\n{title}"), title_justify="left")
            table.add_column(Text(header[0]), no_wrap=True)
            for column in header[1:]:
                table.add_column(Text(column), justify="right")
            for row in rows:
                table.add_row(*map(Text, row))
            console.print(table)
        console.print(Text(_counts_note(group)))
    console.print(Text(_method_note(groups, estimator)))


def write_json(groups: Sequence[Group], path: str | Path, *, estimator: str = "expected") -> Path:
    payload = {
        "estimator": estimator,
        "interval": INTERVAL_NOTE,
        "subsampling": SUBSAMPLING_NOTE,
        RECHOSEN: RESELECTION_NOTE,
        PASS_AT: PASS_AT_NOTE,
        "groups": [
            {
                "config_key": g.config_key,
                "dataset": g.dataset,
                "model": g.model,
                "reward": g.reward,
                "description": g.description,
                "cells": [asdict(c) for c in g.cells],
                "comparisons": [asdict(c) for c in g.comparisons],
                "problems_left_out": g.left_out,
                "problems_chosen": g.chosen,
                "failures": g.failures,
                "final_candidates": [asdict(p) for p in g.populations],
            }
            for g in groups
        ],
    }
    path = Path(path)
    path.write_text(json.dumps(payload, indent=2) + "\n")
    return path
