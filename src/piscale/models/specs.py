"""Resolving a model spec to a model on this machine.

Anywhere piscale takes a model, a *spec* may be

* a catalog name (``smollm2-135m-instruct``), pulled on first use;
* a path to a ``.gguf`` file;
* a local folder: Hugging Face format (``config.json`` plus weights) or a
  folder holding exactly one ``.gguf`` file;
* a hub id (``org/name``), for users who have a hub or a populated cache.

``resolve`` turns a spec into a ``ResolvedModel`` with a stable ``identity``
(the sha256 for GGUF files), which caches and the evaluation database key on.
``gguf_path`` gives the file for llama.cpp.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from piscale.models.cache import _marker_path, _write_atomically, file_sha256, model_path, piscale_home
from piscale.models.catalog import CATALOG
from piscale.models.errors import ModelError, ModelNotFoundError
from piscale.models.pulling import Progress, pull

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
        # Using a cached model costs a stat; the file is hashed again only
        # when it changed since it was verified, and refused if it hashes wrong.
        path = pull(entry, home=root, progress=progress, rehash=False) if download else model_path(entry, home=root)
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
