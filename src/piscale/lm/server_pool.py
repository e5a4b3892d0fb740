"""The HTTP side of a backend over OpenAI-compatible servers.

``piscale.lm.openai.OpenAILM`` builds completion requests and reads their
answers; a ``ServerPool`` carries them. It holds the replicas of one model
(one server or several), a client and a concurrency gate per replica in the
running event loop, and a blocking client for the calls the backend protocol
makes synchronous (tokenization). Transient failures (connection errors,
408, 429, 5xx) are retried with jittered exponential backoff; any other
failure raises ``ServerError`` with the server's own message. The pool
counts what crossed the wire: the time with at least one request in flight
(``Usage.wall_time`` of the backend), the requests per replica, and the
growth of each server's forward-pass counter on its ``/metrics``.
"""

from __future__ import annotations

import asyncio
import random
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import httpx

from piscale.lm.base import Usage

TRANSIENT_STATUSES = frozenset({408, 409, 425, 429, 500, 502, 503, 504})
PASS_COUNTERS = ("vllm:iteration_tokens_total_count", "piscale_engine_forward_passes_total")
"""Prometheus samples that count a server's forward passes: vLLM's histogram
of tokens per engine iteration (its count is the iterations), and
``piscale serve``'s counter."""
_METRIC_LINE = re.compile(r"^(?P<name>[A-Za-z_:][A-Za-z0-9_:]*)(?:\{[^}]*\})?\s+(?P<value>\S+)")


class ServerError(RuntimeError):
    """A request to the server failed (after retries, for transient errors)."""

    def __init__(self, message: str, status: int | None = None):
        super().__init__(message)
        self.status = status


@dataclass
class ServerUsage:
    """What the servers reported doing for this backend, summed over replicas."""

    requests: int = 0
    """completion requests answered (retries not counted)."""
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    """prompt tokens the servers found in their prefix caches (only from
    servers that report it)."""
    requests_by_replica: list[int] | None = None

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass
class Replica:
    base_url: str
    root_url: str
    live: int = 0
    """sequences routed here that are still open."""
    in_flight: int = 0
    requests: int = 0
    passes_seen: float | None = None
    """the server's pass counter at its last reading."""
    pass_counter: str | None = ""
    """the /metrics sample that counts its passes; "" not yet looked for,
    None when it has none."""
    lock: asyncio.Lock | None = None


