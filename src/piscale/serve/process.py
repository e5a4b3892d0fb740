"""Starting an HTTP server as a subprocess and waiting until it answers: for
scripts and benchmarks that drive ``piscale serve`` or another
OpenAI-compatible server (``python -m llama_cpp.server``, vLLM) over HTTP."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from typing import IO

import httpx


def free_port() -> int:
    """A loopback port that was free a moment ago."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_until_answering(
    url: str, deadline_s: float, process: subprocess.Popen | None = None, log: IO[str] | None = None
) -> float:
    """Poll ``url`` until it answers 200 and return the seconds waited.

    Raises ``RuntimeError`` with the tail of ``log`` when ``process`` exits
    first, and when ``deadline_s`` passes."""
    start = time.monotonic()
    while time.monotonic() - start < deadline_s:
        if process is not None and process.poll() is not None:
            output = ""
            if log is not None:
                log.seek(0)
                output = log.read()[-4000:]
            raise RuntimeError(f"the server exited with status {process.returncode}:\n{output}")
        try:
            if httpx.get(url, timeout=1.0).status_code == 200:
                return time.monotonic() - start
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise RuntimeError(f"{url} did not answer within {deadline_s} s")


@contextlib.contextmanager
def server_process(
    command: list[str], probe_url: str, *, startup_s: float = 120.0, env: dict[str, str] | None = None
) -> Iterator[float]:
    """Run ``command`` until ``probe_url`` answers, yield the startup seconds,
    and stop the server on exit (terminate, then kill after 15 s)."""
    # The server's log goes to a file, not a pipe: a pipe nobody reads fills
    # up and blocks the server (llama.cpp logs a lot).
    log = tempfile.TemporaryFile(mode="w+")
    process = subprocess.Popen(command, env={**os.environ, **(env or {})}, stdout=subprocess.DEVNULL, stderr=log, text=True)
    try:
        yield wait_until_answering(probe_url, startup_s, process, log)
    finally:
        process.terminate()
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        log.close()
