"""Stored results aggregated into report groups: one :class:`Group` per
configuration, with its accuracy :class:`Cell` per algorithm and budget, the
paired :class:`Comparison` rows, the :class:`Population` of final candidates,
and the rows derived from stored searches (re-chosen answers, pass@n). What
the numbers mean is described in :mod:`piscale.eval.report`."""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from piscale.eval.grade import SUBSAMPLED_ALGORITHMS, answer_by_selection, final_population, grade, samples_of
from piscale.eval.stats import paired_difference, wilson_interval
from piscale.eval.store import ResultStore
from piscale.eval.subsample import pass_at
from piscale.search.settings import SELECTIONS as SELECTION_RULES

ESTIMATORS = ("expected", "first")

PASS_AT = "pass@n"
"""The algorithm name of the derived pass@b rows."""

RECHOSEN = "re-chosen"


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
        options = [label_options(a)[1] for a in self.algorithms]
        if not options:
            return {}
        return {k: v for k, v in options[0].items() if all(other.get(k) == v for other in options[1:])}

    def short_label(self, algorithm: str) -> str:
        """``algorithm`` without the options that every algorithm shares."""
        from piscale.eval.grid import variant_label

        name, options = label_options(algorithm)
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
    from piscale.eval.grid import variant_label

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


def label_options(label: str) -> tuple[str, dict[str, str]]:
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
