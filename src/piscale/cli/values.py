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
    engine: str = typer.Option("llamacpp", "--engine", help="auto | hf | llamacpp | openai"),
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
    from piscale.eval.tasks import TaskError, load_task
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
