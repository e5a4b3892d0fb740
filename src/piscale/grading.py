"""Final answers: extraction and equivalence.

The answer of a response is the content of its last ``\\boxed{...}`` (Puri et
al. 2025 grade this way); without a box, ``extract_answer`` returns None.
Equivalence is symbolic or numeric, through ``math-verify``: ``1/2``,
``\\frac{1}{2}`` and ``0.5`` are the same answer. This one module serves the
verifier reward, self-consistency voting and the evaluation harness.

A server grades in a ``GradingPool`` (``install_pool``): worker processes
with a hard time limit per grading, so that no answer can stall its event
loop; ``answers_equal_async`` and ``normalize_answer_async`` are the
comparison and the voting key that use it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import multiprocessing
import multiprocessing.process
import os
import re
import threading
from collections.abc import Callable
from functools import lru_cache
from multiprocessing.connection import Connection

from math_verify import parse, verify

log = logging.getLogger(__name__)

_BOX = re.compile(r"\\(?:boxed|fbox)\s*\{")


def extract_boxed(text: str) -> str | None:
    """Content of the last ``\\boxed{...}`` in ``text`` (nested braces allowed),
    or None when there is no complete box."""
    matches = list(_BOX.finditer(text))
    for match in reversed(matches):
        depth, start = 1, match.end()
        for i in range(start, len(text)):
            if text[i] == "{":
                depth += 1
            elif text[i] == "}":
                depth -= 1
                if depth == 0:
                    return text[start:i].strip()
    return None


def extract_answer(text: str) -> str | None:
    """The final answer of a response: its last boxed expression."""
    return extract_boxed(text)


def gsm8k_reference(solution: str) -> str:
    """The reference answer of a GSM8K solution: what follows ``####``."""
    if "####" not in solution:
        raise ValueError("a GSM8K solution must end with '#### ANSWER'")
    return solution.rsplit("####", 1)[1].strip().replace(",", "")


def _in_main_thread() -> bool:
    # math-verify's timeouts use SIGALRM, which only the main thread may set.
    return threading.current_thread() is threading.main_thread()


@lru_cache(maxsize=65536)
def _parse(expression: str, main: bool) -> tuple:
    # An escaped dollar (``\$18``) is a currency sign, not math mode.
    has_math_mode = re.search(r"(?<!\\)\$", expression) is not None
    wrapped = expression if has_math_mode or "\\boxed" in expression else f"${expression}$"
    parsed = parse(wrapped, parsing_timeout=5 if main else None)
    if not parsed:
        parsed = parse(expression, parsing_timeout=5 if main else None)
    return tuple(parsed)


def normalize_answer(answer: str) -> str:
    """A canonical string for voting: the parsed expression when math-verify
    understands it, else the stripped text without spaces."""
    parsed = _parse(answer, _in_main_thread())
    return str(parsed[0]) if parsed else _plain_key(answer)


def _plain_key(answer: str) -> str:
    """The voting key of an answer math-verify cannot read: its text without spaces."""
    return re.sub(r"\s+", "", answer)


def answers_equal(predicted: str | None, reference: str | None) -> bool:
    """Whether two final answers are equivalent (symbolically or numerically)."""
    if predicted is None or reference is None:
        return False
    if predicted.strip() == reference.strip():
        return True
    return _equivalent(predicted, reference, _in_main_thread())


@lru_cache(maxsize=65536)
def _equivalent(predicted: str, reference: str, main: bool) -> bool:
    # Cached like _parse: grouping the answers of a population compares the
    # same pairs again for each selection rule, bound and table of a report.
    gold, target = _parse(reference, main), _parse(predicted, main)
    if not gold or not target:
        return False
    return bool(verify(list(gold), list(target), timeout_seconds=5 if main else None))


def is_correct(response: str, reference: str) -> bool:
    """Grade a whole response against a reference answer."""
    return answers_equal(extract_answer(response), reference)


# -- grading off the event loop ------------------------------------------------

