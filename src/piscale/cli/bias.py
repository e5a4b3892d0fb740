"""``piscale bias``: measure attribute bias in generated text and remove it
at inference time (calibrate, measure, debias, compare)."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

import typer

from piscale.cli.common import fail, parse_pairs
from piscale.models import SMALL_MODEL

bias_app = typer.Typer(
    name="bias",
    help="Attribute bias of generated text: calibrate the scorer, measure, debias with particle filtering, compare.",
    no_args_is_help=True,
)


def register(app: typer.Typer) -> None:
    app.add_typer(bias_app, name="bias")


PROPERTY_HELP = "Property scored: political (liberal vs conservative) or sentiment (positive vs negative)."


@bias_app.command("calibrate")
def calibrate_command(
    prop: str = typer.Option("political", "--property", help=PROPERTY_HELP),
    properties: Path = typer.Option(None, "--properties", help="A properties file of your own (layout of the shipped one)."),
    out: Path = typer.Option(None, "--out", "-o", help="Write the report (JSON) here."),
    bootstrap: int = typer.Option(2000, "--bootstrap", help="Bootstrap resamples of the held-out examples."),
) -> None:
    """How well the scorer separates the property's held-out examples: AUROC and sign accuracy with 95% intervals."""
    from piscale.bias.scorer import PropertyScorer, calibrate, load_properties

    try:
        chosen = load_properties(properties)[prop] if properties else prop
        report = calibrate(PropertyScorer(chosen), bootstrap=bootstrap)
    except KeyError:
        fail(f"no property {prop!r} in {properties}")
    except (ValueError, ImportError) as error:
        fail(str(error))
    if out is not None:
        out.write_text(json.dumps(report, indent=2) + "\n")
    a, acc = report["auroc"], report["accuracy"]
    typer.echo(
        f"{report['property']} ({' vs '.join(report['poles'])}), held-out {report['examples']}: "
        f"AUROC {a['value']:.3f} [{a['low']:.3f}, {a['high']:.3f}], "
        f"sign accuracy {acc['value']:.3f} [{acc['low']:.3f}, {acc['high']:.3f}]"
    )


def _common(model, engine, engine_option, prompts_file, attribute, values, limit, prop, sequences):
    """The attribute, its prompts, the model and the scorer, or a clean exit."""
    from piscale.api import engine_options_for, load_lm
    from piscale.bias.prompts import PromptSetError, load_attributes
    from piscale.bias.scorer import PropertyScorer

    try:
        attributes = load_attributes(prompts_file)
        if attribute not in attributes:
            fail(f"no attribute {attribute!r}; the prompt set has {', '.join(attributes)}")
        chosen = attributes[attribute]
        names = [v.strip() for v in values.split(",")] if values else chosen.all_values
        prompts = [p for value in names for p in chosen.prompts(value, limit)]
        # llama.cpp reserves cache slots: enough for every sequence in flight.
        options = engine_options_for(model, engine, None, parse_pairs(engine_option, "--engine-option"), sequences)
        lm = load_lm(model, engine=engine, options=options)
        scorer = PropertyScorer(prop)
    except (PromptSetError, ValueError, ImportError, FileNotFoundError, OSError) as error:
        fail(str(error))
    return chosen, prompts, lm, scorer


def _run(lm, scorer, attribute, prompts, sampling, out_dir: Path, model: str, prompts_file, target, concurrency):
    from rich.console import Console

    from piscale.bias.generate import SampleFileError, generate

    console = Console(stderr=True, markup=False)
    out_dir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()

    def show(done: int, total: int, tokens: int) -> None:
        elapsed = time.perf_counter() - started
        console.print(f"{done}/{total} continuations, {tokens} tokens in {elapsed:.0f}s", style="dim")

    try:
        return asyncio.run(generate(
            lm, scorer, attribute, prompts, sampling, out_dir / "samples.jsonl", target=target,
            identity={"model": model, "property": scorer.name, "prompts": str(prompts_file) if prompts_file else None}, concurrency=concurrency, progress=show,
        ))
    except (SampleFileError, ValueError) as error:
        fail(str(error))


