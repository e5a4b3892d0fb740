"""Accuracy-versus-compute reports from a results database.

For every configuration (dataset, model, reward, prompts) in the database,
the report gives, per algorithm (with its search options, if any) and budget:

* accuracy: each problem's score averaged over its seeds, then averaged over
  problems; with a 95% Wilson score interval that treats problems as the
  independent units (n = number of problems). A score in [0, 1] with mean p
  has variance at most p(1 - p), the Bernoulli variance the Wilson interval
  assumes, so averaging seeds or subsets within a problem can only make the
  true variance smaller than the one the interval allows for;
* generated tokens per problem (mean over problems and seeds);
* the number of problems and seeds behind the cell, and the searches that
  failed and are missing;
* paired differences at equal budget between a reference algorithm (``pf``
  by default) and each other one: the mean over problems of the difference
  in their scores, with a 95% normal interval from the spread of the
  per-problem differences. Pairing by problem removes the variation between
  problems that separate intervals carry, so it tells two algorithms apart
  on far fewer problems;

a table of what the stored searches ended with (their final candidates:
distinct answers, whether a correct one is among them, whether the largest
weight was shared by different answers; :class:`Population`), and plots of
accuracy against budget and against generated tokens, one line per
algorithm, with the interval as a band (PNG and SVG).

Two kinds of rows are derived from the stored searches, at no generation
cost (``derived=True``), and marked in the tables:

* re-chosen (†): particle filtering, particle Gibbs and parallel tempering
  choose their answer from the final population after the last step, by the
  heaviest particle (``selection=max-weight``, the default) or by a weighted
  vote over answers. Every stored search of theirs therefore also gives the
  answer of the other rule, exactly as a search with that option would have
  (same seed, same particles). These rows go under the variant with that
  option, unless the database stores that variant itself
  (:data:`RESELECTION_NOTE`);
* ``pass@n`` (‡): the share of the best-of-N samples' b-subsets that hold a
  correct answer, what a perfect reward would reach from them
  (:data:`PASS_AT_NOTE`). It is an upper bound for the selections, not an
  algorithm, and is left out of the paired comparisons.

By default only the problems present in every cell of a configuration are
counted (``common=True``), so all cells, and the pairs, compare the same
problems while a run is still filling its grid.

The score of a row is ``expected_accuracy`` by default. For algorithms that
run at each budget it is the 0/1 grade; for the subsampled baselines
(``bon``, ``wbon``, ``sc``) it is the mean over subsets described in
:data:`SUBSAMPLING_NOTE`. ``estimator="first"`` uses instead the grade of the
answer picked from the first b samples, search-and-learn's estimate.
"""

from __future__ import annotations

import datetime
import json
import math
import re
import shlex
from collections import defaultdict
from collections.abc import Collection, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from piscale.eval.grade import SUBSAMPLED_ALGORITHMS, answer_by_selection, final_population, grade, samples_of
from piscale.eval.store import ResultStore
from piscale.eval.subsample import pass_at
from piscale.search.settings import SELECTIONS as SELECTION_RULES

Z_95 = 1.959963984540054
"""The 0.975 quantile of the standard normal distribution."""

ESTIMATORS = ("expected", "first")

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

PASS_AT = "pass@n"
"""The algorithm name of the derived pass@b rows."""

RECHOSEN = "re-chosen"

DERIVED_MARKS = {RECHOSEN: "†", PASS_AT: "‡"}


def wilson_interval(mean: float, n: int, z: float = Z_95) -> tuple[float, float]:
    """The Wilson score interval of a proportion ``mean`` observed over ``n`` trials."""
    if n < 1:
        raise ValueError(f"an interval needs at least one observation, got n={n}")
    if not 0.0 <= mean <= 1.0:
        raise ValueError(f"a proportion must be in [0, 1], got {mean}")
    z2 = z * z
    centre = (mean + z2 / (2 * n)) / (1 + z2 / n)
    half = z / (1 + z2 / n) * math.sqrt(mean * (1 - mean) / n + z2 / (4 * n * n))
    return max(0.0, centre - half), min(1.0, centre + half)


