"""The package's layering, checked from the source.

Layers, low to high; a module may import its own layer and the ones below:

    0  numerics and leaf utilities  piscale.smc, piscale.grading, piscale.data,
                                    piscale.models (the model catalog the
                                    backends and rewards resolve names with),
                                    piscale.recipe (the fine-tuning recipe
                                    the trainers share), piscale.jsonl
                                    (resumable records files),
                                    the piscale package itself (its public
                                    names load lazily)
    1  backends                     piscale.lm
    2  rewards                      piscale.rewards
    3  search                       piscale.search
    4  the Python API               piscale.api, piscale.tasks (the task reader
                                    the applications share)
    5  applications                 piscale.eval, piscale.serve, piscale.annotate,
                                    piscale.distill, piscale.sft, piscale.values,
                                    piscale.tracepage,
                                    piscale.narrative, piscale.bias
    6  the command line             piscale.cli

Applications sit side by side and should not need each other; the imports
between them that exist are listed in ``BETWEEN_APPLICATIONS`` so that a new
one fails here and an old one is visible. Every import counts, including
those inside functions and under ``TYPE_CHECKING``: a lazy import still
makes the lower layer unusable without the higher one. Modules are read with
``ast``, never imported.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

SOURCE = Path(__file__).resolve().parent.parent / "src"
PACKAGE = SOURCE / "piscale"

LAYERS: tuple[tuple[str, tuple[str, ...]], ...] = (
    (
        "numerics and leaf utilities",
        ("piscale.smc", "piscale.grading", "piscale.data", "piscale.models", "piscale.recipe", "piscale.jsonl", "piscale"),
    ),
    ("backends", ("piscale.lm",)),
    ("rewards", ("piscale.rewards",)),
    ("search", ("piscale.search",)),
    ("the Python API", ("piscale.api", "piscale.tasks")),
    (
        "applications",
        (
            "piscale.eval",
            "piscale.serve",
            "piscale.annotate",
            "piscale.distill",
            "piscale.sft",
            "piscale.values",
            "piscale.tracepage",
            "piscale.narrative",
            "piscale.bias",
        ),
    ),
    ("the command line", ("piscale.cli",)),
)

APPLICATIONS = dict(LAYERS)["applications"]

# Imports from one application into another that the code has today (the
# result store lives in piscale.eval; the skipped-records file name in
# piscale.annotate). Moving them below the applications empties
# this list; nothing may be added to it.
BETWEEN_APPLICATIONS = {
    ("piscale.distill", "piscale.annotate"),
    ("piscale.values.collect", "piscale.eval.identity"),
    ("piscale.values.collect", "piscale.eval.store"),
    ("piscale.values.train", "piscale.eval.store"),
}


def module_name(path: Path) -> str:
    parts = path.relative_to(SOURCE).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}


def lazy_names() -> dict[str, str]:
    """The public names ``piscale/__init__.py`` loads on first use, and the
    module each comes from (its ``_PUBLIC`` table)."""
    tree = ast.parse((PACKAGE / "__init__.py").read_text())
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "_PUBLIC" for t in node.targets):
            return ast.literal_eval(node.value)
    return {}


def imports(name: str, path: Path, known: set[str]) -> Iterator[tuple[int, str]]:
    """(line, imported piscale module) for every import in the file."""
    is_package = path.name == "__init__.py"
    lazy = lazy_names()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "piscale":
                    yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                package = name.split(".") if is_package else name.split(".")[:-1]
                base = ".".join(package[: len(package) - node.level + 1] + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            if base.split(".")[0] != "piscale":
                continue
            for alias in node.names:
                # ``from piscale.x import y`` imports the module piscale.x.y
                # when there is one; ``from piscale import solve`` loads the
                # module the lazy table names.
                if f"{base}.{alias.name}" in known:
                    yield node.lineno, f"{base}.{alias.name}"
                elif base == "piscale" and alias.name in lazy:
                    yield node.lineno, lazy[alias.name]
                else:
                    yield node.lineno, base


def layer_of(module: str) -> tuple[int, str]:
    """The layer of ``module`` and the name of the unit that places it (the
    longest prefix listed in ``LAYERS``)."""
    best: tuple[int, str] | None = None
    for rank, (_, units) in enumerate(LAYERS):
        for unit in units:
            if (module == unit or module.startswith(unit + ".")) and (best is None or len(unit) > len(best[1])):
                best = (rank, unit)
    if best is None:
        raise AssertionError(f"{module} is in no layer: add it to LAYERS in {__file__}")
    return best


def all_imports() -> list[tuple[str, int, str]]:
    known = modules()
    return [(name, line, target) for name, path in known.items() for line, target in imports(name, path, set(known))]


def test_every_module_has_a_layer():
    for name in modules():
        layer_of(name)


def test_no_layer_imports_a_higher_one():
    problems = []
    for name, line, target in all_imports():
        (low, _), (high, _) = layer_of(name), layer_of(target)
        if high > low:
            problems.append(
                f"{name} (line {line}, layer '{LAYERS[low][0]}') imports {target} (layer '{LAYERS[high][0]}')"
            )
    assert not problems, "a lower layer imports a higher one:\n" + "\n".join(problems)


def test_applications_do_not_import_each_other_beyond_the_known_ones():
    found = set()
    for name, line, target in all_imports():
        (rank, unit), (target_rank, target_unit) = layer_of(name), layer_of(target)
        if LAYERS[rank][0] == "applications" and rank == target_rank and unit != target_unit:
            found.add((name, target, line))
    new = sorted((name, target, line) for name, target, line in found if (name, target) not in BETWEEN_APPLICATIONS)
    assert not new, "an application imports another one:\n" + "\n".join(f"{n} (line {at}) imports {t}" for n, t, at in new)


def test_the_search_package_has_no_import_cycle():
    # Its modules import each other in one direction only (node < trace <
    # driver < population < kernel < algorithms < the package), so each can
    # be read, and imported, on its own.
    graph: dict[str, set[str]] = {}
    for name, _, target in all_imports():
        if name.startswith("piscale.search.") and target.startswith("piscale.search.") and target != name:
            graph.setdefault(name, set()).add(target)
    visiting: list[str] = []
    done: set[str] = set()

    def visit(module: str) -> None:
        if module in visiting:
            cycle = visiting[visiting.index(module) :] + [module]
            raise AssertionError("import cycle: " + " -> ".join(cycle))
        if module in done:
            return
        visiting.append(module)
        for target in sorted(graph.get(module, ())):
            visit(target)
        visiting.pop()
        done.add(module)

    for module in sorted(graph):
        visit(module)


@pytest.mark.parametrize(
    ("source", "module", "expected"),
    [
        ("from piscale.search import run\n", "piscale.lm.toy", "piscale.search"),
        ("def f():\n    from piscale.search.kernel import sweep\n", "piscale.smc", "piscale.search.kernel"),
        ("from ..search import select\n", "piscale.lm.toy", "piscale.search.select"),
        ("import piscale.api\n", "piscale.rewards.base", "piscale.api"),
        ("from piscale import solve\n", "piscale.lm.base", "piscale.api"),
    ],
)
def test_the_checker_sees_every_kind_of_import(tmp_path, source, module, expected):
    path = tmp_path / "probe.py"
    path.write_text(source)
    found = [target for _, target in imports(module, path, set(modules()))]
    assert found == [expected]
    assert layer_of(expected)[0] > layer_of(module)[0]
