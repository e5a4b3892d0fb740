"""Tests that need an optional extra skip without it, except where the run
says the extra must be there: CI lists the extras it installed in
PISCALE_REQUIRE_EXTRAS (``.ci/run``), and there a missing one fails the test
instead of skipping it, so that a broken install cannot pass unseen."""

from __future__ import annotations

import importlib
import os
from types import ModuleType

import pytest


def need(module: str, extra: str) -> ModuleType:
    """``module``, imported; a skip when it is missing, or a failure when
    ``extra`` is one of the extras this run requires."""
    try:
        return importlib.import_module(module)
    except ImportError as error:
        required = {name.strip() for name in os.environ.get("PISCALE_REQUIRE_EXTRAS", "").split(",")}
        message = f"{module} is missing: install the {extra} extra (pip install 'piscale[{extra}]')"
        if extra in required:
            pytest.fail(f"{message}; this run requires it ({error})")
        pytest.skip(message)
