"""``piscale prm collect`` and ``piscale prm train``: a learned step value.

``collect`` samples rollouts of a policy on training problems, grades them
with the verifier and stores them (re-running the same command resumes);
``train`` fits a value head on a backbone's hidden states at the end of each
step and writes the head file that the reward spec ``value:PATH`` loads.
"""

from __future__ import annotations

import asyncio
import sys
import time
from pathlib import Path

import typer

from piscale.cli.common import fail, parse_pairs

prm_app = typer.Typer(
    name="prm",
    help="Learn a step value from verifier outcomes: collect rollouts, train a head.",
    no_args_is_help=True,
)


def register(app: typer.Typer) -> None:
    app.add_typer(prm_app, name="prm")


@prm_app.command(name="collect")
def collect(
    dataset: str = typer.Option("gsm8k_train", "--dataset", help="Training problems: gsm8k_train or a JSONL file."),
    limit: int = typer.Option(None, "--limit", help="Use the first N problems."),
    start: int = typer.Option(0, "--start", help="Skip the first N problems (before --limit)."),
    model: str = typer.Option("qwen2.5-coder-0.5b-instruct", "--model", help="Policy model spec."),
    engine: str = typer.Option("llamacpp", "--engine", help="auto | hf | llamacpp | vllm | openai"),
    engine_option: list[str] = typer.Option(
        [], "--engine-option", help="Engine argument KEY=VALUE, e.g. n_threads=2 (repeatable)."
    ),
    rollouts: int = typer.Option(4, "--rollouts", help="Rollouts per problem."),
    seed: int = typer.Option(0, "--seed"),
    temperature: float = typer.Option(0.8, "--temperature"),
    max_tokens: int = typer.Option(512, "--max-tokens", help="Token cap of a whole rollout."),
    mc_completions: int = typer.Option(0, "--mc-completions", help="k completions per prefix for Monte-Carlo labels."),
    mc_problems: int = typer.Option(0, "--mc-problems", help="The first N problems get Monte-Carlo labels."),
    parallel: int = typer.Option(4, "--parallel", help="Problems in flight at once (they share batches)."),
    db: Path = typer.Option(..., "--db", help="SQLite database (created if missing; the evaluation store's format)."),
) -> None:
    """Sample rollouts on training problems, grade them, store them; resume on re-run."""
    from piscale.eval.store import ResultStore, StoreError
    from piscale.tasks import TaskError, load_task
    from piscale.values.collect import CollectConfig, CollectError, Collection

    if "test" in Path(dataset).stem.lower() or dataset in ("gsm8k", "math500", "aime24", "amc23"):
        fail(f"{dataset!r} is an evaluation set; collect training rollouts on training problems only (gsm8k_train)")
    if start < 0:
        fail(f"--start must be >= 0, got {start}")
    try:
        task = load_task(dataset)
        problems = task.problems[start:]
        problems = problems[:limit] if limit is not None else problems
        config = CollectConfig(
            policy=model,
            rollouts=rollouts,
            seed=seed,
            temperature=temperature,
            max_tokens=max_tokens,
            mc_completions=mc_completions,
            mc_problems=mc_problems,
        )
        store = ResultStore(db)
        collection = Collection(store, task, problems, config)
    except (TaskError, CollectError, StoreError, ValueError) as error:
        fail(str(error))
    pending = collection.pending()
    typer.echo(f"{len(problems) - len(pending)} of {len(problems)} problems stored; {len(pending)} to collect")
    if not pending:
        return
    options = {"n_threads": 2, "max_sequences": 64, "context_length": max_tokens + 512} if engine == "llamacpp" else {}
    options.update(parse_pairs(engine_option, "--engine-option"))
    from piscale.lm import load

    lm = load(model, engine=engine, **options)
    run_id = collection.start_run(sys.argv, options)
    started = time.perf_counter()
    count = {"problems": 0, "rollouts": 0, "correct": 0}

    def progress(problem, result) -> None:
        count["problems"] += 1
        count["rollouts"] += len(result["rollouts"])
        count["correct"] += sum(r["correct"] for r in result["rollouts"])
        tokens = lm.usage.generated_tokens
        elapsed = time.perf_counter() - started
        typer.echo(
            f"{count['problems']}/{len(pending)} {problem.id}: "
            f"{sum(r['correct'] for r in result['rollouts'])}/{len(result['rollouts'])} correct; "
            f"pass@1 so far {count['correct'] / count['rollouts']:.3f}; {tokens / elapsed:.1f} tokens/s",
            err=True,
        )

    async def go() -> int:
        try:
            return await collection.run(lm, run_id, parallel=parallel, on_problem=progress)
        finally:
            await lm.close()

    stored = asyncio.run(go())
    typer.echo(f"stored {stored} problems in {time.perf_counter() - started:.0f} s")
    if collection.failed:
        for problem_id, message in collection.failed[:5]:
            typer.echo(f"failed: {problem_id}: {message}", err=True)
        raise typer.Exit(1)