_TASKS: dict[str, Callable[..., object]] = {"equal": answers_equal, "normalize": normalize_answer}
"""What a grading worker can be asked to do, by name."""

_TIMED_OUT = object()


class GradingPool:
    """Worker processes that grade answers (compare two, or give one's voting
    key), each grading under a hard time limit.

    math-verify can take seconds on an adversarial answer (``10^{10^{10}}``)
    and its own timeouts rely on SIGALRM, which stops nothing outside the
    main thread. A server grades in these workers instead: the event loop
    only waits on a pipe, and a worker that overruns ``timeout`` is killed
    and replaced, its grading counted as timed out. Workers start on
    first use (or ``start``), and are ready only once they have imported
    math-verify, so a grading's clock does not include that import.
    """

    def __init__(self, workers: int = 1, timeout: float = 10.0, startup_timeout: float = 120.0):
        if workers < 1:
            raise ValueError(f"a grading pool needs at least one worker, got {workers}")
        if not timeout > 0:
            raise ValueError(f"the grading timeout must be positive, got {timeout}")
        self.workers = workers
        self.timeout = timeout
        self.startup_timeout = startup_timeout
        self.busy = 0
        """gradings under way."""
        self.timed_out = 0
        """gradings stopped by the time limit (their workers killed)."""
        self._idle: list[_Worker] = []
        self._started = 0
        self._free: asyncio.Semaphore | None = None
        self._closed = False

    def start(self) -> None:
        """Start every worker now rather than at first use."""
        while self._started < self.workers:
            self._idle.append(_Worker.spawn())
            self._started += 1

    async def equal(self, predicted: str | None, reference: str | None) -> bool:
        """``answers_equal(predicted, reference)`` in a worker; False when it
        takes longer than the time limit."""
        return bool(await self.compare(predicted, reference))

    async def compare(self, predicted: str | None, reference: str | None) -> bool | None:
        """``answers_equal(predicted, reference)`` in a worker; None when it
        takes longer than the time limit."""
        if predicted is None or reference is None:
            return False
        if predicted.strip() == reference.strip():
            return True
        result = await self._run("equal", predicted, reference)
        return None if result is _TIMED_OUT else bool(result)

    async def normalize(self, answer: str) -> str | None:
        """``normalize_answer(answer)`` in a worker; None when it takes longer
        than the time limit."""
        result = await self._run("normalize", answer)
        return None if result is _TIMED_OUT else str(result)

    async def _run(self, task: str, *args: str) -> object:
        """``_TASKS[task](*args)`` in an idle worker: its result, ``_TIMED_OUT``
        when the time limit stopped it, and the task's failure value (not
        equal; the plain key) when its worker died."""
        if self._closed:
            raise RuntimeError("the grading pool is closed")
        if self._free is None:
            self._free = asyncio.Semaphore(self.workers)
        async with self._free:
            # Starting (and killing) a process takes a fork: not on the loop.
            worker = self._idle.pop() if self._idle else await asyncio.to_thread(_Worker.spawn)
            self.busy += 1
            healthy = False
            try:
                await worker.ready(self.startup_timeout)
                worker.connection.send((task, args))
                if not await _readable(worker.connection, self.timeout):
                    self.timed_out += 1
                    log.warning("grading (%s) %.80r took over %g s; stopped", task, args, self.timeout)
                    return _TIMED_OUT
                try:
                    result = worker.connection.recv()
                except (EOFError, OSError):
                    log.warning("a grading worker died grading (%s) %.80r", task, args)
                    return _failed(task, args)
                healthy = True
                return result
            finally:
                self.busy -= 1
                if healthy and not self._closed:
                    self._idle.append(worker)
                else:
                    asyncio.get_running_loop().run_in_executor(None, worker.kill)

    def close(self) -> None:
        self._closed = True
        for worker in self._idle:
            worker.kill()
        self._idle.clear()


def _failed(task: str, args: tuple) -> object:
    """What a grading that failed counts as: not equal, or the plain key."""
    return _plain_key(args[0]) if task == "normalize" else False


