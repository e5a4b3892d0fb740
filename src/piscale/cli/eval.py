"""``piscale eval`` and ``piscale report``: accuracy-versus-compute sweeps.

``eval`` runs a grid of algorithms x budgets x seeds over a task and stores
every result in SQLite as soon as it is finished; running the same command
again resumes it. ``report`` turns a database into accuracy tables with
confidence intervals and plots.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import TYPE_CHECKING

import typer

from piscale.cli.common import TRUST_REMOTE_CODE_HELP, fail, parse_pairs
from piscale.search import ALGORITHMS

if TYPE_CHECKING:
    from rich.console import Console

    from piscale.eval.grid import EvalConfig
    from piscale.eval.runner import Evaluation, Progress


LOG_EVERY_S = 30.0
"""When stderr is not a terminal, how often a progress line is written."""




def register(app: typer.Typer) -> None:
    app.command(name="eval")(evaluate)
    app.command(name="report")(report)


def evaluate(
    dataset: str = typer.Option(
        ..., "--dataset", help="math500 | gsm8k | gsm8k_train | aime24 | amc23 (shipped), a JSONL file, or hf:ID."
    ),
    limit: int = typer.Option(None, "--limit", help="Use the first N problems (after --skip)."),
    skip: int = typer.Option(
        0, "--skip", help="Leave out the first N problems, e.g. the training problems a learned reward was fitted on."
    ),
    data_dir: Path = typer.Option(None, "--data-dir", help="A folder whose files replace the shipped built-in tasks."),
    model: str = typer.Option(None, "--model", help="Policy model spec (default: the catalog's default model)."),
    reward: str = typer.Option(
        None, "--reward", help="Reward spec, as for piscale solve (default: judge); 'verify' checks each problem's "
        "reference answer (an oracle: an upper bound, not a fair comparison)."
    ),
    algorithms: str = typer.Option("pf,bon", "--algorithms", help="Comma-separated: " + ",".join(ALGORITHMS) + "."),
    budgets: str = typer.Option("1,2,4,8", "--budgets", help="Comma-separated budgets."),
    seeds: str = typer.Option("0", "--seeds", help="Comma-separated seeds."),
    db: Path = typer.Option(Path("results.sqlite"), "--db", help="SQLite results database (created if missing)."),
    engine: str = typer.Option("auto", "--engine", help="auto | hf | llamacpp | vllm | openai"),
    engine_option: list[str] = typer.Option(
        [], "--engine-option", help="Engine argument KEY=VALUE, e.g. max_sequences=64 for llama.cpp (repeatable)."
    ),
    device: str = typer.Option(None, "--device", help="cpu, cuda, ... (default: cuda if present)"),
    system: str = typer.Option(
        None, "--system", help="System prompt (default: the paper's: reason step by step, box the final answer)."
    ),
    prompt: str = typer.Option(
        None, "--prompt", help="User message template containing {question} (default: the question alone)."
    ),
    option: list[str] = typer.Option(
        [], "--option", help="Search option KEY=VALUE for every algorithm taking it, or ALGORITHM.KEY=VALUE; repeatable."
    ),
    chunk_size: int = typer.Option(
        8, "--chunk-size", help="Problems per run_many call; a kill loses at most one chunk."
    ),
    trace: bool = typer.Option(False, "--trace", help="Store each search's trace (genealogy, weights) too."),
    parallel: int = typer.Option(
        1, "--parallel", help="Searches run at once (the algorithms and budgets of a block of problems), sharing the engine's batches."
    ),
    max_failures_in_a_row: int = typer.Option(
        10, "--max-failures-in-a-row", help="Stop after this many failed searches with no success between them."
    ),
    trust_remote_code: bool = typer.Option(False, "--trust-remote-code", help=TRUST_REMOTE_CODE_HELP),
) -> None:
    """Run algorithms x budgets x seeds on a task; store every result at once; resume on re-run."""
    from rich.console import Console

    from piscale.eval.grid import EvalConfig, EvalError, Grid
    from piscale.eval.runner import Evaluation
    from piscale.eval.store import ResultStore, StoreError
    from piscale.tasks import DEFAULT_PROMPT_TEMPLATE, DEFAULT_SYSTEM_PROMPT, TaskError, load_task

    # Plain text: paths, model names and error messages may hold brackets that markup would eat.
    console = Console(stderr=True, markup=False)
    if chunk_size < 1:
        fail(f"--chunk-size must be >= 1, got {chunk_size}")
    if max_failures_in_a_row < 1:
        fail(f"--max-failures-in-a-row must be >= 1, got {max_failures_in_a_row}")
    if parallel < 1:
        fail(f"--parallel must be >= 1, got {parallel}")
    try:
        from piscale.api import DEFAULT_MODEL, DEFAULT_REWARD

        grid = Grid.parse(algorithms, budgets, seeds)
        task = load_task(dataset, data_dir)
        config = EvalConfig(
            model=model or DEFAULT_MODEL,
            reward=reward or DEFAULT_REWARD,
            engine=engine,
            system=DEFAULT_SYSTEM_PROMPT if system is None else system,
            prompt_template=DEFAULT_PROMPT_TEMPLATE if prompt is None else prompt,
            options=parse_pairs(option),
        )
        engine_options = parse_pairs(engine_option, "--engine-option")
        store = ResultStore(db)
    except (EvalError, TaskError, StoreError) as error:
        fail(str(error))
    with store:
        try:
            evaluation = Evaluation(store, task, config, grid, limit=limit, skip=skip)
        except (EvalError, TaskError) as error:
            fail(str(error))
        for (algorithm, budget), reason in evaluation.unsupported.items():
            console.print(f"skipping {algorithm} at budget {budget}: {reason}", style="yellow")
        jobs = evaluation.pending()
        cells = evaluation.cell_count
        if not jobs:
            console.print(f"All {cells} results are already in {db} (config {evaluation.config_key}); nothing to run.")
            console.print(f"See them with: piscale report {db}")
            return
        searches = sum(len(job.problems) for job in jobs)
        console.print(
            f"{task.name}: {len(evaluation.problems)} problems; {cells} cells, {searches} searches to run "
            f"(config {evaluation.config_key}, database {db})"
        )
        engine_options = _slots_for_the_grid(config, device, engine_options, jobs, chunk_size, parallel, console)
        lm, reward_model = _load(config, device, engine_options, console, evaluation, trust_remote_code)
        run_id = evaluation.start_run(
            {
                "lm": _describe(lm),
                "reward": _describe(reward_model),
                "device": device,
                "engine_options": engine_options,
                "limit": limit,
                "skip": skip,
            }
        )
        try:
            progress = _run_with_progress(
                evaluation, lm, reward_model, run_id, chunk_size, trace, max_failures_in_a_row, parallel, console
            )
        except KeyboardInterrupt:
            console.print(f"Interrupted. Finished results are stored in {db}; run the same command to resume.")
            raise typer.Exit(130) from None
        except EvalError as error:
            fail(f"{error}\nFinished results are stored in {db}; run the same command to resume.")
    accuracy = "n/a" if progress.accuracy is None else f"{100 * progress.accuracy:.1f}%"
    console.print(
        f"Ran {progress.searches_done} searches, stored {progress.rows_stored} results; accuracy of these searches "
        f"{accuracy}; {progress.tokens_per_second:.1f} generated tokens/s. Report: piscale report {db}"
    )
    if progress.failures:
        console.print(
            f"{progress.failures} search(es) failed; their errors are in the failures table of {db}. "
            "Running the same command again retries them.",
            style="yellow",
        )


def _slots_for_the_grid(
    config: EvalConfig, device: str | None, engine_options: dict, jobs, chunk_size: int, parallel: int, console: Console
) -> dict:
    """Engine options with llama.cpp's slots sized for a wave of the grid
    (``chunk_size`` problems of the largest budget, ``parallel`` searches at
    once) unless given: batches that large are what make it fast."""
    from piscale.api import engine_options_for

    if not jobs:
        return engine_options
    largest = max(job.budget for job in jobs)
    try:
        sized = engine_options_for(config.model, config.engine, device, engine_options, chunk_size * largest * parallel)
    except (ValueError, ImportError):
        return engine_options  # loading the model reports it
    if sized != engine_options:
        console.print(
            f"llama.cpp engine: {sized['max_sequences']} cache slots for --chunk-size {chunk_size} x budget "
            f"{largest} x --parallel {parallel} (--engine-option max_sequences=N to change)"
        )
    return sized


def _load(
    config: EvalConfig,
    device: str | None,
    engine_options: dict,
    console: Console,
    evaluation: Evaluation,
    trust_remote_code: bool = False,
) -> tuple[object, object]:
    from piscale.api import load_lm, load_reward
    from piscale.eval.runner import ORACLE_REWARD, oracle_reward

    with console.status(f"loading {config.model} and reward {config.reward}"):
        try:
            lm = load_lm(config.model, engine=config.engine, device=device, options=engine_options)
            if config.reward == ORACLE_REWARD:
                reward = oracle_reward(evaluation.problems, config.prompt_template)
            else:
                reward = load_reward(
                    config.reward, policy=lm, policy_spec=config.model, engine=config.engine, device=device,
                    trust_remote_code=trust_remote_code,
                )
        except (ValueError, TypeError, FileNotFoundError, OSError, ImportError) as error:
            fail(f"could not load the model or reward: {error}")
    return lm, reward


def _describe(thing: object) -> dict | None:
    """What a loaded backend or reward says about itself, for the run record."""
    if thing is None:
        return None
    described = {"class": f"{type(thing).__module__}.{type(thing).__qualname__}", "name": getattr(thing, "name", None)}
    if getattr(thing, "scale", None) is not None:
        described["scale"] = thing.scale
    identity = getattr(thing, "identity", None)
    if identity is not None:
        described["identity"] = identity if isinstance(identity, (str, int, float, dict, list)) else str(identity)
    return described


def _run_with_progress(
    evaluation: Evaluation,
    lm: object,
    reward: object,
    run_id: int,
    chunk_size: int,
    trace: bool,
    max_failures_in_a_row: int,
    parallel: int,
    console: Console,
) -> Progress:
    from datetime import timedelta

    from rich.progress import Progress as ProgressBar
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    columns = (
        TextColumn("{task.fields[problems]} problems,"),
        TextColumn("searches"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("acc {task.fields[accuracy]}"),
        TextColumn("{task.fields[failed]}"),
        TextColumn("{task.fields[speed]} tok/s"),
        TimeElapsedColumn(),
        TextColumn("left"),
        TimeRemainingColumn(),
    )
    last_line = [time.monotonic()]
    # The engine's own counter includes the searches still running, so the
    # speed is right from the first pass, not only once searches finish.
    usage = lm.usage if lm is not None else None
    tokens_at_start, started = (usage.generated_tokens if usage is not None else 0), time.monotonic()

    def tokens_per_second(progress: Progress) -> float:
        if usage is None:
            return progress.tokens_per_second
        return (usage.generated_tokens - tokens_at_start) / max(time.monotonic() - started, 1e-9)

    with ProgressBar(*columns, console=console) as bar:
        task_id = bar.add_task("eval", total=None, accuracy="–", speed="–", failed="", problems="–")

        def show(progress: Progress) -> None:
            accuracy = "–" if progress.accuracy is None else f"{100 * progress.accuracy:.1f}%"
            finished = progress.searches_done + progress.failures
            problems = f"{progress.problems_done}/{progress.problems_total}"
            bar.update(
                task_id,
                completed=finished,
                total=progress.searches_total,
                problems=problems,
                accuracy=accuracy,
                speed=f"{tokens_per_second(progress):.1f}",
                failed=f"{progress.failures} failed" if progress.failures else "",
            )
            if not console.is_terminal and time.monotonic() - last_line[0] >= LOG_EVERY_S:
                # A bar redrawn in place shows nothing in a log file: write a line now and then.
                last_line[0] = time.monotonic()
                task = bar.tasks[0]
                left = "" if task.time_remaining is None else f", about {timedelta(seconds=round(task.time_remaining))} left"
                console.print(
                    f"{problems} problems, {finished}/{progress.searches_total} searches, accuracy {accuracy}, "
                    f"{tokens_per_second(progress):.1f} tokens/s, {progress.failures} failed, "
                    f"{timedelta(seconds=round(task.elapsed or 0.0))} elapsed{left}"
                )

        return asyncio.run(
            evaluation.run(
                lm,
                reward,
                run_id=run_id,
                chunk_size=chunk_size,
                trace=trace,
                on_progress=show,
                max_failures_in_a_row=max_failures_in_a_row,
                parallel=parallel,
            )
        )


def report(
    db: Path = typer.Argument(..., help="A results database written by piscale eval."),
    out: Path = typer.Option(None, "--out", help="Folder for plots, report.md and report.json (default: DB_report/)."),
    as_markdown: bool = typer.Option(False, "--markdown", help="Print Markdown tables instead of terminal tables."),
    estimator: str = typer.Option(
        "expected", "--estimator", help="Subsampled cells: expected (mean over subsets) | first (first b samples)."
    ),
    plots: bool = typer.Option(True, "--plots/--no-plots", help="Write the plots."),
    common: bool = typer.Option(
        True, "--common-problems/--all-problems", help="Count only the problems every cell has (default), or all."
    ),
    reference: str = typer.Option("pf", "--versus", help="Compare this algorithm with each other one, paired."),
    derived: bool = typer.Option(
        True,
        "--derived/--stored-only",
        help="Add rows computed from the stored searches at no cost: pf, pg and pt under the other selection "
        "rule (re-chosen from their final particles) and pass@n from best-of-N's samples (default).",
    ),
    problems: str = typer.Option(
        None, "--problems", help="Only these problem ids: comma-separated, or @FILE with one id per line."
    ),
) -> None:
    """Accuracy (95% CI) and tokens per problem by algorithm x budget, and plots of the scaling curves."""
    from rich.console import Console

    from piscale.eval.report import markdown, print_report, summarize, write_json, write_plots
    from piscale.eval.store import StoreError

    try:
        chosen = None if problems is None else _problem_ids(problems)
        groups = summarize(
            db, estimator=estimator, common=common, reference=reference, derived=derived, problems=chosen
        )
    except (FileNotFoundError, ValueError, StoreError) as error:
        fail(str(error))
    if not groups:
        fail(f"{db} holds no results yet")
    text = markdown(groups, estimator=estimator)
    if as_markdown:
        typer.echo(text)
    else:
        print_report(groups, estimator=estimator, console=Console())
    out = out or db.with_name(db.stem + "_report")
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.md").write_text(text)
    written = [out / "report.md", write_json(groups, out / "report.json", estimator=estimator)]
    if plots:
        written += write_plots(groups, out)
    Console(stderr=True, markup=False).print("Wrote " + ", ".join(str(p) for p in written))


def _problem_ids(spec: str) -> list[str]:
    """``--problems``: ``a,b,c`` or ``@FILE`` (one id per line, blank lines
    and ``#`` comments skipped)."""
    if spec.startswith("@"):
        path = Path(spec[1:])
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except OSError as error:
            raise ValueError(f"--problems: cannot read {path}: {error.strerror or error}") from error
        ids = [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]
    else:
        ids = [part.strip() for part in spec.split(",") if part.strip()]
    if not ids:
        raise ValueError(f"--problems {spec!r} names no problem ids")
    return ids