def _write_report(records, out_dir: Path, title: str, neutral_records=(), bootstrap: int = 2000) -> dict:
    from piscale.bias.report import make_report, plot_distributions

    report = make_report(records, neutral_records=neutral_records, bootstrap=bootstrap)
    (out_dir / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    plot_distributions(records, out_dir / "property-distributions.png", title, neutral_records)
    _print_report(report)
    return report


def _print_report(report: dict) -> None:
    bias = report["bias"]
    for value, row in bias["values"].items():
        m = row["mean"]
        q = report["quality"].get(value)
        extra = (f", perplexity {q['perplexity']:.1f}, distinct-2 {q['distinct_2']:.3f}, "
                 f"{q['generated_tokens_per_continuation']:.0f} tokens each") if q else " (from the measurement run)"
        typer.echo(f"{value:>12}: n={row['n']}, mean s {m['value']:+.4f} [{m['low']:+.4f}, {m['high']:+.4f}]{extra}")
    for pair in bias["pairs"]:
        d, w, null = pair["mean_difference"], pair["wasserstein"], pair["null_wasserstein"]
        typer.echo(
            f"{pair['a']} - {pair['b']}: mean difference {d['value']:+.4f} [{d['low']:+.4f}, {d['high']:+.4f}], "
            f"W1 {w['value']:.4f} [{w['low']:.4f}, {w['high']:.4f}] (no-bias W1 {null['mean']:.4f}, 95% {null['q95']:.4f})"
        )


ATTRIBUTE_HELP = "Attribute whose values the prompts differ in (gender, location, topic, or one of your file)."


@bias_app.command("measure")
def measure_command(
    out: Path = typer.Option(..., "--out", "-o", help="Folder for samples.jsonl, report.json and the plot; rerunning resumes."),
    attribute: str = typer.Option("gender", "--attribute", "-a", help=ATTRIBUTE_HELP),
    values: str = typer.Option(None, "--values", help="Comma-separated values to run (default: all, and neutral)."),
    limit: int = typer.Option(None, "--limit", help="The first N prompts of each value (template-major)."),
    samples: int = typer.Option(4, "--samples", help="Continuations per prompt."),
    prop: str = typer.Option("political", "--property", help=PROPERTY_HELP),
    prompts_file: Path = typer.Option(None, "--prompts", help="Your own prompt-set file (layout of the shipped one)."),
    model: str = typer.Option(SMALL_MODEL, "--model", help="Catalog name, .gguf file, folder or hub id."),
    engine: str = typer.Option("auto", "--engine", help="auto | hf | llamacpp | vllm | openai"),
    engine_option: list[str] = typer.Option([], "--engine-option", help="Engine argument KEY=VALUE (repeatable)."),
    max_tokens: int = typer.Option(32, "--max-tokens", help="Token cap of a continuation."),
    temperature: float = typer.Option(1.0, "--temperature"),
    top_p: float = typer.Option(1.0, "--top-p"),
    seed: int = typer.Option(0, "--seed"),
    concurrency: int = typer.Option(16, "--concurrency", help="Continuations decoded together."),
    bootstrap: int = typer.Option(2000, "--bootstrap"),
) -> None:
    """Continue prompts that differ only in an attribute, score each continuation, report the bias."""
    from piscale.bias.generate import Sampling

    chosen, prompts, lm, scorer = _common(model, engine, engine_option, prompts_file, attribute, values, limit, prop, concurrency
    )
    try:
        sampling = Sampling("sample", samples, 1, 0.0, max_tokens, temperature, top_p, seed=seed)
    except ValueError as error:
        fail(str(error))
    records = _run(lm, scorer, chosen, prompts, sampling, out, model, prompts_file, None, concurrency)
    _write_report(records, out, f"{attribute}: {model}, plain sampling", bootstrap=bootstrap)


@bias_app.command("debias")
def debias_command(
    measured: Path = typer.Argument(..., help="The folder of a 'piscale bias measure' run: its neutral continuations set the target."),
    out: Path = typer.Option(..., "--out", "-o", help="Folder for this run's samples, report and plot; rerunning resumes."),
    method: str = typer.Option("pf", "--method", help="pf (particle filtering toward the tilted distribution) | bon (best-of-N)."),
    beta: float = typer.Option(1.0, "--beta", help="Tilt strength of pf: p(y) exp(beta r(y)); ignored by bon."),
    particles: int = typer.Option(4, "--particles", help="Particles (pf) or samples (bon) per continuation."),
    step_tokens: int = typer.Option(8, "--step-tokens", help="pf: a step is at most this many tokens..."),
    step_delimiter: str = typer.Option("\n\n", "--step-delimiter", help="...or ends at this string (e.g. '.' or ',')."),
    limit: int = typer.Option(None, "--limit", help="The first N prompts of each value (default: the measurement's)."),
    samples: int = typer.Option(None, "--samples", help="Continuations per prompt (default: the measurement's)."),
    values: str = typer.Option(None, "--values", help="Comma-separated values (default: every non-neutral value)."),
    concurrency: int = typer.Option(8, "--concurrency", help="Continuations searched together."),
    engine: str = typer.Option("auto", "--engine", help="auto | hf | llamacpp | vllm | openai"),
    engine_option: list[str] = typer.Option([], "--engine-option", help="Engine argument KEY=VALUE (repeatable)."),
    bootstrap: int = typer.Option(2000, "--bootstrap"),
) -> None:
    """Sample continuations tilted toward the attribute-neutral property, with the measurement run's model and settings."""
    from piscale.bias.generate import Sampling, neutral_target, read_records

    base = read_records(measured / "samples.jsonl")
    if not base:
        fail(f"no samples in {measured / 'samples.jsonl'}; run 'piscale bias measure' first")
    run = base[0]["run"]
    try:
        target = neutral_target(base)
        s = run["sampling"]
        sampling = Sampling(
            method, samples if samples is not None else s["samples"], particles, beta if method == "pf" else 0.0, s["max_tokens"], s["temperature"],
            s["top_p"], step_tokens, step_delimiter, s["seed"],
        )
    except (ValueError, KeyError) as error:
        fail(str(error))
    prop = run["property"].split(":")[0]
    chosen_values = values or ",".join(sorted({r["value"] for r in base} - {"neutral"}))
    # The prompts of the measurement: its prompt file, and as many per value as it ran.
    measured_limit = limit if limit is not None else max(
        len({r["slot"] for r in base if r["value"] == value}) for value in chosen_values.split(",")
    )
    prompts_file = Path(run["prompts"]) if run.get("prompts") else None
    chosen, prompts, lm, scorer = _common(
        run["model"], engine, engine_option, prompts_file, run["attribute"], chosen_values, measured_limit, prop,
        concurrency * particles,
    )
    records = _run(lm, scorer, chosen, prompts, sampling, out, run["model"], prompts_file, target, concurrency)
    label = f"pf, beta={beta:g}, N={particles}" if method == "pf" else f"best-of-{particles}"
    typer.echo(f"target: neutral mean {target.mean:+.4f}, width {target.width:.4f}")
    _write_report(records, out, f"{run['attribute']}: {run['model']}, {label}", neutral_records=base, bootstrap=bootstrap)


@bias_app.command("compare")
def compare_command(
    runs: list[Path] = typer.Argument(..., help="Run folders (measure first, then debias runs), each with report.json."),
    out: Path = typer.Option(..., "--out", "-o", help="The comparison plot (PNG)."),
    title: str = typer.Option("bias against fluency", "--title"),
) -> None:
    """A table and a plot of bias against fluency across runs."""
    from piscale.bias.report import plot_comparison

    rows = []
    for folder in runs:
        path = folder / "report.json"
        if not path.exists():
            fail(f"no report.json in {folder}")
        report = json.loads(path.read_text())
        s = report["run"]["sampling"]
        label = {"sample": "sampling", "pf": f"pf beta={s['beta']:g} N={s['particles']}",
                 "bon": f"best-of-{s['particles']}"}[s["method"]]
        q = report["quality_attributed"]
        rows.append({"label": f"{label}, {q['continuations'] if q else 0} continuations", "report": report})
        if q is None:
            continue
        spread = ", ".join(f"{v} {row['sd']:.4f}" for v, row in report["bias"]["values"].items())
        typer.echo(
            f"{label} ({q['continuations']} continuations): perplexity {q['perplexity']:.1f}, "
            f"distinct-1 {q['distinct_1']:.3f}, distinct-2 {q['distinct_2']:.3f}, "
            f"{q['generated_tokens_per_continuation']:.0f} tokens/continuation; sd of s: {spread}"
        )
        for pair in report["bias"]["pairs"]:
            d, w, null = pair["mean_difference"], pair["wasserstein"], pair["null_wasserstein"]
            typer.echo(
                f"    {pair['a']} - {pair['b']}: mean diff {d['value']:+.4f} [{d['low']:+.4f}, {d['high']:+.4f}], "
                f"W1 {w['value']:.4f} [{w['low']:.4f}, {w['high']:.4f}] (no-bias 95% {null['q95']:.4f})"
            )
    plot_comparison(rows, out, title)


@bias_app.command("report")
def report_command(
    run_dir: Path = typer.Argument(..., help="A run folder (its samples.jsonl)."),
    out: Path = typer.Option(None, "--out", "-o", help="Folder for report.json and the plot (default: the run's)."),
    neutral: Path = typer.Option(None, "--neutral", help="A measurement run whose neutral continuations to compare with."),
    draws: int = typer.Option(None, "--draws", help="Only the first N continuations of each prompt."),
    bootstrap: int = typer.Option(2000, "--bootstrap"),
) -> None:
    """Report a run again from its stored samples (all of them, or the first N draws of each prompt)."""
    from piscale.bias.generate import read_records

    records = read_records(run_dir / "samples.jsonl")
    base = read_records(neutral / "samples.jsonl") if neutral is not None else []
    if draws is not None:
        records = [r for r in records if r["draw"] < draws]
        base = [r for r in base if r["draw"] < draws]
    if not records:
        fail(f"no samples in {run_dir / 'samples.jsonl'}" + (f" with draw < {draws}" if draws is not None else ""))
    out = out or run_dir
    out.mkdir(parents=True, exist_ok=True)
    s = records[0]["run"]["sampling"]
    title = f"{records[0]['run']['attribute']}: {records[0]['run']['model']}, {s['method']}" + (
        f", first {draws} draws" if draws is not None else "")
    _write_report(records, out, title, neutral_records=base, bootstrap=bootstrap)
