"""Helpers for the server tests (this module holds no tests).

``serve_subprocess`` starts ``piscale serve`` in a subprocess on a free
loopback port and waits until it answers /health; ``serve_in_thread`` runs an
app (with a backend built in the test) under uvicorn in a thread, for tests
that need a backend the command line cannot build (a deliberately slow one).
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
import threading
from collections.abc import Iterator

import httpx

from piscale.lm.toy import ToyLM
from piscale.serve.metrics import parse_metrics
from piscale.serve.process import free_port, server_process, wait_until_answering


@contextlib.contextmanager
def server_subprocess(command: list[str], base: str, *, probe: str = "/health", startup_s: float = 120.0,
                      env: dict[str, str] | None = None) -> Iterator[str]:
    """Run a server ``command`` until ``base + probe`` answers; yields ``base``
    and stops the server afterwards."""
    with server_process(command, base + probe, startup_s=startup_s, env=env):
        yield base


@contextlib.contextmanager
def serve_subprocess(*args: str, env: dict[str, str] | None = None, startup_s: float = 120.0) -> Iterator[str]:
    """``piscale serve ARGS --port P``; yields ``http://127.0.0.1:P``."""
    port = free_port()
    command = [sys.executable, "-c", "from piscale.cli import app; app()", "serve", *args, "--port", str(port), "--log-level", "warning"]
    with server_subprocess(command, f"http://127.0.0.1:{port}", startup_s=startup_s, env=env) as base:
        yield base


@contextlib.contextmanager
def serve_in_thread(app) -> Iterator[str]:
    """Run ``app`` under uvicorn in a background thread."""
    import uvicorn

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    base = f"http://127.0.0.1:{port}"
    try:
        wait_until_answering(base + "/health", 30.0)
        yield base
    finally:
        server.should_exit = True
        thread.join(timeout=15)


def metrics(base: str) -> dict[str, float]:
    return parse_metrics(httpx.get(base + "/metrics", timeout=10).text)


def toy_plain(prompt_ids: list[int], seed: int, max_tokens: int, temperature: float = 1.0, stop: tuple[str, ...] = ()):
    """What plain generation must return: one step of a fresh toy model."""
    from piscale.lm.base import StepParams

    async def step():
        lm = ToyLM()
        [[handle]] = await lm.open([prompt_ids])
        [output] = await lm.extend([handle], StepParams(max_tokens=max_tokens, stop=stop, temperature=temperature), [seed])
        return output

    return asyncio.run(step())
