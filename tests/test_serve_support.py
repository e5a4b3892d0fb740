"""Helpers for the server tests (this module holds no tests).

``serve_subprocess`` starts ``piscale serve`` in a subprocess on a free
loopback port and waits until it answers /health; ``serve_in_thread`` runs an
app (with a backend built in the test) under uvicorn in a thread, for tests
that need a backend the command line cannot build (a deliberately slow one).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from typing import IO

import httpx

from piscale.lm.toy import ToyLM
from piscale.serve.metrics import parse_metrics


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_healthy(base: str, deadline_s: float, process: subprocess.Popen | None = None, log: IO[str] | None = None,
                 probe: str = "/health") -> None:
    """Until ``base + probe`` answers 200; fails with the server's log if it exits first."""
    deadline = time.monotonic() + deadline_s
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            output = ""
            if log is not None:
                log.seek(0)
                output = log.read()[-4000:]
            raise RuntimeError(f"the server exited with status {process.returncode}:\n{output}")
        try:
            if httpx.get(base + probe, timeout=1.0).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise RuntimeError(f"the server at {base} did not become healthy within {deadline_s} s")


@contextlib.contextmanager
def server_subprocess(command: list[str], base: str, *, probe: str = "/health", startup_s: float = 120.0,
                      env: dict[str, str] | None = None) -> Iterator[str]:
    """Run a server ``command`` until ``base + probe`` answers; yields ``base``
    and stops the server afterwards."""
    # The log goes to a file, not a pipe: a pipe nobody reads fills up and
    # blocks the server.
    log = tempfile.TemporaryFile(mode="w+")
    process = subprocess.Popen(command, env={**os.environ, **(env or {})}, stdout=subprocess.DEVNULL, stderr=log, text=True)
    try:
        wait_healthy(base, startup_s, process, log, probe)
        yield base
    finally:
        process.terminate()
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        log.close()


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
        wait_healthy(base, 30.0)
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
