"""Helpers for the tests marked ``vllm`` (this module holds no tests).

``vllm_engine`` builds piscale's in-process vLLM engine (``vllm.LLM``);
``vllm_server`` runs vLLM's OpenAI-compatible server in a subprocess of its
own process group on a free loopback port, waits until ``/health`` answers,
and stops the whole group (the API server, its engine core and workers) at
the end. ``model_folder`` gives the transformers-layout folder vLLM loads:
the copy of SmolLM2-135M that piscale's hf engine de-quantises from the
catalog GGUF into ``$PISCALE_HOME/converted/``, made on first use.

The server runs on the CPU build of vLLM with few threads, so that it shares
a small machine; ``PISCALE_VLLM_THREADS`` (default 1) and
``PISCALE_VLLM_KVCACHE_GB`` (default 2: two servers and the in-process
engine at once fit a machine shared with other work) change that.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import os
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

from piscale.serve.process import free_port, wait_until_answering

MODEL_NAME = "smollm2"
"""The name the test server gives the model (``--served-model-name``)."""


def vllm_missing() -> str | None:
    """Why vLLM cannot run in this interpreter, or None when it can."""
    if importlib.util.find_spec("vllm") is None:
        return f"vLLM is not installed in {sys.executable} (make test-vllm installs it in .venv-vllm)"
    return None


def model_folder(dtype: str = "float32") -> Path:
    """SmolLM2-135M-Instruct in the transformers layout, converted from the
    catalog GGUF by the hf engine when it is not there yet."""
    from piscale.models import SMALL_MODEL, converted_path, load_transformers, resolve

    folder = converted_path(resolve(SMALL_MODEL), dtype)
    if not (folder / "config.json").is_file():
        load_transformers(SMALL_MODEL, device="cpu", dtype=dtype)
    return folder


@dataclasses.dataclass(frozen=True)
class VLLMServer:
    root: str
    """``http://127.0.0.1:PORT``: /health, /metrics, /tokenize."""
    model: str
    folder: Path
    pid: int

    @property
    def base_url(self) -> str:
        return self.root + "/v1"

    @property
    def spec(self) -> str:
        return f"openai:{self.model}@{self.base_url}"


def server_command(folder: Path, port: int, model: str = MODEL_NAME, *extra: str) -> list[str]:
    return [
        sys.executable, "-m", "vllm.entrypoints.openai.api_server",
        "--model", str(folder), "--served-model-name", model,
        "--dtype", "float32", "--enforce-eager", "--enable-prefix-caching",
        # usage.prompt_tokens_details.cached_tokens in every answer
        "--enable-prompt-tokens-details",
        "--max-model-len", "2048",
        "--host", "127.0.0.1", "--port", str(port),
        *extra,
    ]


def server_environment(threads: int | None = None) -> dict[str, str]:
    threads = threads or int(os.environ.get("PISCALE_VLLM_THREADS", "1"))
    return {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "VLLM_CPU_KVCACHE_SPACE": os.environ.get("PISCALE_VLLM_KVCACHE_GB", "2"),
        # vLLM's CPU backend otherwise pins one OpenMP thread to every core
        "VLLM_CPU_OMP_THREADS_BIND": "nobind",
        "OMP_NUM_THREADS": str(threads),
        "VLLM_NO_USAGE_STATS": "1",
    }


def stop_group(process: subprocess.Popen, grace_s: float = 30.0) -> None:
    """SIGTERM to the process group that ``process`` leads, then SIGKILL to
    what is left of it after ``grace_s``."""
    if process.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            pass
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)  # the engine core and workers, if they outlived the API server
    process.wait()


@contextlib.contextmanager
def vllm_engine(folder: Path, threads: int | None = None, **options) -> Iterator:
    """piscale's in-process vLLM engine (``piscale.lm.vllm.VLLMLM``) on
    ``folder``, with the server's environment (a smaller KV cache:
    ``PISCALE_VLLM_ENGINE_KVCACHE_GB``, default 2); its engine core stops at
    the end. ``options`` go to ``vllm.LLM`` beside the defaults."""
    import asyncio

    from piscale.lm.vllm import VLLMLM

    environment = server_environment(threads)
    environment["VLLM_CPU_KVCACHE_SPACE"] = os.environ.get("PISCALE_VLLM_ENGINE_KVCACHE_GB", "2")
    saved = {name: os.environ.get(name) for name in environment}
    os.environ.update(environment)
    try:
        engine = VLLMLM(folder, name=MODEL_NAME, **{"dtype": "float32", "enforce_eager": True, "max_model_len": 2048, **options})
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
    try:
        yield engine
    finally:
        asyncio.run(engine.close())


@contextlib.contextmanager
def vllm_server(
    folder: Path, *extra: str, model: str = MODEL_NAME, threads: int | None = None, startup_s: float = 600.0
) -> Iterator[VLLMServer]:
    """vLLM's OpenAI server on ``folder``; yields it once /health answers."""
    port = free_port()
    log = tempfile.TemporaryFile(mode="w+")
    process = subprocess.Popen(
        server_command(folder, port, model, *extra),
        env=server_environment(threads),
        stdout=log,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,  # its own process group, stopped as one
    )
    root = f"http://127.0.0.1:{port}"
    try:
        wait_until_answering(root + "/health", startup_s, process, log)
        yield VLLMServer(root, model, folder, process.pid)
    finally:
        stop_group(process)
        log.close()
