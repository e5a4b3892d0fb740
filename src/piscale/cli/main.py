"""``piscale generate`` and ``piscale solve``: the main jobs."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

import typer

from piscale.cli.common import TRUST_REMOTE_CODE_HELP, fail, parse_pairs
from piscale.models import DEFAULT_MODEL
from piscale.search import ALGORITHMS


def register(app: typer.Typer) -> None:
    app.command()(generate)
    app.command()(solve)


def generate(
    question: str = typer.Argument(..., help="The question to answer."),
    n: int = typer.Option(4, "--n", help="How many answers to sample."),
    model: str = typer.Option(DEFAULT_MODEL, help="Catalog name, .gguf file, folder or hub id."),
    engine: str = typer.Option("auto", help="auto | hf | llamacpp | vllm | openai"),
    device: str = typer.Option(None, help="cpu, cuda, cuda:1 ... (default: cuda if present)"),
    engine_option: list[str] = typer.Option(
        [], "--engine-option", help="Engine argument KEY=VALUE, e.g. n_threads=2 for llama.cpp (repeatable)."
    ),
    max_tokens: int = typer.Option(256, help="Token cap per answer."),
    temperature: float = typer.Option(0.8),
    top_p: float = typer.Option(1.0),
    seed: int = typer.Option(0),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
) -> None:
    """Sample N answers from a model in one batch and print them with token counts."""
    from rich.console import Console
    from rich.panel import Panel
    from rich.text import Text  # model output is text, not markup: "[/INST]" would raise

    from piscale.api import load_lm, sample

    if n < 1:
        fail("--n must be at least 1")
    console = Console(stderr=True)
    start = time.perf_counter()
    try:
        lm = load_lm(model, engine=engine, device=device, options=parse_pairs(engine_option, "--engine-option"))
    except (ValueError, TypeError, FileNotFoundError, OSError) as error:
        fail(str(error))
    loaded = time.perf_counter()
    console.print(
        f"{model} loaded ({type(lm).__name__}, engine={engine}) in {loaded - start:.1f}s", style="dim", markup=False
    )
    before = lm.usage.snapshot()
    outputs = asyncio.run(
        sample(lm, question, n, max_tokens=max_tokens, temperature=temperature, top_p=top_p, seed=seed)
    )
    usage = lm.usage.since(before)
    elapsed = time.perf_counter() - loaded
    if as_json:
        typer.echo(
            json.dumps(
                {
                    "model": model,
                    "answers": [
                        {"text": o.text, "tokens": len(o.token_ids), "finish_reason": o.finish_reason}
                        for o in outputs
                    ],
                    "usage": usage.to_dict(),
                },
                indent=2,
            )
        )
        return
    out = Console()
    for i, output in enumerate(outputs):
        title = f"answer {i + 1}/{n} · {len(output.token_ids)} tokens · {output.finish_reason}"
        out.print(Panel(Text(output.text.strip() or "(empty)"), title=title, title_align="left"))
    out.print(
        f"{usage.generated_tokens} tokens generated, {usage.prefill_tokens} prompt tokens prefilled once, "
        f"{usage.forward_passes} forward passes, {elapsed:.1f}s "
        f"({usage.generated_tokens / max(elapsed, 1e-9):.1f} tokens/s)"
    )

def solve(
    question: str = typer.Argument(..., help="The question to answer."),
    algorithm: str = typer.Option("pf", help=" | ".join(ALGORITHMS)),
    budget: int = typer.Option(8, help="Particles or samples (times iterations for pg)."),
    seed: int = typer.Option(0),
    model: str = typer.Option(DEFAULT_MODEL, help="Catalog name, .gguf file, folder or hub id."),
    reward: str = typer.Option(
        "judge",
        help="judge[:MODEL] | prm:MODEL | cdr:STRONG,WEAK | verify:ANSWER | arith | certainty | value[:PATH] | "
        "embed:POS|NEG | none; A*B multiplies, A^W weighs a term, final:A weighs A in on finished answers only "
        "(e.g. value*arith*final:certainty^10)",
    ),
    engine: str = typer.Option("auto", help="auto | hf | llamacpp | vllm | openai"),
    device: str = typer.Option(None, help="cpu, cuda, ... (default: cuda if present)"),
    engine_option: list[str] = typer.Option(
        [], "--engine-option", help="Engine argument KEY=VALUE, e.g. max_sequences=64 for llama.cpp (repeatable)."
    ),
    option: list[str] = typer.Option([], "--option", "-o", help="Algorithm option KEY=VALUE (repeatable)."),
    trust_remote_code: bool = typer.Option(False, "--trust-remote-code", help=TRUST_REMOTE_CODE_HELP),
    reference: str = typer.Option(None, help="The right answer, if known: the answer is graded against it."),
    progress: bool = typer.Option(False, "--progress", help="Show every step as the search runs."),
    compare: bool = typer.Option(
        False, "--compare", help="Also draw one sample at the same seed, and compare it with the search."
    ),
    as_json: bool = typer.Option(False, "--json", help="Print the result as JSON."),
    trace: Path = typer.Option(None, help="Write the run's trace (genealogy) to this JSON file."),
) -> None:
    """Answer a question with particle filtering or a baseline."""
    from rich.console import Console
    from rich.panel import Panel
    from rich.text import Text  # model output is text, not markup: "[/INST]" would raise

    from piscale.api import asolve

    options = parse_pairs(option)
    console = Console(stderr=True)
    common = dict(
        model=model,
        seed=seed,
        engine=engine,
        device=device,
        engine_options=parse_pairs(engine_option, "--engine-option"),
    )
    try:
        started = time.perf_counter()
        result = asyncio.run(
            asolve(
                question,
                reward=None if reward == "none" else reward,
                algorithm=algorithm,
                budget=budget,
                trust_remote_code=trust_remote_code,
                trace=trace is not None,
                progress=(lambda _, summary: console.print(progress_line(summary), markup=False))
                if progress
                else None,
                **common,
                **options,
            )
        )
        searched = time.perf_counter() - started
        single = None
        if compare:
            started = time.perf_counter()
            # The options best-of-N takes (how to generate), from its registry entry.
            single_options = {k: v for k, v in options.items() if k in ALGORITHMS["bon"].options}
            single = asyncio.run(asolve(question, reward=None, algorithm="bon", budget=1, **common, **single_options))
            single_seconds = time.perf_counter() - started
    except (ValueError, TypeError, KeyError, OSError, RuntimeError) as error:
        fail(str(error).strip("'\""))
    data = result.to_dict()
    if trace is not None:
        trace.write_text(json.dumps(data, indent=1))
        console.print(
            f"trace written to {trace}; draw it with: piscale trace {trace} -o tree.html", style="dim", markup=False
        )
    if as_json:
        data.pop("trace", None)
        typer.echo(json.dumps(data, indent=2))
        return
    out = Console()
    out.print(
        Panel(Text(result.text.strip() or "(empty)"), title=f"{algorithm} · budget {budget}", title_align="left")
    )
    if result.answer is None:
        out.print("answer: none (the chosen response has no \\boxed{} answer)")
    else:
        out.print(Text.assemble("answer: ", (result.answer, "bold"), grade(result.answer, reference)))
    usage = result.usage
    out.print(
        "usage: "
        + ", ".join(f"{k.replace('_', ' ')} {v:.2f}" if isinstance(v, float) else f"{k.replace('_', ' ')} {v}"
                    for k, v in usage.items())
    )
    if single is not None:
        out.print(
            Text(
                f"one sample (seed {seed}): {single.answer or 'no answer'}{grade(single.answer, reference)}, "
                f"{single.usage['generated_tokens']} tokens, {single_seconds:.0f}s  |  "
                f"{algorithm} at budget {budget}: {result.answer or 'no answer'}{grade(result.answer, reference)}, "
                f"{usage['generated_tokens']} tokens, {searched:.0f}s"
            )
        )


def grade(answer: str | None, reference: str | None) -> str:
    """`` (right)`` or `` (wrong)`` against a known reference; nothing without one."""
    if reference is None:
        return ""
    from piscale.grading import answers_equal

    return " (right)" if answer is not None and answers_equal(answer, reference) else " (wrong)"


def progress_line(summary: dict) -> str:
    """One line per step of a search: where it is, what is alive, how fast."""
    if "event" in summary:
        return f"  {summary['event']} (iteration {summary['iteration']}, chain {summary['chain']})"
    where = f"step {summary['step']:>2}"
    if summary["iteration"] or summary["chain"]:
        where = f"iteration {summary['iteration']} chain {summary['chain']} " + where
    alive = summary["particles"] - summary["finished"]
    parts = [where, f"{alive}/{summary['particles']} particles alive"]
    if summary["ess"] is not None:
        parts.append(f"ESS {summary['ess']:.1f}" + (", resampled" if summary["resampled"] else ""))
    if summary["best_score"] is not None:
        parts.append(f"best score {summary['best_score']:.3f}")
    seconds = max(summary["seconds"], 1e-9)
    parts.append(f"{summary['generated_tokens']} tokens, {summary['generated_tokens'] / seconds:.1f} tokens/s")
    return "  " + " · ".join(parts)
