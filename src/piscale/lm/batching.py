"""Continuous batching: one scheduler for the engines that decode token by
token in this process (transformers, llama.cpp).

Every ``extend`` call submits a ``Request``: its sequences, each an ``Active``
member that collects its step's tokens until the step ends. One loop runs
while any request has unfinished members. Before each pass it takes in the
requests that arrived meanwhile, so that concurrent calls join the same
forward passes between two tokens; a pass advances every unfinished member of
every request by one token; a request whose members have all finished gets
its outputs, and a request whose caller went away (a cancelled future) is
dropped, its sequences freed for the caller to release.

Failures stay with their own sequence where the engine can tell whose they
are: an engine that fails to sample one member (``Active.fail``) leaves that
sequence as it was before the pass, and the request holding it fails alone,
with that error, while every other request goes on. A pass that fails as a
whole (the forward pass itself) fails every request in flight and leaves the
engine usable.

An engine gives the pass (``_decode_pass``), and may give a pause between
passes (``_between_passes``).

An engine whose own code decodes a whole step for many sequences at once
(the toy model) batches at the step instead: ``MergedCalls`` runs the
``extend`` calls in flight as one call of the engine, on a worker thread.
"""

from __future__ import annotations

import abc
import asyncio
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from piscale.lm.base import FinishReason, Handle, StepOutput, StepParams
from piscale.lm.table import TableLM


@dataclass
class Active:
    """One sequence being extended by one ``extend`` call."""

    handle: Handle
    params: StepParams
    rng: Any
    """the member's own random source (a ``torch.Generator`` or a numpy
    ``Generator``), or None for greedy decoding."""
    new_tokens: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    text: str = ""
    finish_reason: FinishReason | None = None
    error: Exception | None = None
    """why this member failed; its request fails with it after the pass."""

    def fail(self, error: Exception) -> None:
        """Take this member out of the passes; its request fails with ``error``."""
        self.error = error
        self.finish_reason = "error"

    def output(self) -> StepOutput:
        """The finished step."""
        assert self.finish_reason is not None, "the step has not finished"
        return StepOutput(self.new_tokens, self.text, self.logprobs, self.finish_reason)


@dataclass
class Request:
    members: list[Active]
    future: asyncio.Future


class BatchingLM(TableLM):
    """A ``TableLM`` whose ``extend`` calls share decoding passes."""

    _waiting: list[Request]
    """requests submitted since the loop last took them in (an engine's
    constructor makes it empty)"""
    _loop_running: bool = False

    async def _submit(self, members: list[Active]) -> list[StepOutput]:
        """Mark ``members`` busy and decode them to the end of their step,
        in passes shared with every other call in flight."""
        for member in members:
            self._sequences[member.handle].busy = True
        self.usage.calls += 1
        loop = asyncio.get_running_loop()
        request = Request(members, loop.create_future())
        self._waiting.append(request)
        if not self._loop_running:
            self._loop_running = True
            loop.create_task(self._decode_loop())
        return await request.future

    @abc.abstractmethod
    async def _decode_pass(self, members: list[Active]) -> None:
        """One token for every member (none of them finished)."""

    async def _between_passes(self) -> None:
        """Runs after each pass's finished requests are answered."""

    def _finish(self, request: Request) -> None:
        for member in request.members:
            sequence = self._sequences.get(member.handle)
            if sequence is not None:
                sequence.busy = False

    async def _decode_loop(self) -> None:
        """Run passes while any ``extend`` call has unfinished sequences;
        calls that arrive meanwhile join at the next pass."""
        active: list[Request] = []
        try:
            while self._waiting or active:
                active.extend(self._waiting)
                self._waiting.clear()
                for request in [r for r in active if r.future.done()]:  # cancelled callers
                    self._finish(request)
                active = [r for r in active if not r.future.done()]
                if not active:
                    break
                members = [m for r in active for m in r.members if m.finish_reason is None]
                if members:
                    try:
                        await self._decode_pass(members)
                    except Exception as error:  # fail the requests, keep the engine usable
                        for request in active:
                            self._finish(request)
                            if not request.future.done():
                                request.future.set_exception(error)
                        active = []
                        continue
                still = []
                for request in active:
                    failed = next((m.error for m in request.members if m.error is not None), None)
                    if failed is not None:
                        self._finish(request)
                        if not request.future.done():
                            request.future.set_exception(failed)
                    elif all(m.finish_reason is not None for m in request.members):
                        self._finish(request)
                        if not request.future.done():
                            request.future.set_result([m.output() for m in request.members])
                    else:
                        still.append(request)
                active = still
                await self._between_passes()
        finally:
            self._loop_running = False


T = TypeVar("T")
R = TypeVar("R")


class MergedCalls(Generic[T, R]):
    """Concurrent calls merged into one call of a blocking engine function.

    Every call ``submit``s a request. The requests that arrive while no run
    is under way are run together, ``run(requests) -> one result each``, on a
    worker thread, so that the event loop stays free; those that arrive
    meanwhile make the next run, one run at a time. When a merged run fails,
    each of its requests is run again alone: a failure stays with the request
    that caused it. ``finished(request)`` runs on the event loop once a
    request's run is over, even when its caller has gone away (an engine
    frees what the request held).
    """

    def __init__(self, run: Callable[[list[T]], Sequence[R]], finished: Callable[[T], None] | None = None):
        self._run = run
        self._finished = finished
        self._queue: list[tuple[T, asyncio.Future]] = []
        self._running = False

    async def submit(self, request: T) -> R:
        future = asyncio.get_running_loop().create_future()
        self._queue.append((request, future))
        if not self._running:
            self._running = True
            asyncio.ensure_future(self._drain())
        return await future

    async def _drain(self) -> None:
        batch: list[tuple[T, asyncio.Future]] = []
        try:
            # Let every coroutine that is ready now submit first, so that
            # concurrent searches share a run.
            await asyncio.sleep(0)
            while self._queue:
                batch, self._queue = self._queue, []
                outcomes = await asyncio.to_thread(self._run_each, [request for request, _ in batch])
                for (request, future), outcome in zip(batch, outcomes):
                    self._settle(request, future, outcome)
                batch = []
        except BaseException:  # the loop is closing: no caller is left waiting
            for request, future in batch + self._queue:
                future.cancel()
                self._settle(request, future, None)
            self._queue = []
            raise
        finally:
            self._running = False

    def _settle(self, request: T, future: asyncio.Future, outcome: Any) -> None:
        if self._finished is not None:
            self._finished(request)
        if future.done():
            return
        if isinstance(outcome, BaseException):
            future.set_exception(outcome)
        else:
            future.set_result(outcome)

    def _run_each(self, requests: list[T]) -> list[R | Exception]:
        try:
            return list(self._run(requests))
        except Exception as error:
            if len(requests) == 1:
                return [error]
        outcomes: list[R | Exception] = []
        for request in requests:
            try:
                outcomes.append(self._run([request])[0])
            except Exception as error:
                outcomes.append(error)
        return outcomes
