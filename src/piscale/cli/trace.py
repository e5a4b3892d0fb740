"""``piscale trace``: draw a search's particle tree as an HTML page."""

from __future__ import annotations

import json
from pathlib import Path

import typer


def register(app: typer.Typer) -> None:
    app.command()(trace)


def trace(
    file: Path = typer.Argument(..., help="A trace JSON, or a search result JSON holding one (solve --json --trace)."),
    output: Path = typer.Option(None, "-o", "--output", help="Where to write the page (default: FILE with .html)."),
) -> None:
    """Write a self-contained HTML page drawing the particle tree of a search."""
    from piscale.tracepage import render_html

    try:
        data = json.loads(file.read_text())
    except FileNotFoundError:
        typer.secho(f"error: no such file {file}", fg=typer.colors.RED, err=True)
        raise typer.Exit(2) from None
    except json.JSONDecodeError as error:
        typer.secho(f"error: {file} is not JSON ({error})", fg=typer.colors.RED, err=True)
        raise typer.Exit(2) from None
    try:
        page = render_html(data)
    except (ValueError, KeyError, TypeError) as error:
        typer.secho(f"error: {file}: {error}", fg=typer.colors.RED, err=True)
        raise typer.Exit(2) from None
    target = output or file.with_suffix(".html")
    target.write_text(page, encoding="utf-8")
    typer.echo(f"wrote {target}")