_pool: GradingPool | None = None


def install_pool(pool: GradingPool | None) -> GradingPool | None:
    """Make ``answers_equal_async`` and ``normalize_answer_async`` grade in
    ``pool`` (None: in this process); returns the pool installed before."""
    global _pool
    previous, _pool = _pool, pool
    return previous


async def answers_equal_async(predicted: str | None, reference: str | None, slow: set[str] | None = None) -> bool:
    """``answers_equal`` in the installed ``GradingPool``, or here when none is.

    ``slow``, when given, collects the answers of gradings that ran out of
    time, and a comparison involving one of them is not equal at once: a
    caller that keeps it (one request's reward, one vote) pays the time limit
    once per answer that stalls math-verify, not once per candidate compared
    with it.
    """
    pool = _pool
    if pool is None:
        return answers_equal(predicted, reference)
    if predicted is None or reference is None:
        return False
    if predicted.strip() == reference.strip():
        return True
    if slow is not None and (predicted in slow or reference in slow):
        return False
    result = await pool.compare(predicted, reference)
    if result is None:
        if slow is not None:
            slow.update((predicted, reference))
        return False
    return result


async def normalize_answer_async(answer: str, slow: set[str] | None = None) -> str:
    """``normalize_answer`` in the installed ``GradingPool``, or here when
    none is. An answer whose parsing runs out of time keys as an answer
    math-verify cannot read (its text without spaces) and joins ``slow``."""
    pool = _pool
    if pool is None:
        return normalize_answer(answer)
    if slow is not None and answer in slow:
        return _plain_key(answer)
    key = await pool.normalize(answer)
    if key is None:
        if slow is not None:
            slow.add(answer)
        return _plain_key(answer)
    return key


class _Worker:
    def __init__(self, process: multiprocessing.process.BaseProcess, connection: Connection):
        self.process = process
        self.connection = connection
        self._ready = False

    @classmethod
    def spawn(cls) -> _Worker:
        # spawn, not fork: the server holds threads (and maybe CUDA) that a
        # forked child must not inherit.
        context = multiprocessing.get_context("spawn")
        parent, child = context.Pipe()
        process = context.Process(target=_serve_gradings, args=(child,), daemon=True, name="piscale-grading")
        process.start()
        child.close()
        return cls(process, parent)

    async def ready(self, timeout: float) -> None:
        if self._ready:
            return
        if not await _readable(self.connection, timeout) or self.connection.recv() != "ready":
            raise RuntimeError(f"a grading worker did not start within {timeout:g} s")
        self._ready = True

    def kill(self) -> None:
        with contextlib.suppress(OSError):
            self.connection.close()
        if self.process.is_alive():
            self.process.kill()
        self.process.join(timeout=5)


async def _readable(connection: Connection, timeout: float) -> bool:
    """Whether ``connection`` has something to read (or was closed) within
    ``timeout`` seconds, waited for on the event loop."""
    if connection.poll():
        return True
    loop = asyncio.get_running_loop()
    ready: asyncio.Future[None] = loop.create_future()
    descriptor = connection.fileno()

    def readable() -> None:
        if not ready.done():
            ready.set_result(None)

    loop.add_reader(descriptor, readable)
    try:
        await asyncio.wait_for(ready, timeout)
        return True
    except TimeoutError:
        return False
    finally:
        loop.remove_reader(descriptor)


def _serve_gradings(connection: Connection) -> None:
    """A worker's loop: (task, arguments) in, its result out, until EOF. It
    runs at a lower scheduling priority than the server, so that a grading
    that spins until its time limit takes the CPU the server leaves idle."""
    with contextlib.suppress(OSError, AttributeError):
        os.nice(10)
    connection.send("ready")
    while True:
        try:
            task, args = connection.recv()
        except (EOFError, OSError):
            return
        try:
            result = _TASKS[task](*args)
        except Exception:
            result = _failed(task, args)
        connection.send(result)
