"""``piscale sft``: supervised fine-tuning by the recipe of Pareja et al.

``train`` fine-tunes a model on JSON-lines data (re-running the same command
resumes a killed run); ``sweep`` runs a small grid of learning rates and
batch sizes for an early fraction of training and continues the best by the
early indicators; ``data`` turns verified-correct search answers on a
training task into SFT data.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import typer

from piscale.cli.common import fail

sft_app = typer.Typer(
    name="sft",
    help="Supervised fine-tuning by the recipe: train, sweep (early stopping), data (from search outputs).",
    no_args_is_help=True,
)

EVALUATION_SETS = ("gsm8k", "math500", "aime24", "amc23")


def register(app: typer.Typer) -> None:
    app.add_typer(sft_app, name="sft")


def _recipe(**settings):
    from piscale.recipe import RecipeError
    from piscale.sft.train import SFTRecipe

    try:
        return SFTRecipe(**settings)
    except RecipeError as error:
        fail(str(error))


def _loader(model: str, device: str | None):
    """A function giving a fresh (model, tokenizer) at the starting weights."""
    import torch

    from piscale.models.loading import load_transformers

    where = device or ("cuda" if torch.cuda.is_available() else "cpu")

    def load():
        try:
            return load_transformers(model, device=where, dtype="float32")
        except (ValueError, OSError, ImportError) as error:
            fail(str(error))

    return load


def _show(console):
    def show(step, name: str | None = None) -> None:
        console.print(
            (f"{name} " if name else "")
            + f"step {step.step} (epoch {step.epoch:.2f}): loss {step.loss:.4f}, grad norm {step.grad_norm:.3f}, "
            f"lr {step.learning_rate:.2g}, {step.seconds:.1f}s",
            style="dim",
        )

    return show


@sft_app.command(name="train")
def train_command(
    data: list[Path] = typer.Argument(..., help="JSON-lines files: 'messages', or 'prompt'/'completion' records."),
    out: Path = typer.Option(..., "--out", "-o", help="Run folder; the fine-tuned model is saved here (use it as --model)."),
    model: str = typer.Option("smollm2-135m-instruct", "--model", help="Catalog name, folder or hub id to start from."),
    learning_rate: float = typer.Option(1e-5, "--learning-rate", help="Constant, no warm-up."),
    examples_per_step: int = typer.Option(32, "--examples-per-step", help="Effective batch (gradient accumulation)."),
    micro_batch: int = typer.Option(4, "--micro-batch", help="Examples per forward pass."),
    epochs: int = typer.Option(1, "--epochs"),
    phased: bool = typer.Option(False, "--phased", help="Train on the files one after another (default: stacked)."),
    all_tokens: bool = typer.Option(False, "--all-tokens", help="Loss on every token, not only the completions'."),
    max_length: int = typer.Option(2048, "--max-length", help="Longest example in tokens (longer ones are refused)."),
    max_grad_norm: float = typer.Option(1.0, "--max-grad-norm"),
    weight_decay: float = typer.Option(0.0, "--weight-decay"),
    seed: int = typer.Option(0, "--seed"),
    save_every: int = typer.Option(10, "--save-every", help="Checkpoint every N steps (what a resumed run restarts from)."),
    stop_at_step: int = typer.Option(None, "--stop-at-step", help="Stop (with a checkpoint) after this step."),
    device: str = typer.Option(None, "--device", help="cpu, cuda, ... (default: cuda if present)"),
) -> None:
    """Fine-tune MODEL on DATA (completion-only loss, constant LR); re-run the same command to resume."""
    from rich.console import Console

    from piscale.recipe import RecipeError
    from piscale.sft.data import DataError
    from piscale.sft.train import SUMMARY, train

    console = Console(stderr=True, markup=False)
    recipe = _recipe(
        learning_rate=learning_rate, examples_per_step=examples_per_step, micro_batch=micro_batch, epochs=epochs,
        max_grad_norm=max_grad_norm, weight_decay=weight_decay, seed=seed, phased=phased,
        completion_only=not all_tokens, max_length=max_length,
    )
    if out.exists() and any(out.iterdir()) and not (out / "recipe.json").is_file():
        fail(f"{out} exists, is not empty and holds no sft run; name a new folder")
    if (out / SUMMARY).is_file():
        console.print(f"{out} holds a finished run; nothing to do")
        return
    model_weights, tokenizer = _loader(model, device)()
    started = time.perf_counter()
    try:
        run = train(model_weights, tokenizer, data, out, recipe, stop_at_step=stop_at_step, save_every=save_every,
                    provenance={"model": model}, progress=_show(console))
    except (DataError, RecipeError) as error:
        fail(str(error))
    state = "finished" if run.finished else "stopped"
    console.print(
        f"{state} at step {run.steps} of {run.total_steps} in {time.perf_counter() - started:.1f}s; "
        + (f"model saved to {out} (use it as --model {out} --engine hf); " if run.finished else "re-run to continue; ")
        + f"metrics in {out / 'metrics.jsonl'}"
    )


def _grid(text: str, kind, flag: str) -> list:
    try:
        values = [kind(x) for x in text.split(",") if x.strip()]
    except ValueError:
        fail(f"{flag} takes comma-separated numbers, got {text!r}")
    if not values:
        fail(f"{flag} is empty")
    return values


@sft_app.command(name="sweep")
def sweep_command(
    data: list[Path] = typer.Argument(..., help="JSON-lines training files."),
    out: Path = typer.Option(..., "--out", "-o", help="Sweep folder: one run folder per configuration, sweep.json."),
    model: str = typer.Option("smollm2-135m-instruct", "--model"),
    learning_rates: str = typer.Option("5e-6,2e-5", "--learning-rates", help="Comma-separated."),
    batches: str = typer.Option("16,64", "--batches", help="Examples per step, comma-separated."),
    early_fraction: float = typer.Option(0.25, "--early-fraction", help="Share of each run's steps before ranking."),
    finish: str = typer.Option("best", "--finish", help="best | ends (the early-best and early-worst) | all | none: which runs to continue to the end."),
    eval_data: list[Path] = typer.Option([], "--eval-data", help="Held-out JSONL: its completion loss ranks finished runs."),
    micro_batch: int = typer.Option(4, "--micro-batch"),
    epochs: int = typer.Option(1, "--epochs"),
    max_length: int = typer.Option(2048, "--max-length"),
    seed: int = typer.Option(0, "--seed"),
    save_every: int = typer.Option(10, "--save-every"),
    device: str = typer.Option(None, "--device"),
) -> None:
    """Run a grid for an early fraction, rank by early gradient norm and loss, finish the best."""
    from rich.console import Console

    from piscale.recipe import RecipeError
    from piscale.sft.data import DataError
    from piscale.sft.sweep import sweep

    console = Console(stderr=True, markup=False)
    base = _recipe(micro_batch=micro_batch, epochs=epochs, max_length=max_length, seed=seed)
    show = _show(console)
    try:
        report = sweep(
            _loader(model, device), data, out, base, _grid(learning_rates, float, "--learning-rates"),
            _grid(batches, int, "--batches"), early_fraction=early_fraction, finish=finish, eval_data=eval_data,
            save_every=save_every, progress=lambda name, step: show(step, name),
        )
    except (DataError, RecipeError) as error:
        fail(str(error))
    out_console = Console(markup=False)
    out_console.print("run               steps  early: grad norm   loss   rank | final score  rank")
    final = report.get("final_ranking", [])
    for rank, name in enumerate(report["early_ranking"], start=1):
        run = report["runs"][name]
        score = f"{run['final_score']:.4f}  {final.index(name) + 1}" if name in final else "-"
        out_console.print(
            f"{name:<16} {run['steps']:>6}  {run['early']['grad_norm']:>16.4f} {run['early']['loss']:>7.4f} {rank:>5} | {score}"
        )
    if "agreement" in report:
        out_console.print(f"Spearman agreement of the early and final rankings: {report['agreement']:.2f}")
    out_console.print(f"details in {out / 'sweep.json'}, curves in {out / 'sweep.png'}")


@sft_app.command(name="data")
def data_command(
    db: list[Path] = typer.Option(..., "--db", help="Results database(s) of piscale eval or piscale prm collect (repeatable)."),
    out: Path = typer.Option(..., "--out", "-o", help="JSON-lines SFT file to write."),
    dataset: str = typer.Option("gsm8k_train", "--dataset", help="The training task whose searches to use."),
    algorithms: str = typer.Option("pf,bon,rollouts", "--algorithms", help="Searches to take answers from (rollouts: prm collect's)."),
    per_problem: int = typer.Option(None, "--per-problem", help="At most N distinct answers per problem (default: all)."),
    problems: int = typer.Option(
        None, "--problems",
        help="Take prm collect's rollouts of only the first N problem collections stored in each database "
        "(all by default), so that the data reproduces from a database that has grown since.",
    ),
    validation: Path = typer.Option(None, "--validation", help="Also write the answers of held-out problems here."),
    validation_fraction: float = typer.Option(0.1, "--validation-fraction", help="Share of problems held out."),
    seed: int = typer.Option(0, "--seed", help="Seeds the choice of held-out problems."),
) -> None:
    """Verified-correct, finished answers found by search on a training task, deduplicated per problem, as SFT data."""
    from piscale.eval.store import ResultStore, StoreError
    from piscale.sft.searched import sft_records, split_by_problem

    if dataset in EVALUATION_SETS or "test" in dataset.lower():
        fail(f"{dataset!r} is an evaluation set; fine-tune on training problems only (gsm8k_train)")
    wanted = {a.strip() for a in algorithms.split(",") if a.strip()}
    if per_problem is not None and per_problem < 1:
        fail(f"--per-problem must be >= 1, got {per_problem}")
    if problems is not None and problems < 1:
        fail(f"--problems must be >= 1, got {problems}")
    answers = []
    try:
        for path in db:
            with ResultStore(path, read_only=True) as store:
                answers += searched_answers(store, dataset, wanted, problems)
    except StoreError as error:
        fail(str(error))
    if not answers:
        fail(f"no {', '.join(sorted(wanted))} searches on {dataset!r} in {', '.join(map(str, db))}")
    records, left_out = sft_records(answers, per_problem)
    if not records:
        fail(f"none of the {len(answers)} answers was kept ({left_out})")
    held: list[dict] = []
    if validation is not None:
        try:
            records, held = split_by_problem(records, validation_fraction, seed)
        except ValueError as error:
            fail(str(error))
    for path, chosen in ((out, records), (validation, held)):
        if path is None:
            continue
        path.write_text("".join(json.dumps(r) + "\n" for r in chosen))
        problems = len({r["problem_id"] for r in chosen})
        typer.echo(f"{len(chosen)} answers to {problems} problems written to {path}")
    skipped = ", ".join(f"{n} {reason}" for reason, n in left_out.items())
    typer.echo(f"of {len(answers)} answers found; left out: {skipped or 'none'}")


def searched_answers(store, dataset: str, algorithms: set[str], first_collections: int | None = None) -> list:
    """Every graded answer of the wanted searches on ``dataset`` in a store:
    a PF/BoN search's chosen answer (its full-budget row says whether it is
    correct), and every rollout of ``prm collect`` (with
    ``first_collections``, of the first that many problem collections
    stored, as ``piscale prm train --problems`` counts them)."""
    from piscale.eval.store import StoreError
    from piscale.sft.searched import SearchedAnswer
    from piscale.values.collect import ALGORITHM

    collections = [e["search_id"] for e in store.searches() if e["algorithm"] == ALGORITHM]
    if first_collections is not None and "rollouts" in algorithms:
        if first_collections > len(collections):
            raise StoreError(f"{store.path} holds {len(collections)} problem collections, "
                             f"fewer than the {first_collections} asked for")
        collections = collections[:first_collections]
    kept = set(collections)
    found = []
    for config in store.configs():
        if config["dataset"] != dataset:
            continue
        key, description = config["config_key"], config["description"]
        source = f"{store.path.name}:{key}"
        if "rollouts" in algorithms:
            for entry in store.searches(key):
                if entry["search_id"] not in kept:
                    continue
                result = store.search(entry["search_id"])
                for rollout in result["rollouts"]:
                    found.append(SearchedAnswer(
                        problem_id=entry["problem_id"], system=result.get("system"), question=result["question"],
                        text="".join(rollout["steps"]), correct=bool(rollout["correct"]), finished=bool(rollout["ended"]),
                        algorithm="rollouts", budget=int(entry["budget"]), seed=int(entry["seed"]), source=source,
                    ))
        for row in store.results(key):
            if row["algorithm"] not in algorithms or row["algorithm"] == "rollouts" or row["subsampled"]:
                continue
            result = store.search(row["search_id"])
            chosen = result["candidates"][result["chosen"]] if result.get("candidates") else {}
            found.append(SearchedAnswer(
                problem_id=row["problem_id"], system=description.get("system"), question=result["question"],
                text=result["text"], correct=bool(row["correct"]), finished=bool(chosen.get("finished", False)),
                algorithm=row["algorithm"], budget=int(row["budget"]), seed=int(row["seed"]), source=source,
            ))
    return found
