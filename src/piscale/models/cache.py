"""Where models live on this machine: the cache root (``$PISCALE_HOME``),
the path of a pulled catalog model and the marker that records its verified
sha256, file hashing, and the lock and atomic writes that keep the cache
whole when processes share it or are killed."""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

from piscale.models.catalog import CatalogModel, catalog_model

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
