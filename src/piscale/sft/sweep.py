"""A small grid of recipes, stopped early by the recipe's indicators.

    for each (learning rate, examples per step) of the grid:
        train for the first ``early_fraction`` of its steps; checkpoint
    rank the runs by their early indicators (piscale.recipe: lower gradient
        norm and higher loss over those steps rank higher)
    continue the best run (or every run, to check the rule) to the end
    rank the finished runs by a final score; compare the two rankings

Every run sees the same examples in the same order (one seed), so the runs
differ only in the grid's two settings. Runs with a larger batch take fewer
steps; "early" is the same fraction of each run's steps, that is the same
fraction of the data. The final score is the held-out completion loss on
``eval_data`` when given, else the mean training loss of the last
``early_fraction`` of steps (lower is better in both). Everything resumes:
each run is a ``piscale.sft.train`` folder, and ``sweep.json`` is rewritten
after every change.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import asdict, replace
from pathlib import Path

from piscale.models.loading import load_transformers
from piscale.recipe import RecipeError, early_indicators, rank_agreement, rank_by_early_indicators
from piscale.sft.plots import plot_runs
from piscale.sft.train import SFTRecipe, completion_loss, load_data, read_metrics, total_steps, train

SWEEP = "sweep.json"


def run_name(learning_rate: float, examples_per_step: int) -> str:
    return f"lr{learning_rate:g}-b{examples_per_step}"


def sweep(
    load_model: Callable[[], tuple],
    data: Sequence[str | os.PathLike],
    out: str | os.PathLike,
    base: SFTRecipe,
    learning_rates: Sequence[float],
    batches: Sequence[int],
    *,
    early_fraction: float = 0.25,
    finish: str = "best",
    eval_data: Sequence[str | os.PathLike] = (),
    save_every: int = 10,
    progress: Callable[[str, object], None] | None = None,
) -> dict:
    """Run the grid; ``load_model()`` gives a fresh (model, tokenizer) at the
    starting weights for each run. ``finish``: 'best' continues the top run
    only, 'all' continues every run (to see whether the early ranking held),
    'none' stops after ranking. Returns what ``sweep.json`` holds."""
    if not 0 < early_fraction < 1:
        raise RecipeError(f"early_fraction must be in (0, 1), got {early_fraction}")
    if finish not in ("best", "ends", "all", "none"):
        raise RecipeError(f"finish must be best, ends, all or none, got {finish!r}")
    if not learning_rates or not batches:
        raise RecipeError("the grid needs at least one learning rate and one batch size")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    recipes = {
        run_name(lr, b): replace(base, learning_rate=lr, examples_per_step=b)
        for lr in learning_rates
        for b in batches
    }
    if len(recipes) < 2:
        raise RecipeError("a sweep needs at least two configurations")
    _, tokenizer = load_model()
    examples = len(load_data(data, tokenizer, base))
    plan = {}
    for name, recipe in recipes.items():
        steps = total_steps(examples, recipe)
        early = max(1, math.floor(early_fraction * steps))
        if early >= steps:
            raise RecipeError(
                f"{name} has only {steps} steps: its early fraction would be the whole run; "
                "use more data or epochs, or smaller batches"
            )
        plan[name] = {"steps": steps, "early_steps": early}
    report: dict = {"early_fraction": early_fraction, "finish": finish, "runs": {}}

    def save() -> None:
        (out / SWEEP).write_text(json.dumps(report, indent=2))

    indicators = {}
    for name, recipe in recipes.items():
        folder = out / name
        if len(read_metrics(folder)) < plan[name]["early_steps"]:
            model, tokenizer = load_model()
            train(model, tokenizer, data, folder, recipe, stop_at_step=plan[name]["early_steps"], save_every=save_every,
                  keep_checkpoints=True, progress=_named(progress, name))
        metrics = read_metrics(folder)
        indicators[name] = early_indicators([m.loss for m in metrics], [m.grad_norm for m in metrics],
                                            plan[name]["early_steps"])
        report["runs"][name] = {**plan[name], "recipe": asdict(recipe), "early": asdict(indicators[name]),
                                "finished": False}
        save()
    early_ranking = rank_by_early_indicators(indicators)
    report["early_ranking"] = early_ranking
    save()
    chosen = {"best": early_ranking[:1], "ends": [early_ranking[0], early_ranking[-1]], "all": early_ranking,
              "none": []}[finish]
    for name in chosen:
        model, tokenizer = load_model()
        run = train(model, tokenizer, data, out / name, recipes[name], save_every=save_every, keep_checkpoints=False,
                    progress=_named(progress, name))
        entry = report["runs"][name]
        entry["finished"] = run.finished
        tail = max(1, plan[name]["early_steps"])
        entry["final_train_loss"] = sum(m.loss for m in run.metrics[-tail:]) / tail
        if eval_data and run.finished:
            # from the saved folder: a run finished by an earlier call left
            # ``model`` at the starting weights
            trained, tokenizer = load_transformers(str(out / name), device=str(next(model.parameters()).device))
            entry["eval_loss"] = completion_loss(trained, tokenizer, eval_data, recipes[name])
        entry["final_score"] = entry["eval_loss"] if eval_data else entry["final_train_loss"]
        save()
    finished = [n for n in early_ranking if report["runs"][n]["finished"]]
    report["final_ranking"] = sorted(finished, key=lambda n: report["runs"][n]["final_score"])
    report["final_score"] = "held-out completion loss" if eval_data else "training loss over the last early-fraction of steps"
    if len(finished) >= 2:
        report["agreement"] = rank_agreement([n for n in early_ranking if n in finished], report["final_ranking"])
    save()
    plot_runs({n: read_metrics(out / n) for n in recipes}, out / "sweep.png",
              early_step={n: plan[n]["early_steps"] for n in recipes})
    return report


def _named(progress: Callable[[str, object], None] | None, name: str) -> Callable[[object], None] | None:
    """A run's step reporter that says which run it is."""
    if progress is None:
        return None
    report = progress
    return lambda step: report(name, step)
