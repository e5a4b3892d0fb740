"""Data sets that travel with the package.

The evaluation tasks (MATH500, GSM8K test and train, AIME 2024, AMC 2023) and
the fairy-tale corpus are shipped inside the package as gzip-compressed JSON
lines, so that every clone and every installed wheel has them. ``manifest.json``
beside this file is the one place that names them: file, kind (``task`` or
``corpus``), number of records, a description, and the sha256 of the
*uncompressed* text. Every read checks that hash, so a damaged or edited file
is an error rather than a silently different benchmark.
"""

from __future__ import annotations

import gzip
import hashlib
import json
from functools import lru_cache
from importlib import resources
from typing import Any

__all__ = ["DataError", "manifest", "names", "read_text"]


class DataError(ValueError):
    """A packaged data set is unknown, missing or does not match its hash."""


@lru_cache(maxsize=1)
def manifest() -> dict[str, dict[str, Any]]:
    """name -> {file, kind, records, sha256, description}."""
    return json.loads(resources.files(__name__).joinpath("manifest.json").read_text(encoding="utf-8"))


def names(kind: str | None = None) -> list[str]:
    """The packaged data sets, optionally only those of one ``kind``."""
    return [name for name, entry in manifest().items() if kind is None or entry["kind"] == kind]


@lru_cache(maxsize=8)
def read_text(name: str) -> str:
    """The uncompressed text of a packaged data set, checked against the
    manifest's sha256."""
    entries = manifest()
    if name not in entries:
        raise DataError(f"no packaged data set {name!r}; there are: {', '.join(entries)}")
    entry = entries[name]
    resource = resources.files(__name__).joinpath(entry["file"])
    if not resource.is_file():
        raise DataError(f"the packaged file {entry['file']} of {name!r} is missing; reinstall piscale")
    raw = gzip.decompress(resource.read_bytes())
    digest = hashlib.sha256(raw).hexdigest()
    if digest != entry["sha256"]:
        raise DataError(
            f"the packaged file {entry['file']} of {name!r} has sha256 {digest}, "
            f"the manifest says {entry['sha256']}; reinstall piscale"
        )
    return raw.decode("utf-8")
