"""Admission by engine capacity.

Some engines hold a fixed number of sequences (llama.cpp: ``max_sequences``
cache slots, allocated up front). A request that would need more slots than
are free must wait rather than fail half-way, and must not take slots from
the requests already running. The gate admits a request when the sequences
it may hold at once (its ``need``: the choices of plain generation, the
budget of a search, which bounds the particles alive at once in every
algorithm) fit under the limit; the others wait in arrival order, so a large
request is not starved by a stream of small ones. The limit is the server's
``max_sequences`` for every engine, lowered to what fits in an engine's cache
slots where it has a fixed number.

At most ``max_queue`` requests wait; one more is turned away at once
(``GateFull``: the server answers 429) rather than queued without end.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import AsyncIterator


class GateFull(Exception):
    """The request would wait, and ``max_queue`` requests wait already."""


class SequenceGate:
    def __init__(self, limit: int | None, max_queue: int | None = None):
        self.limit = limit
        self.max_queue = max_queue
        self.in_use = 0
        self._waiting: deque[tuple[int, asyncio.Future[None]]] = deque()

    @property
    def waiting(self) -> int:
        return sum(1 for _, future in self._waiting if not future.done())

    def _must_wait(self, need: int) -> bool:
        return self.limit is not None and (bool(self._waiting) or self.in_use + need > self.limit)

    def check_room(self, need: int) -> None:
        """``GateFull`` when a request needing ``need`` would have to wait
        and the queue is full (checked again on admission)."""
        if self.max_queue is not None and self._must_wait(need) and self.waiting >= self.max_queue:
            raise GateFull(
                f"the server is full: {self.waiting} requests are waiting for room already; retry later"
            )

    @contextlib.asynccontextmanager
    async def admitted(self, need: int) -> AsyncIterator[None]:
        """Hold ``need`` sequences of capacity for the body of the block."""
        if self.limit is None:
            yield
            return
        if need > self.limit:
            raise ValueError(f"needs {need} sequences at once, more than the {self.limit} this engine can hold")
        if self._must_wait(need):
            self.check_room(need)
            future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            self._waiting.append((need, future))
            try:
                await future
            except asyncio.CancelledError:
                if future.done() and not future.cancelled():
                    self.in_use -= need  # admitted just as it was cancelled
                self._admit()
                raise
        else:
            self.in_use += need
        try:
            yield
        finally:
            self.in_use -= need
            self._admit()

    def _admit(self) -> None:
        while self._waiting:
            need, future = self._waiting[0]
            if future.done():  # cancelled while waiting
                self._waiting.popleft()
                continue
            if self.in_use + need > self.limit:  # type: ignore[operator]
                return
            self._waiting.popleft()
            self.in_use += need
            future.set_result(None)