@dataclass(frozen=True)
class Cell:
    algorithm: str
    """The algorithm, with its search options in brackets when it had any."""
    budget: int
    accuracy: float
    low: float
    high: float
    problems: int
    seeds: int
    rows: int
    generated_tokens: float
    """Mean generated tokens per problem and seed."""
    wall_time: float
    """Mean wall time per problem and seed, in seconds."""
    subsampled: bool
    derived: str = ""
    """How the cell was computed from stored searches instead of run:
    ``re-chosen`` or ``pass@n`` (see the module doc); "" when it ran."""


@dataclass(frozen=True)
class Comparison:
    """``reference`` minus ``other`` at one budget, paired over problems
    (both are algorithm labels, with their options)."""

    reference: str
    other: str
    budget: int
    difference: float
    low: float
    high: float
    problems: int


def paired_difference(reference: Sequence[float], other: Sequence[float], z: float = Z_95) -> tuple[float, float, float]:
    """Mean of ``reference[i] - other[i]`` and its normal 95% interval
    (z times the standard error of the mean difference)."""
    if len(reference) != len(other) or not reference:
        raise ValueError("paired scores need the same, non-zero number of problems on both sides")
    differences = [a - b for a, b in zip(reference, other)]
    n = len(differences)
    mean = sum(differences) / n
    variance = sum((d - mean) ** 2 for d in differences) / (n - 1) if n > 1 else 0.0
    half = z * math.sqrt(variance / n)
    return mean, mean - half, mean + half


@dataclass(frozen=True)
class Population:
    """The final candidates of the stored searches of one algorithm and
    budget (best-of-N's samples, the particles of a particle filter, the kept
    answers of a tree search), over the problems the table uses."""

    algorithm: str
    budget: int
    searches: int
    distinct_answers: float
    """mean number of distinct final answers (equivalent answers pooled)."""
    covered: float
    """share of searches with a correct answer among the candidates: what a
    perfect final choice would reach."""
    tied: float | None
    """share of searches, among those with two or more candidates, whose
    largest weight (or score) was shared by different answers."""


@dataclass
class Group:
    """All cells of one configuration."""

    config_key: str
    dataset: str
    model: str
    reward: str
    description: dict
    cells: list[Cell] = field(default_factory=list)
    failures: list[dict] = field(default_factory=list)
    """Searches that failed and have not succeeded since: their cells are
    missing from the table."""
    runs: list[dict] = field(default_factory=list)
    """The invocations that stored searches: command, machine, versions,
    start, last stored search and count."""
    comparisons: list[Comparison] = field(default_factory=list)
    """The reference algorithm against each other one, at each shared budget."""
    left_out: int = 0
    """Problems left out because some cell lacks them (``common=True``)."""
    chosen: int | None = None
    """With ``problems=``: how many of the chosen problems this
    configuration has results for (None when not restricted)."""
    tied: dict[tuple[str, int], tuple[int, int]] = field(default_factory=dict)
    """(algorithm, budget) -> (searches whose largest final weight was shared
    by different answers, searches) for the largest-weight rule's cells
    with at least one such search."""
    populations: list[Population] = field(default_factory=list)
    """What the final candidates of the stored searches hold, per search cell."""

    @property
    def algorithms(self) -> list[str]:
        return list(dict.fromkeys(c.algorithm for c in self.cells))

    @property
    def budgets(self) -> list[int]:
        return sorted({c.budget for c in self.cells})

    def cell(self, algorithm: str, budget: int) -> Cell | None:
        return next((c for c in self.cells if c.algorithm == algorithm and c.budget == budget), None)

    @property
    def references(self) -> list[str]:
        """The algorithms compared with the others, in table order."""
        compared = {c.reference for c in self.comparisons}
        return [a for a in self.algorithms if a in compared]

    def comparison(self, other: str, budget: int, reference: str | None = None) -> Comparison | None:
        """``reference`` (by default the first compared) minus ``other`` at ``budget``."""
        reference = reference or next(iter(self.references), None)
        return next(
            (c for c in self.comparisons if (c.reference, c.other, c.budget) == (reference, other, budget)), None
        )

    @property
    def shared_options(self) -> dict[str, str]:
        """The options every algorithm of the table ran with (``max_tokens=512``
        for a whole grid, say): said once, under the table, not on every row."""
        options = [_label_options(a)[1] for a in self.algorithms]
        if not options:
            return {}
        return {k: v for k, v in options[0].items() if all(other.get(k) == v for other in options[1:])}

    def short_label(self, algorithm: str) -> str:
        """``algorithm`` without the options that every algorithm shares."""
        from piscale.eval.runner import variant_label

        name, options = _label_options(algorithm)
        shared = self.shared_options
        kept = {k: v for k, v in options.items() if shared.get(k) != v}
        return f"{name}[{variant_label(kept)}]" if kept else name

    @property
    def title(self) -> str:
        return f"{self.dataset} · model {self.model} · reward {self.reward} · config {self.config_key}"

    @property
    def slug(self) -> str:
        safe = "".join(ch if ch.isalnum() or ch in "-." else "-" for ch in f"{self.dataset}-{self.model}")
        return f"{safe}-{self.config_key[:8]}"


