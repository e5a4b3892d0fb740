"""Admission by engine capacity.

Some engines hold a fixed number of sequences (llama.cpp: ``max_sequences``
cache slots, allocated up front). A request that would need more slots than
are free must wait rather than fail half-way, and must not take slots from
the requests already running. The gate admits a request when the sequences
it may hold at once (its ``need``: the choices of plain generation, the
budget of a search, which bounds the particles alive at once in every
algorithm) fit under the limit; the others wait in arrival order, so a large
request is not starved by a stream of small ones. Engines without a fixed
capacity (the transformers engine grows its cache, the toy model) get no
limit.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import AsyncIterator


class SequenceGate:
    def __init__(self, limit: int | None):
        self.limit = limit
        self.in_use = 0
        self._waiting: deque[tuple[int, asyncio.Future[None]]] = deque()

    @property
    def waiting(self) -> int:
        return sum(1 for _, future in self._waiting if not future.done())

    @contextlib.asynccontextmanager
    async def admitted(self, need: int) -> AsyncIterator[None]:
        """Hold ``need`` sequences of capacity for the body of the block."""
        if self.limit is None:
            yield
            return
        if need > self.limit:
            raise ValueError(f"needs {need} sequences at once, more than the {self.limit} this engine can hold")
        if self._waiting or self.in_use + need > self.limit:
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
