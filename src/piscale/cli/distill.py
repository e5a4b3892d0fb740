"""``piscale distill``: fine-tune the policy towards its reward-tilted posterior (BRAIn)."""

from __future__ import annotations

import time
from pathlib import Path

import typer

from piscale.cli.common import fail
from piscale.models import DEFAULT_MODEL



def register(app: typer.Typer) -> None:
    app.command(name="distill")(distill_command)


def distill_command(
    annotations: list[Path] = typer.Argument(
        ..., help="Output files of piscale annotate, sampled from MODEL with --temperature 1 --top-p 1."
    ),
    out: Path = typer.Option(..., "--out", "-o", help="Folder for the fine-tuned model (a piscale model spec)."),
    model: str = typer.Option(DEFAULT_MODEL, "--model", help="The model to train: the one that sampled the responses."),
    beta: float = typer.Option(1.0, "--beta", help="Tilt exp(reward / beta): smaller follows the reward harder."),
    learning_rate: float = typer.Option(1e-5, "--learning-rate", help="Constant, no warm-up."),
    prompts_per_step: int = typer.Option(32, "--prompts-per-step", help="Effective batch (gradient accumulation)."),
    micro_batch: int = typer.Option(4, "--micro-batch", help="Prompts per forward pass."),
    epochs: int = typer.Option(1, "--epochs"),
    max_grad_norm: float = typer.Option(1.0, "--max-grad-norm"),
    seed: int = typer.Option(0, "--seed"),
    device: str = typer.Option(None, "--device", help="cpu, cuda, ... (default: cuda if present)"),
) -> None:
    """Fit MODEL to p_sft(y|x) exp(r(x,y)/beta) by self-normalised importance sampling (BRAIn)."""
    from rich.console import Console

    from piscale.api import load_lm
    from piscale.distill import DistillError, Recipe, distill, load_groups

    console = Console(stderr=True, markup=False)
    try:
        recipe = Recipe(
            beta=beta, learning_rate=learning_rate, examples_per_step=prompts_per_step, micro_batch=micro_batch,
            epochs=epochs, max_grad_norm=max_grad_norm, seed=seed,
        )
        groups, left_out = load_groups(annotations, policy=model)
    except DistillError as error:
        fail(str(error))
    if out.exists() and any(out.iterdir()):
        fail(f"{out} exists and is not empty; name a new folder")
    try:
        lm = load_lm(model, engine="hf", device=device)
    except (ValueError, TypeError, ImportError, FileNotFoundError, OSError) as error:
        fail(str(error))
    skipped = ", ".join(f"{n} with {reason}" for reason, n in left_out.items())
    console.print(
        f"{len(groups)} prompts, {sum(len(g.responses) for g in groups)} responses"
        + (f" (left out: {skipped})" if skipped else ""),
        style="dim",
    )
    started = time.perf_counter()

    def show(step) -> None:
        console.print(
            f"epoch {step.epoch} step {step.step}: loss {step.loss:.4f}, grad norm {step.grad_norm:.3f}, "
            f"target ESS {step.target_ess:.2f}, {step.seconds:.1f}s",
            style="dim",
        )

    metrics = distill(lm, groups, recipe, out=out, progress=show)
    console.print(
        f"{len(metrics)} steps in {time.perf_counter() - started:.1f}s; model saved to {out} "
        f"(use it as --model {out}); metrics in {out / 'metrics.jsonl'}"
    )