def summarize(
    db: str | Path,
    *,
    estimator: str = "expected",
    common: bool = True,
    reference: str = "pf",
    derived: bool = True,
    problems: Collection[str] | None = None,
) -> list[Group]:
    """One group per configuration in the database, cells sorted by algorithm
    (in the order first stored) and budget. ``problems`` restricts it to
    those problem ids (each must be in the database: a typo must not shrink
    a table unnoticed); ``common`` keeps only the
    problems every cell has; ``reference`` is the algorithm the others are
    compared with (each of its variants; skipped where a configuration does
    not have it); ``derived`` adds the re-chosen and pass@n rows described
    in the module doc."""
    if estimator not in ESTIMATORS:
        raise ValueError(f"unknown estimator {estimator!r}; choose one of {', '.join(ESTIMATORS)}")
    if not Path(db).is_file():
        raise FileNotFoundError(f"no results database at {db}")
    with ResultStore(db, read_only=True) as store:
        configs = store.configs()
        rows = store.results()
        searches = {s["search_id"]: s for s in store.searches()}
        if problems is not None:
            rows, searches = _only_problems(db, set(problems), rows, searches)
        results = {search_id: store.search(search_id) for search_id in searches}
        populations = _final_populations(results, rows)
        tied = _tied_searches(populations, rows)
        if derived:
            rows += _rows_by_other_selection(populations, rows) + _pass_at_rows(results, rows)
        failures = store.unresolved_failures()
        activity = store.run_activity()
        runs = store.runs()
    by_config: dict[str, list[dict]] = defaultdict(list)
    for row in rows:
        by_config[row["config_key"]].append(row)
    groups = []
    for config in configs:
        config_rows = by_config.get(config["config_key"])
        if not config_rows:
            continue
        group = Group(config["config_key"], config["dataset"], config["model"], config["reward"], config["description"])
        group.failures = [
            f for f in failures
            if f["config_key"] == config["config_key"] and (problems is None or f["problem_id"] in problems)
        ]
        if problems is not None:
            group.chosen = len({r["problem_id"] for r in config_rows})
        group.runs = [
            {**run["info"], "run_id": run["run_id"], "started_at": run["started_at"],
             "last_search_at": activity[run["run_id"]][0], "searches": activity[run["run_id"]][1]}
            for run in runs
            if run["config_key"] == config["config_key"] and run["run_id"] in activity
        ]
        order = list(dict.fromkeys(_label(r) for r in sorted(config_rows, key=lambda r: r["result_id"])))
        order.sort(key=lambda label: label.split("[")[0] == PASS_AT)  # the bound goes last
        cells: dict[tuple[str, int], list[dict]] = defaultdict(list)
        for row in config_rows:
            cells[(_label(row), row["budget"])].append(row)
        if common:
            every = set.intersection(*({r["problem_id"] for r in rows} for rows in cells.values()))
            group.left_out = len({r["problem_id"] for r in config_rows} - every)
            cells = {key: [r for r in rows if r["problem_id"] in every] for key, rows in cells.items()}
            cells = {key: rows for key, rows in cells.items() if rows}
        for (algorithm, budget), cell_rows in sorted(cells.items(), key=lambda kv: (order.index(kv[0][0]), kv[0][1])):
            group.cells.append(_cell(algorithm, budget, cell_rows, estimator))
        group.comparisons = _comparisons(cells, reference, estimator)
        for (algorithm, budget), cell_rows in cells.items():
            flags = [tied[r["search_id"]] for r in cell_rows if r["search_id"] in tied and not r.get("derived")]
            if any(flags):
                group.tied[(algorithm, budget)] = (sum(flags), len(flags))
        used = {r["problem_id"]: r["reference"] for rows in cells.values() for r in rows}
        group.populations = _populations(
            [s for s in searches.values() if s["config_key"] == config["config_key"] and s["problem_id"] in used],
            results, used,
        )
        groups.append(group)
    return groups


