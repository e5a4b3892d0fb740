"""The ``piscale`` command.

Each command group lives in its own module with a ``register(app)`` function;
modules import heavy libraries (torch, transformers) inside their commands so
that ``piscale --help`` stays fast.
"""

from __future__ import annotations

import importlib

import typer

app = typer.Typer(
    name="piscale",
    help="Probabilistic inference-time scaling of language models.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

_COMMAND_MODULES = (
    "main", "models", "trace", "score", "eval", "annotate", "distill", "sft", "serve", "values", "narrative", "bias"
)

for _name in _COMMAND_MODULES:
    try:
        _module = importlib.import_module(f"piscale.cli.{_name}")
    except ModuleNotFoundError as error:
        if error.name != f"piscale.cli.{_name}":
            raise
        continue
    _module.register(app)
