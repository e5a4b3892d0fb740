"""``piscale score``: score given responses to a prompt with any reward."""

from __future__ import annotations

import json
from typing import Annotated

import typer

AGGREGATION_ORDER = ("prod", "min", "last", "model")


def score_command(
    prompt: Annotated[str, typer.Argument(help="The problem or request.")],
    responses: Annotated[list[str], typer.Argument(help="Responses to score; steps are separated by a blank line.")],
    reward: Annotated[
        str,
        typer.Option(
            "--reward",
            "-r",
            help="judge:MODEL | prm:MODEL | cdr:STRONG,WEAK | verify:ANSWER | arith | embed:POSITIVE|NEGATIVE | "
            "value[:PATH]; A*B multiplies, A^W weighs a term, final:A weighs A in on finished answers only",
        ),
    ],
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False,
    device: Annotated[str, typer.Option(help="Where reward models run: cpu or cuda.")] = "cpu",
    trust_remote_code: Annotated[
        bool, typer.Option(help="Let a PRM checkpoint run its own code (needed by Qwen2.5-Math-PRM).")
    ] = False,
) -> None:
    """Score RESPONSES to PROMPT: every step, and the prod / min / last / model aggregates."""
    import asyncio

    from piscale.rewards import aggregate, answer_steps, from_spec, score_trajectories

    for i, response in enumerate(responses):
        if not response.strip():
            typer.echo(f"error: response {i + 1} is empty; there is nothing to score", err=True)
            raise typer.Exit(2)
    trajectories = [[step.strip() for step in answer_steps(r)] for r in responses]
    try:
        reward_model = from_spec(reward, device=device, trust_remote_code=trust_remote_code)
    except (ValueError, ImportError) as error:
        typer.echo(f"error: {error}", err=True)
        raise typer.Exit(2) from None
    if reward_model.needs_logprobs:
        typer.echo(
            f"error: the reward {reward!r} reads the policy's token log-probabilities, which only a search "
            "has; score it inside piscale solve or piscale eval",
            err=True,
        )
        raise typer.Exit(2)

    async def run() -> tuple[list[list[float]], list[float]]:
        try:
            prompts = [prompt] * len(trajectories)
            step_scores = await reward_model.score(prompts, trajectories)
            whole = await score_trajectories(reward_model, prompts, trajectories, "model")
            return step_scores, whole
        finally:
            await reward_model.close()

    step_scores, whole = asyncio.run(run())
    entries = []
    for response, steps, scores, model_score in zip(responses, trajectories, step_scores, whole):
        aggregated = {how: aggregate(scores, how, reward_model.scale) for how in ("prod", "min", "last")}
        aggregated["model"] = model_score
        entries.append({"response": response, "steps": steps, "step_scores": scores, "aggregated": aggregated})
    report = {"prompt": prompt, "reward": reward_model.name, "scale": reward_model.scale, "responses": entries}
    if as_json:
        typer.echo(json.dumps(report, indent=2))
        return
    _print_table(report)


def _print_table(report: dict) -> None:
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text  # responses and reward names are text, not markup

    console = Console()
    console.print(Text.assemble("reward ", (report["reward"], "bold"), f" (scale: {report['scale']})"))
    for number, entry in enumerate(report["responses"], start=1):
        table = Table(title=f"response {number}", show_lines=False)
        table.add_column("step", justify="right")
        table.add_column("text")
        table.add_column("score", justify="right")
        for index, (step, score) in enumerate(zip(entry["steps"], entry["step_scores"]), start=1):
            preview = step if len(step) <= 60 else step[:57] + "..."
            table.add_row(str(index), Text(preview.replace("\n", " ")), f"{score:.4f}")
        for how in AGGREGATION_ORDER:
            table.add_row("", f"[italic]{how}[/italic]", f"{entry['aggregated'][how]:.4f}")
        console.print(table)


def register(app: typer.Typer) -> None:
    app.command("score")(score_command)
