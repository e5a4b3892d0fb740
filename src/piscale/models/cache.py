"""Where models live on this machine: the cache root (``$PISCALE_HOME``),
the path of a pulled catalog model and the marker that records its verified
sha256, file hashing, and the lock and atomic writes that keep the cache
whole when processes share it or are killed.

A pulled file has two records beside it: ``<file>.sha256`` (the catalog's
hash, in ``sha256sum`` format, written once the file hashed to it) and
``<file>.verified``, the file's size, modification time, inode and device
when it was last hashed. Using a cached model costs one ``stat``: while that
matches the record the file is the one that was hashed; when it does not (the
file was written to, replaced or copied), the file is hashed again before it
is used, and a file whose hash is no longer the catalog's is refused
(``ModelIntegrityError``), never used under the catalog's identity.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

from piscale.models.catalog import CatalogModel, catalog_model
from piscale.models.errors import ModelIntegrityError

HOME_ENV = "PISCALE_HOME"
DEFAULT_HOME = Path("~/.cache/piscale")

_BLOCK = 1 << 20  # bytes copied and hashed per read


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


def _record_path(path: Path) -> Path:
    return path.with_name(path.name + ".verified")


def _stat_record(path: Path, sha256: str) -> dict[str, int | str]:
    stat = path.stat()
    return {
        "sha256": sha256,
        "size": stat.st_size,
        "mtime_ns": stat.st_mtime_ns,
        "inode": stat.st_ino,
        "device": stat.st_dev,
    }


def _write_records(path: Path, entry: CatalogModel) -> None:
    """Mark ``path`` as hashing to the catalog's sha256, as it is now."""
    _write_atomically(_marker_path(path), _marker_text(entry.sha256, entry.filename))
    _write_atomically(_record_path(path), json.dumps(_stat_record(path, entry.sha256)) + "\n")


def _marked(path: Path, entry: CatalogModel) -> bool:
    try:
        return _marker_path(path).read_text() == _marker_text(entry.sha256, entry.filename)
    except OSError:
        return False


def is_pulled(model: str | CatalogModel, *, home: str | os.PathLike[str] | None = None) -> bool:
    """Whether a verified copy is in the cache, unchanged since it was hashed:
    its marker records the catalog's sha256 and its size, modification time,
    inode and device are those recorded then (one ``stat``, no hashing)."""
    entry = model if isinstance(model, CatalogModel) else catalog_model(model)
    path = model_path(entry, home=home)
    try:
        if path.stat().st_size != entry.size or not _marked(path, entry):
            return False
        return json.loads(_record_path(path).read_text()) == _stat_record(path, entry.sha256)
    except (OSError, ValueError):
        return False


def check_cached(
    model: str | CatalogModel,
    *,
    home: str | os.PathLike[str] | None = None,
    rehash: bool = False,
    progress: Callable[[int], None] | None = None,
) -> bool:
    """Whether the cache holds a verified copy: False when it holds none (or
    a file that was never verified); True when the file is unchanged since it
    was hashed (``is_pulled``), or, with ``rehash`` or when it changed,
    hashes to the catalog's sha256 now (the records are then renewed).
    Raises ``ModelIntegrityError`` when a file once verified no longer hashes
    right. ``progress`` gets the bytes hashed so far."""
    entry = model if isinstance(model, CatalogModel) else catalog_model(model)
    path = model_path(entry, home=home)
    if not path.exists() or not _marked(path, entry):
        return False
    if not rehash and is_pulled(entry, home=home):
        return True
    size = path.stat().st_size
    sha256 = file_sha256(path, progress) if size == entry.size else None
    if sha256 != entry.sha256:
        found = f"sha256 {sha256}" if sha256 is not None else f"{size} bytes, not {entry.size}"
        raise ModelIntegrityError(
            f"{entry.name}: the cached file {path} was changed after it was verified ({found}; "
            f"the catalog's sha256 is {entry.sha256}); it is not used. "
            f"Run `piscale models pull {entry.name}` to fetch it again."
        )
    _write_records(path, entry)
    return True


def forget(model: str | CatalogModel, *, home: str | os.PathLike[str] | None = None) -> None:
    """Remove a cached file and its records (a damaged copy, before pulling again)."""
    entry = model if isinstance(model, CatalogModel) else catalog_model(model)
    path = model_path(entry, home=home)
    for stale in (_record_path(path), _marker_path(path), path):
        with contextlib.suppress(FileNotFoundError):
            stale.unlink()


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