class ServerPool:
    """The replicas of one model and the clients that reach them.

    ``urls``: each replica's OpenAI root (ending in ``/v1``), checked and
    without a trailing slash. ``usage``: the backend's counters, whose
    ``wall_time`` the pool adds to. ``transport``: an httpx transport
    (tests)."""

    def __init__(
        self,
        urls: Sequence[str],
        *,
        usage: Usage,
        api_key: str | None = None,
        max_concurrency: int = 64,
        max_retries: int = 4,
        retry_backoff: float = 0.5,
        timeout: float = 600.0,
        transport: httpx.AsyncBaseTransport | None = None,
    ):
        self.replicas = [Replica(url, re.sub(r"/v1$", "", url)) for url in urls]
        self.usage = usage
        self.server_usage = ServerUsage(requests_by_replica=[0] * len(self.replicas))
        self.api_key = api_key
        self.max_concurrency = max_concurrency
        self.max_retries = max_retries
        self.retry_backoff = retry_backoff
        self.timeout = timeout
        self.transport = transport
        self.retries = 0
        """transient failures that were retried."""
        self._loop: asyncio.AbstractEventLoop | None = None
        self._client: httpx.AsyncClient | None = None
        self._gates: list[asyncio.Semaphore] | None = None
        self._sync: httpx.Client | None = None
        self._jitter = random.Random(0)
        self._in_flight = 0
        self._busy_since = 0.0

    def _headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    def async_client(self, replica: int = 0) -> tuple[httpx.AsyncClient, asyncio.Semaphore]:
        """The client and the concurrency gate of ``replica`` in the running
        event loop (all belong to one loop, so a new loop gets new ones)."""
        loop = asyncio.get_running_loop()
        if self._loop is not loop or self._client is None or self._gates is None:
            size = self.max_concurrency * len(self.replicas)
            limits = httpx.Limits(max_connections=size, max_keepalive_connections=size)
            self._client = httpx.AsyncClient(
                headers=self._headers(), timeout=self.timeout, limits=limits, transport=self.transport
            )
            self._gates = [asyncio.Semaphore(self.max_concurrency) for _ in self.replicas]
            for target in self.replicas:
                target.lock = asyncio.Lock()
            self._loop = loop
        return self._client, self._gates[replica]

    def sync_client(self) -> httpx.Client:
        """A blocking client, for the calls the backend protocol makes synchronous."""
        if self._sync is None:
            self._sync = httpx.Client(headers=self._headers(), timeout=self.timeout)
        return self._sync

    async def post(self, url: str, body: dict[str, Any], replica: int = 0) -> dict[str, Any]:
        """POST to ``replicas[replica]`` with retries of transient failures;
        ServerError otherwise. The time with any request in flight is the
        backend's ``wall_time``."""
        client, gate = self.async_client(replica)
        target = self.replicas[replica]
        target.in_flight += 1
        if self._in_flight == 0:
            self._busy_since = time.perf_counter()
        self._in_flight += 1
        try:
            data = await self._post_with_retries(client, gate, url, body)
        finally:
            target.in_flight -= 1
            self._in_flight -= 1
            if self._in_flight == 0:
                self.usage.wall_time += time.perf_counter() - self._busy_since
        target.requests += 1
        self.server_usage.requests += 1
        assert self.server_usage.requests_by_replica is not None
        self.server_usage.requests_by_replica[replica] += 1
        return data

    async def _post_with_retries(
        self, client: httpx.AsyncClient, gate: asyncio.Semaphore, url: str, body: dict[str, Any]
    ) -> dict[str, Any]:
        failure = "no attempt made"
        async with gate:
            for attempt in range(self.max_retries + 1):
                if attempt:
                    self.retries += 1
                    await asyncio.sleep(self.retry_backoff * 2 ** (attempt - 1) * (0.5 + self._jitter.random()))
                try:
                    response = await client.post(url, json=body)
                except httpx.TransportError as error:
                    failure = f"{type(error).__name__}: {error}"
                    continue
                if response.status_code == 200:
                    try:
                        return response.json()
                    except ValueError:
                        raise ServerError(f"{url} answered 200 with a body that is not JSON", 200) from None
                failure = f"HTTP {response.status_code}: {error_message(response)}"
                if response.status_code not in TRANSIENT_STATUSES:
                    raise ServerError(f"{url}: {failure}", response.status_code)
        raise ServerError(f"{url}: {failure} (after {self.max_retries + 1} attempts)")

    def sync_post(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        """A blocking POST to the first replica's root + ``path``, with the
        same retries; ServerError names the URL and the last failure."""
        client = self.sync_client()
        url = self.replicas[0].root_url + path
        failure = ""
        for attempt in range(self.max_retries + 1):
            if attempt:
                time.sleep(self.retry_backoff * 2 ** (attempt - 1))
            try:
                response = client.post(url, json=body)
            except httpx.TransportError as error:
                failure = f"{type(error).__name__}: {error}"
                continue
            if response.status_code == 200:
                return response.json()
            failure = f"HTTP {response.status_code}: {error_message(response)}"
            if response.status_code not in TRANSIENT_STATUSES:
                break
        raise ServerError(f"{url} failed ({failure})")

    async def read_passes(self, replicas: set[int], baseline: bool) -> float:
        """Read the pass counter of each of ``replicas`` from its /metrics and
        return how much it grew since the last reading (with ``baseline``,
        only replicas never read are read, to start their count). A replica
        without a counter is marked so and not asked again."""
        client, _ = self.async_client()
        grown = 0.0
        for replica in sorted(replicas):
            target = self.replicas[replica]
            if target.pass_counter is None or (baseline and target.passes_seen is not None):
                continue
            assert target.lock is not None
            async with target.lock:
                try:
                    response = await client.get(target.root_url + "/metrics")
                    samples = parse_metrics(response.text) if response.status_code == 200 else {}
                except httpx.HTTPError:
                    continue  # unreachable now; the next reading covers this call too
                except ValueError:
                    samples = {}  # not metrics that can be read
                counter = target.pass_counter or next((c for c in PASS_COUNTERS if c in samples), None)
                if counter is None or counter not in samples:
                    target.pass_counter = None
                    continue
                target.pass_counter = counter
                value = samples[counter]
                if target.passes_seen is not None and value >= target.passes_seen:
                    grown += value - target.passes_seen
                target.passes_seen = value
        return grown

    async def close(self) -> None:
        if self._client is not None:
            try:
                await self._client.aclose()
            except RuntimeError:
                pass  # its event loop is gone
            self._client = None
        if self._sync is not None:
            self._sync.close()
            self._sync = None


def parse_metrics(text: str) -> dict[str, float]:
    """Prometheus text: each sample name with its values summed over labels."""
    samples: dict[str, float] = {}
    for line in text.splitlines():
        match = _METRIC_LINE.match(line)
        if match is None:
            continue
        try:
            value = float(match["value"])
        except ValueError:
            continue
        samples[match["name"]] = samples.get(match["name"], 0.0) + value
    return samples


def error_message(response: httpx.Response) -> str:
    """The server's own words for a failed request, wherever it put them."""
    try:
        data = response.json()
    except ValueError:
        return response.text[:300]
    if isinstance(data, dict):
        error = data.get("error")
        if isinstance(error, dict) and error.get("message"):
            return str(error["message"])
        if isinstance(error, str):
            return error
        if "detail" in data:
            return str(data["detail"])
        if "message" in data:
            return str(data["message"])
    return str(data)[:300]
