"""An evaluation grid and its configuration: which algorithms, budgets and
seeds run, what else decides a result (``EvalConfig``), and the options each
algorithm receives, named as its *variant*.

Nothing here runs a search; ``piscale.eval.runner`` plans and runs the grid
against a results database.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from piscale.eval.store import CellKey
from piscale.tasks import DEFAULT_PROMPT_TEMPLATE, DEFAULT_SYSTEM_PROMPT, Problem, check_template


class EvalError(ValueError):
    """A bad grid or configuration; the message says which value."""


@dataclass(frozen=True)
class Grid:
    algorithms: tuple[str, ...]
    budgets: tuple[int, ...]
    seeds: tuple[int, ...]

    def __post_init__(self) -> None:
        for name, values in (("algorithms", self.algorithms), ("budgets", self.budgets), ("seeds", self.seeds)):
            if not values:
                raise EvalError(f"the grid needs at least one of {name}")
            if len(set(values)) != len(values):
                raise EvalError(f"{name} repeat a value: {list(values)}")
        if any(b < 1 for b in self.budgets):
            raise EvalError(f"budgets must be >= 1, got {list(self.budgets)}")
        if any(s < 0 for s in self.seeds):
            raise EvalError(f"seeds must be >= 0, got {list(self.seeds)}")

    @classmethod
    def parse(cls, algorithms: str, budgets: str, seeds: str) -> Grid:
        """From comma-separated lists, as the command line gives them."""
        return cls(
            algorithms=tuple(_items(algorithms, "algorithms", str)),
            budgets=tuple(sorted(_items(budgets, "budgets", int))),
            seeds=tuple(_items(seeds, "seeds", int)),
        )


def _items(text: str, what: str, kind: type) -> list:
    parts = [p.strip() for p in text.split(",") if p.strip()]
    try:
        return [kind(p) for p in parts]
    except ValueError as error:
        raise EvalError(f"{what}: expected a comma-separated list of {kind.__name__}, got {text!r}") from error


@dataclass(frozen=True)
class EvalConfig:
    """What, besides the grid cell and the search options, decides a result.
    Its hash (with the task's fingerprint and the model's identity) keys
    stored results."""

    model: str
    reward: str
    engine: str = "auto"
    system: str = DEFAULT_SYSTEM_PROMPT
    prompt_template: str = DEFAULT_PROMPT_TEMPLATE
    options: Mapping[str, object] = field(default_factory=dict)
    """Search options: ``KEY`` for every algorithm that takes it,
    ``ALGORITHM.KEY`` for one algorithm."""

    def __post_init__(self) -> None:
        check_template(self.prompt_template)


@dataclass(frozen=True)
class Job:
    """One search setting and the problems that still need it."""

    algorithm: str
    variant: str
    options: Mapping[str, object]
    budget: int
    """The budget the search runs at."""
    seed: int
    stores: tuple[int, ...]
    """The budgets whose rows each search yields (just ``budget`` unless subsampled)."""
    problems: tuple[Problem, ...]
    shared: tuple[tuple[str, tuple[int, ...]], ...] = ()
    """Other selections whose rows come from the same samples, with their budgets."""

    def cells(self, problem: Problem) -> list[CellKey]:
        return [
            (problem.id, algorithm, self.variant, b, self.seed)
            for algorithm, budgets in ((self.algorithm, self.stores), *self.shared)
            for b in budgets
        ]


def variant_label(options: Mapping[str, object]) -> str:
    """A short stable name for a set of search options ("" for none)."""
    return ",".join(f"{k}={v if isinstance(v, str) else json.dumps(v)}" for k, v in sorted(options.items()))


def algorithm_options(algorithms: Sequence[str], options: Mapping[str, object]) -> dict[str, dict[str, object]]:
    """The options each algorithm receives; an option no algorithm of the
    grid takes is an error, as is an unknown algorithm."""
    from piscale.search import ALGORITHMS

    unknown = [a for a in algorithms if a not in ALGORITHMS]
    if unknown:
        raise EvalError(f"unknown algorithm {', '.join(unknown)}; choose from {', '.join(ALGORITHMS)}")
    chosen: dict[str, dict[str, object]] = {a: {} for a in algorithms}
    for key, value in options.items():
        target, dot, name = key.rpartition(".")
        if dot:
            if target not in chosen:
                raise EvalError(f"option {key!r} names algorithm {target!r}, which is not in the grid")
            if name not in ALGORITHMS[target].options:
                raise EvalError(f"{target} takes no option {name!r}; it takes {', '.join(ALGORITHMS[target].options)}")
            chosen[target][name] = value
            continue
        takers = [a for a in algorithms if key in ALGORITHMS[a].options]
        if not takers:
            raise EvalError(f"no algorithm of the grid ({', '.join(algorithms)}) takes the option {key!r}")
        for algorithm in takers:
            chosen[algorithm].setdefault(key, value)
    return chosen


def budget_problems(algorithm: str, budgets: Sequence[int], options: Mapping[str, object]) -> dict[int, str]:
    """Budgets ``algorithm`` cannot spend, with the search's reason. Bad
    option values are errors for every budget, so they raise instead."""
    from piscale.search import ALGORITHMS
    from piscale.search.settings import build_settings

    spec = ALGORITHMS[algorithm]
    try:
        settings = build_settings(spec.name, spec.options, spec.defaults, dict(options))
    except (ValueError, TypeError) as error:
        raise EvalError(f"{algorithm}: {error}") from error
    problems = {}
    for budget in budgets:
        try:
            spec.layout(budget, settings)
        except ValueError as error:
            problems[budget] = str(error)
    return problems
