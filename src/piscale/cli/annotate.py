"""``piscale annotate``: preference pairs (chosen, rejected) scored by a reward."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import typer

from piscale.cli.common import TRUST_REMOTE_CODE_HELP, fail, parse_pairs
from piscale.models import DEFAULT_MODEL



def register(app: typer.Typer) -> None:
    app.command(name="annotate")(annotate_command)


def annotate_command(
    prompts: str = typer.Argument(
        ..., help="A JSONL file of prompts ('prompt', 'question', 'problem' or 'instruction'; optional 'id' and "
        "'responses'), or a built-in task (gsm8k, math500, aime24, amc23)."
    ),
    out: Path = typer.Option(..., "--out", "-o", help="Pairs are appended here (JSONL); rerunning resumes."),
    reward: str = typer.Option(..., "--reward", "-r", help="Reward spec, e.g. cdr:STRONG,WEAK (see piscale score)."),
    model: str = typer.Option(DEFAULT_MODEL, "--model", help="Policy model that samples the responses."),
    k: int = typer.Option(4, "--k", help="Responses sampled per prompt."),
    rejected: str = typer.Option("lowest", "--rejected", help="lowest | random: how the rejected response is picked."),
    margin: float = typer.Option(0.0, "--margin", help="Rejected must score below chosen by more than this."),
    field: str = typer.Option(None, "--field", help="Read the prompt from this field of each record."),
    limit: int = typer.Option(None, "--limit", help="Annotate the first N prompts."),
    max_tokens: int = typer.Option(512, "--max-tokens", help="Token cap per response."),
    temperature: float = typer.Option(0.8, "--temperature"),
    top_p: float = typer.Option(1.0, "--top-p"),
    seed: int = typer.Option(0, "--seed"),
    system: str = typer.Option(None, "--system", help="System prompt for the policy model."),
    aggregation: str = typer.Option(
        "model", "--aggregation", help="model (the whole response as one step) | prod | min | last over its steps."
    ),
    keep_truncated: bool = typer.Option(
        False, "--keep-truncated", help="Let responses that hit the token cap be chosen or rejected."
    ),
    batch_size: int = typer.Option(8, "--batch-size", help="Prompts sampled and scored together; a kill loses at most one batch."),
    engine: str = typer.Option("auto", "--engine", help="auto | hf | llamacpp | vllm | openai"),
    engine_option: list[str] = typer.Option([], "--engine-option", help="Engine argument KEY=VALUE (repeatable)."),
    device: str = typer.Option(None, "--device", help="cpu, cuda, ... (default: cuda if present)"),
    trust_remote_code: bool = typer.Option(False, "--trust-remote-code", help=TRUST_REMOTE_CODE_HELP),
) -> None:
    """Sample K responses per prompt, score them with a reward, and write (chosen, rejected) pairs.

    Ties are skipped; skipped prompts go to OUT's .skipped.jsonl with the reason."""
    from rich.console import Console
    from rich.text import Text

    from piscale.annotate import AnnotationError, annotate, load_prompts, skipped_path
    from piscale.api import engine_options_for, load_lm, load_reward

    console = Console(stderr=True, markup=False)
    try:
        records = load_prompts(prompts, field=field, limit=limit)
    except AnnotationError as error:
        fail(str(error))
    started = time.perf_counter()
    try:
        options = engine_options_for(model, engine, device, parse_pairs(engine_option, "--engine-option"), k * batch_size)
        lm = load_lm(model, engine=engine, device=device, options=options)
        reward_model = load_reward(
            reward, policy=lm, policy_spec=model, engine=engine, device=device, trust_remote_code=trust_remote_code
        )
    except (ValueError, TypeError, ImportError, FileNotFoundError, OSError) as error:
        fail(str(error))
    if reward_model is None:
        fail("annotation needs a reward; --reward none gives nothing to choose by")
    console.print(f"{len(records)} prompts; policy {lm.name}, reward {reward_model.name}", style="dim")

    def show(summary) -> None:
        done = summary.already_done + summary.pairs + sum(summary.skipped.values())
        rate = summary.generated_tokens / max(time.perf_counter() - started, 1e-9)
        console.print(
            f"{done}/{summary.prompts} prompts, {summary.pairs} pairs, {sum(summary.skipped.values())} skipped, "
            f"{rate:.1f} tokens/s",
            style="dim",
        )

    try:
        summary = asyncio.run(
            annotate(
                records, lm, reward_model, out, k=k, rejected=rejected, margin=margin, max_tokens=max_tokens,
                temperature=temperature, top_p=top_p, seed=seed, system=system, aggregation=aggregation,
                keep_truncated=keep_truncated, batch_size=batch_size, progress=show,
            )
        )
    except (AnnotationError, ValueError) as error:
        fail(str(error))
    except Exception as error:  # a backend or reward failure mid-run: what was stored stays stored
        console.print(Text(
            f"error: {type(error).__name__}: {error}\nevery finished batch is in {out}; "
            "run the same command again to resume"
        ), style="red")
        raise typer.Exit(1) from None
    skipped = ", ".join(f"{n} {reason}" for reason, n in sorted(summary.skipped.items())) or "none"
    console.print(Text(
        f"{summary.pairs} new pairs in {out} ({summary.already_done} prompts were done before); skipped: {skipped}"
        + (f" (see {skipped_path(out)})" if summary.skipped else "")
        + f"; {summary.generated_tokens} tokens generated in {time.perf_counter() - started:.1f}s"
    ))
