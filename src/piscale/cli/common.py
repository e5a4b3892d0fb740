"""What the commands share: failing with a message, reading KEY=VALUE pairs."""

from __future__ import annotations

import json

import typer

TRUST_REMOTE_CODE_HELP = "Let a reward checkpoint run its own code (Qwen2.5-Math-PRM needs it). Off by default."


def fail(message: str) -> None:
    """Print ``message`` as an error and exit with status 2 (bad usage)."""
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    raise typer.Exit(2)


def parse_pairs(pairs: list[str], flag: str = "--option") -> dict:
    """``FLAG KEY=VALUE`` pairs as a dict. A value is read as JSON when it
    parses (``8``, ``true``, ``[1,2]``) and kept as text otherwise; dashes in
    keys become underscores, so ``max-tokens`` and ``max_tokens`` agree."""
    options: dict = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            fail(f"{flag} expects KEY=VALUE, got {pair!r}")
        try:
            options[key.replace("-", "_")] = json.loads(value)
        except json.JSONDecodeError:
            options[key.replace("-", "_")] = value
    return options