@prm_app.command(name="train")
def train(
    db: list[Path] = typer.Option(..., "--db", help="Collection database(s) from piscale prm collect (repeatable)."),
    backbone: str = typer.Option("qwen2.5-coder-0.5b-instruct", "--backbone", help="Model whose hidden states the head reads."),
    layers: str = typer.Option(
        "auto", "--layers", help="Hidden-state indices to try (0 = embeddings, -1 = last); auto: middle, 3/4 and last."
    ),
    kind: str = typer.Option("logistic", "--kind", help="logistic | mlp"),
    objective: str = typer.Option(
        "within", "--objective", help="within: per-problem intercepts absorb problem difficulty, and the head learns "
        "what separates answers to one problem (logistic only); pooled: one intercept, the plain estimate of V."
    ),
    labels: str = typer.Option("outcome", "--labels", help="outcome | mc (Monte-Carlo labels where collected)."),
    problems: int = typer.Option(
        None, "--problems", help="Use only the rollouts of the first N problem collections stored in each database "
        "(a problem's rollouts under one setting; all by default), so a run reproduces from a database that has grown since."
    ),
    validation_fraction: float = typer.Option(0.25, "--validation-fraction", help="Share of problems held out."),
    seed: int = typer.Option(0, "--seed", help="Seeds the split and the MLP's initialisation."),
    out: Path = typer.Option(..., "--out", help="Head file to write (.safetensors)."),
    cache_dir: Path = typer.Option(None, "--cache-dir", help="Feature cache (default: $PISCALE_HOME/value-features)."),
    batch: int = typer.Option(8, "--batch", help="Rollouts per backbone forward pass when reading features."),
    dtype: str = typer.Option(
        "bfloat16", "--dtype",
        help="Backbone dtype for features: bfloat16 | float32. The reward serves in the same one, except bfloat16 "
        "on a CPU that only emulates it (AVX2: about 8x slower than float32), where it serves in float32.",
    ),
    baseline: list[str] = typer.Option(["arith"], "--baseline", help="Reward spec to measure on the same held-out rollouts."),
    report: Path = typer.Option(None, "--report", help="Also write the measures as JSON here."),
    l2: str = typer.Option(None, "--l2", help="Comma-separated L2 strengths to choose from (default 0.01,0.1,1,10,100)."),
    folds: int = typer.Option(
        4, "--folds", help="Also cross-validate by problem over this many folds (0: no), measuring on every problem."
    ),
) -> None:
    """Fit a value head on the backbone's hidden states at step ends; write the head file."""
    import json

    import numpy as np

    from piscale import models
    from piscale.eval.identity import model_identity
    from piscale.eval.store import ResultStore, StoreError
    from piscale.rewards.spec import from_spec
    from piscale.rewards.value import HeadFile, StepValueReward, ValueHead
    from piscale.values.collect import CollectError, stored_rollouts
    from piscale.values.train import (
        FeatureCache,
        TrainError,
        cross_validated_scores,
        data_sha256,
        evaluate_scores,
        extract_features,
        fit_and_choose,
        labelled_rollouts,
        reward_step_scores,
        scores_in_table,
        step_table,
        validation_problems,
    )

    if kind not in ("logistic", "mlp"):
        fail(f"--kind must be logistic or mlp, got {kind!r}")
    from piscale.values.train import L2_GRID

    try:
        l2_grid = tuple(float(x) for x in l2.split(",")) if l2 else L2_GRID
    except ValueError:
        fail(f"--l2 takes comma-separated numbers, got {l2!r}")
    if any(x < 0 for x in l2_grid):
        fail(f"--l2 strengths must be >= 0, got {l2}")
    rollouts, configs = [], []
    try:
        for path in db:
            store = ResultStore(path, read_only=True)
            if problems is not None and problems < 2:
                raise TrainError(f"--problems must be at least 2, got {problems}")
            rollouts += labelled_rollouts(store, problems)
            used = {c["config_key"] for c in stored_rollouts(store)[:problems]}
            configs += [c for c in store.configs() if c["config_key"] in used]
            store.close()
        systems = {r.system for r in rollouts}
        if len(systems) != 1:
            raise TrainError(f"the rollouts were written under {len(systems)} different system prompts; train on one")
        validation = validation_problems([r.problem_id for r in rollouts], validation_fraction, seed)
    except (StoreError, CollectError, TrainError) as error:
        fail(str(error))
    if any("test" in c["dataset"] or c["dataset"] in ("gsm8k", "math500") for c in configs):
        fail("these rollouts include an evaluation set's problems; train on training problems only")
    typer.echo(f"{len(rollouts)} rollouts of {len({r.problem_id for r in rollouts})} problems; "
               f"{sum(r.correct for r in rollouts)} correct; {len(validation)} problems held out")

    from piscale.models import load_transformers

    model, tokenizer = load_transformers(backbone, dtype=dtype)
    total = model.config.num_hidden_layers
    chosen_layers = (
        sorted({total // 2, (3 * total) // 4, total}) if layers == "auto" else [int(x) for x in layers.split(",")]
    )
    system = systems.pop()
    hidden = model.config.hidden_size
    placeholder = ValueHead(np.zeros(hidden, np.float32), np.ones(hidden, np.float32), [np.zeros(hidden, np.float32)], [np.float32(0)])
    reward = StepValueReward(model, tokenizer, placeholder, system_prompt=system, batch_tokens=8192)
    layout = {"kind": "parts", "marker": "\n\n", "system_prompt": system, "prompt_format": None}
    root = cache_dir or (models.piscale_home() / "value-features")
    cache = FeatureCache(root, backbone, chosen_layers, {**layout, "dtype": dtype})
    started = time.perf_counter()
    features = extract_features(
        reward, rollouts, chosen_layers, cache, batch=batch,
        progress=lambda done, todo: typer.echo(f"features: {done}/{todo} rollouts read", err=True),
    )
    feature_seconds = time.perf_counter() - started
    started = time.perf_counter()
    try:
        fitted = fit_and_choose(
            rollouts, features, chosen_layers, validation, kind=kind, labels=labels, objective=objective, seed=seed,
            l2_grid=l2_grid,
        )
    except TrainError as error:
        fail(str(error))
    fit_seconds = time.perf_counter() - started

    table = step_table(rollouts, features, chosen_layers.index(fitted.layer), labels)
    held_out = np.flatnonzero([r.problem_id in validation for r in rollouts])
    baselines = {}
    for spec in baseline:
        other = from_spec(spec)
        scores = scores_in_table(reward_step_scores(other, rollouts, held_out), table)
        baselines[spec] = evaluate_scores(scores, table, rollouts, held_out).to_dict()

    cross_validation = {}
    if folds:
        every = np.arange(len(rollouts))
        out_of_fold, fold_layers = cross_validated_scores(
            rollouts, features, chosen_layers, folds, seed=seed, kind=kind, labels=labels, objective=objective,
            l2_grid=l2_grid,
        )
        cross_validation = {"folds": folds, "layers_chosen": fold_layers,
                            "value": evaluate_scores(out_of_fold, table, rollouts, every).to_dict()}
        for spec in baseline:
            other = from_spec(spec)
            scores = scores_in_table(reward_step_scores(other, rollouts, every), table)
            cross_validation[spec] = evaluate_scores(scores, table, rollouts, every).to_dict()
            if other.scale == "probability":  # the product of experts the spec value*SPEC searches with
                product = evaluate_scores(out_of_fold * scores, table, rollouts, every)
                cross_validation[f"value*{spec}"] = product.to_dict()

    metrics = {
        "validation": fitted.validation.to_dict(),
        "cross_validation": cross_validation,
        "train": fitted.train.to_dict(),
        "baselines_on_validation": baselines,
        "candidates": fitted.candidates,
    }
    metadata = {
        "backbone": backbone,
        "backbone_identity": model_identity(backbone),
        "dtype": dtype,
        "layer": fitted.layer,
        "features": hidden,
        "layout": layout,
        "head": {"kind": kind, "l2": fitted.l2, "objective": objective},
        "policy": sorted({c["model"] for c in configs}),
        "training": {
            "command": " ".join(["piscale", *sys.argv[1:]]),
            "data_sha256": data_sha256(rollouts),
            "datasets": sorted({f'{c["dataset"]}:{c["description"]["dataset"]["fingerprint"]}' for c in configs}),
            "collections": sorted({c["config_key"] for c in configs}),
            "seed": seed,
            "labels": labels,
            "validation_fraction": validation_fraction,
            "problems": len({r.problem_id for r in rollouts}),
            "validation_problems": len(validation),
            "rollouts": len(rollouts),
            "feature_seconds": round(feature_seconds, 1),
            "fit_seconds": round(fit_seconds, 1),
        },
        "metrics": metrics,
    }
    digest = HeadFile(fitted.head, metadata).save(out)
    summary = {"head": str(out), "sha256": digest, "layer": fitted.layer, "l2": fitted.l2,
               "feature_seconds": round(feature_seconds, 1), "fit_seconds": round(fit_seconds, 1), **metrics}
    summary.pop("candidates")
    typer.echo(json.dumps(summary, indent=2))
    if report is not None:
        report.write_text(json.dumps({**summary, "metadata": metadata}, indent=2))