def _only_problems(
    db: str | Path, wanted: set[str], rows: list[dict], searches: dict[int, dict]
) -> tuple[list[dict], dict[int, dict]]:
    """The result rows and searches of the ``wanted`` problems; an error
    naming the ids the database has no results for."""
    if not wanted:
        raise ValueError("no problem ids given to restrict the report to")
    missing = sorted(wanted - {r["problem_id"] for r in rows})
    if missing:
        shown = ", ".join(repr(p) for p in missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise ValueError(f"{db} has no results for problem id(s) {shown}")
    return (
        [r for r in rows if r["problem_id"] in wanted],
        {i: s for i, s in searches.items() if s["problem_id"] in wanted},
    )


def _populations(searches: Sequence[dict], results: dict[int, dict], references: dict[str, str]) -> list[Population]:
    """``Population`` rows for ``searches`` (store listings), graded against
    each problem's reference. Searches stored without candidates are skipped."""
    from piscale.search.select import tied_answers

    found: dict[tuple[str, int], list[tuple[int, bool, bool | None]]] = defaultdict(list)
    for search in searches:
        result = results[search["search_id"]]
        answers, log_weights = final_population(result)
        if not answers:
            continue
        # equivalent answers grouped and each group graded once, as for subsampling
        samples = samples_of(result["candidates"], references[search["problem_id"]])
        found[(_label(search), search["budget"])].append((
            len(samples.group_correct),
            bool(samples.group_correct.any()),
            tied_answers(answers, log_weights) if len(answers) > 1 else None,
        ))
    rows = []
    for (algorithm, budget), stats in found.items():
        ties = [t for _, _, t in stats if t is not None]
        rows.append(Population(
            algorithm, budget, len(stats),
            distinct_answers=sum(n for n, _, _ in stats) / len(stats),
            covered=sum(c for _, c, _ in stats) / len(stats),
            tied=sum(ties) / len(ties) if ties else None,
        ))
    return sorted(rows, key=lambda p: (p.algorithm, p.budget))


def _problem_scores(rows: Sequence[dict], estimator: str) -> dict[str, float]:
    """Each problem's score, averaged over its seeds."""
    column = "expected_accuracy" if estimator == "expected" else "correct"
    per_problem: dict[str, list[float]] = defaultdict(list)
    for row in rows:
        per_problem[row["problem_id"]].append(float(row[column]))
    return {problem: sum(v) / len(v) for problem, v in per_problem.items()}


def _comparisons(cells: dict[tuple[str, int], list[dict]], reference: str, estimator: str) -> list[Comparison]:
    found = []
    for (algorithm, budget), rows in cells.items():
        if reference not in (algorithm, algorithm.split("[")[0]):
            continue
        mine = _problem_scores(rows, estimator)
        for (other, other_budget), other_rows in cells.items():
            if other == algorithm or other_budget != budget or other.split("[")[0] == PASS_AT:
                continue
            theirs = _problem_scores(other_rows, estimator)
            shared = sorted(set(mine) & set(theirs))
            if not shared:
                continue
            mean, low, high = paired_difference([mine[p] for p in shared], [theirs[p] for p in shared])
            found.append(Comparison(algorithm, other, budget, mean, low, high, len(shared)))
    return sorted(found, key=lambda c: (c.reference, c.other, c.budget))


def _final_populations(results: dict[int, dict], rows: Sequence[dict]) -> dict[int, dict]:
    """The stored results of the searches that chose their answer from a
    final population by a ``selection`` rule (pf, pg, pt), by search id;
    results this version cannot re-choose from are left out."""
    from piscale.search import ALGORITHMS

    selecting = {name for name, algorithm in ALGORITHMS.items() if "selection" in algorithm.options}
    populations = {}
    for search_id in dict.fromkeys(r["search_id"] for r in rows if r["algorithm"] in selecting):
        result = results[search_id]
        if (result.get("settings") or {}).get("selection") in SELECTION_RULES and result.get("candidates"):
            populations[search_id] = result
    return populations


def _tied_searches(populations: dict[int, dict], rows: Sequence[dict]) -> dict[int, bool]:
    """For each search that chose by the largest weight, whether that weight
    was shared by particles with different answers (see ``tied_answers``)."""
    from piscale.search.select import tied_answers

    tied = {}
    for search_id, result in populations.items():
        if result["settings"]["selection"] == "max-weight":
            tied[search_id] = tied_answers(*final_population(result))
    return tied


def _rows_by_other_selection(populations: dict[int, dict], rows: Sequence[dict]) -> list[dict]:
    """For each stored row of a search in ``populations``, the row that
    search gives under the other rule, unless that variant is stored."""
    from piscale.eval.runner import variant_label

    stored = {(r["config_key"], r["problem_id"], r["algorithm"], r["variant"], r["budget"], r["seed"]) for r in rows}
    derived = []
    for row in rows:
        result = populations.get(row["search_id"])
        if result is None:
            continue
        used = result["settings"]["selection"]
        other = next(rule for rule in SELECTION_RULES if rule != used)
        options = _variant_options(row["variant"])
        variant = variant_label({**options, "selection": other})
        if (row["config_key"], row["problem_id"], row["algorithm"], variant, row["budget"], row["seed"]) in stored:
            continue
        answer = answer_by_selection(result, other)
        correct = grade(answer, row["reference"])
        derived.append({**row, "variant": variant, "answer": answer, "correct": int(correct),
                        "expected_accuracy": float(correct), "derived": RECHOSEN})
    return derived


def _pass_at_rows(results: dict[int, dict], rows: Sequence[dict]) -> list[dict]:
    """pass@b rows for the budgets of each best-of-N style search (one set
    of rows per stored search, whichever of bon, wbon and sc it fed)."""
    # One set of rows per search: those of the first selection seen to come from it.
    by_search: dict[int, list[dict]] = {}
    for row in rows:
        if row["algorithm"] in SUBSAMPLED_ALGORITHMS:
            same = by_search.setdefault(row["search_id"], [row])
            if row is not same[0] and row["algorithm"] == same[0]["algorithm"]:
                same.append(row)
    derived = []
    for search_id, search_rows in by_search.items():
        candidates = results[search_id].get("candidates")
        if not candidates:
            continue  # not a stored sample set this version can read
        samples = samples_of(candidates, search_rows[0]["reference"])
        for row in search_rows:
            derived.append({**row, "algorithm": PASS_AT, "expected_accuracy": pass_at(samples, row["budget"]),
                            "correct": int(samples.correct[: row["budget"]].any()), "answer": None,
                            "derived": PASS_AT})
    return derived


def _variant_options(variant: str) -> dict[str, str]:
    """A variant label back into its options, values kept as the label
    writes them (so that ``variant_label`` reproduces the label)."""
    if not variant:
        return {}
    # Split only at commas that start a new "name=": JSON values may hold commas.
    return dict(part.split("=", 1) for part in re.split(r",(?=[A-Za-z_][A-Za-z0-9_]*=)", variant))


def _label_options(label: str) -> tuple[str, dict[str, str]]:
    """``pf[max_tokens=512,selection=weighted-vote]`` as its name and options."""
    name, bracket, variant = label.partition("[")
    return name, (_variant_options(variant[:-1]) if bracket else {})


def _label(row: dict) -> str:
    """An algorithm's name, with its options when it ran with any: ``pf[resampler=systematic]``."""
    return f"{row['algorithm']}[{row['variant']}]" if row["variant"] else row["algorithm"]


def _cell(algorithm: str, budget: int, rows: Sequence[dict], estimator: str) -> Cell:
    per_problem = _problem_scores(rows, estimator)
    seeds = {row["seed"] for row in rows}
    problem_means = list(per_problem.values())
    accuracy = sum(problem_means) / len(problem_means)
    low, high = wilson_interval(accuracy, len(problem_means))
    return Cell(
        algorithm=algorithm,
        budget=budget,
        accuracy=accuracy,
        low=low,
        high=high,
        problems=len(per_problem),
        seeds=len(seeds),
        rows=len(rows),
        generated_tokens=sum(r["generated_tokens"] for r in rows) / len(rows),
        wall_time=sum(r["wall_time"] for r in rows) / len(rows),
        subsampled=any(r["subsampled"] for r in rows),
        derived=next((r["derived"] for r in rows if r.get("derived")), ""),
    )


# -- text -------------------------------------------------------------------


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
        from piscale.eval.runner import variant_label

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
    name = _label_options(algorithm)[0]
    label = group.short_label(algorithm)
    if name != "bon":
        return label
    sharing = [a for a in ("wbon", "sc") if any(_label_options(c)[0] == a for c in group.algorithms)]
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


# -- files ------------------------------------------------------------------


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


_MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*")
_DASHES = ("-", "--", "-.", ":")


def write_plots(groups: Sequence[Group], out_dir: str | Path) -> list[Path]:
    """Accuracy versus budget and versus generated tokens per problem, one
    line per algorithm with its interval as a band; PNG and SVG for each
    configuration. Returns the files written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for group in groups:
        for axis, label in (("budget", "budget (samples / particles)"), ("tokens", "generated tokens per problem")):
            figure, ax = plt.subplots(figsize=(6.4, 4.4), layout="constrained")
            for number, algorithm in enumerate(group.algorithms):
                cells = sorted((c for c in group.cells if c.algorithm == algorithm), key=lambda c: c.budget)
                xs = [c.budget if axis == "budget" else max(c.generated_tokens, 1e-9) for c in cells]
                ys = [100 * c.accuracy for c in cells]
                # Distinct markers and dashes keep coinciding lines (bon and wbon often are) visible;
                # the pass@n bound is drawn grey and dotted, apart from the algorithms.
                bound = algorithm.split("[")[0] == PASS_AT
                (line,) = ax.plot(
                    xs,
                    ys,
                    marker="" if bound else _MARKERS[number % len(_MARKERS)],
                    linestyle=":" if bound else _DASHES[number % len(_DASHES)],
                    markersize=5,
                    label=group.short_label(algorithm),
                    **({"color": "0.45"} if bound else {}),
                )
                ax.fill_between(
                    xs, [100 * c.low for c in cells], [100 * c.high for c in cells], color=line.get_color(), alpha=0.12
                )
            ax.set_xscale("log", base=2 if axis == "budget" else 10)
            if axis == "budget":
                ax.set_xticks(group.budgets, [str(b) for b in group.budgets])
            ax.set_xlabel(label)
            ax.set_ylabel("accuracy (%)")
            ax.set_title(f"{group.dataset}: {group.model}, reward {group.reward}", fontsize=10)
            ax.grid(True, alpha=0.3)
            ax.legend(title="algorithm", fontsize=8)
            # No date stamp and fixed SVG element ids: the same results give the
            # same files byte for byte, so a refreshed page changes only where
            # its numbers do.
            with matplotlib.rc_context({"svg.hashsalt": group.slug}):
                for suffix in ("png", "svg"):
                    path = out_dir / f"{group.slug}-accuracy-vs-{axis}.{suffix}"
                    figure.savefig(path, dpi=150 if suffix == "png" else None, metadata={"Date": None})
                    written.append(path)
            plt.close(figure)
    return written
