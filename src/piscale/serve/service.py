"""Running a planned request, and the state of one server.

``Service`` is the state of one server (held on the app, never global): the
backend, the kept sequences, the rewards, the metrics. A request goes through

1. **planning** (``plan_chat``, ``plan_completion``; :mod:`piscale.serve.plan`):
   every check that can fail is made before the backend is touched, and the
   request becomes a ``Plan``;
2. **running** (``complete`` or ``stream``, here): plain generation or a
   search per prompt (``piscale.serve.generation``) through the request's own
   metered view of the backend, under the request's timeout, cancelled when
   the client goes away; whatever happens, the request's sequences are
   released;
3. **rendering** (:mod:`piscale.serve.render`): the response body or the
   stream's chunks in the OpenAI format.

Usage of a response, for all particles of all prompts of the request:
``prompt_tokens`` are prompt tokens the request made the engine read (prefill,
sequences taken from the kept store as ``prompt_tokens_details.cached_tokens``,
and prompt tokens scored for prompt log-probabilities), ``completion_tokens``
every token generated, ``reward_tokens`` (an extension) every token a reward
model read or wrote. On an otherwise idle server the engine's counters grow
by exactly these amounts.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
from concurrent.futures import ThreadPoolExecutor
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

from piscale.grading import GradingPool
from piscale.lm.base import LanguageModel
from piscale.search import ALGORITHMS
from piscale.serve import generation
from piscale.serve.config import ServerConfig
from piscale.serve.errors import APIError, bad_request, internal_error, server_full
from piscale.serve.gate import GateFull, SequenceGate
from piscale.serve.generation import Choice, Delta, Sampling, SearchOutput
from piscale.serve.kept import KeptSequences
from piscale.serve.metered import MeteredLM
from piscale.serve.metrics import Metrics
from piscale.serve.plan import Plan, Planner, PromptInput
from piscale.serve.render import Renderer, sse
from piscale.serve.rewards import RequestReward, RewardPool
from piscale.serve.schema import ChatRequest, CompletionRequest

log = logging.getLogger(__name__)

T = TypeVar("T")

class ClientGone(Exception):
    """The client disconnected before the answer was ready."""


class Service:
    def __init__(self, config: ServerConfig, lm: LanguageModel):
        self.config = config
        self.lm = lm
        capacity = lm.max_sequences
        if capacity is not None:
            # A fixed number of cache slots: a quarter at most for kept
            # sequences, two for scoring (llama.cpp borrows them), the rest
            # for requests, admitted by the gate.
            kept = min(config.sequence_cache, capacity // 4)
            limit = min(config.max_sequences, max(1, capacity - kept - 2))
        else:
            kept = config.sequence_cache
            limit = config.max_sequences
        self.gate = SequenceGate(limit, config.max_queue)
        self.kept = KeptSequences(lm, kept)
        self.metrics = Metrics()
        self.rewards = RewardPool(config, lm)
        self.planner = Planner(config, lm, self.gate, self.rewards)
        self.vocabulary_size = self.planner.vocabulary_size
        self.renderer = Renderer(lm)
        self._background: set[asyncio.Task] = set()
        # One thread: tokenisers are not all safe to call from several
        # threads at once, and the point is only to keep the loop free.
        self._planning = ThreadPoolExecutor(max_workers=1, thread_name_prefix="piscale-planning")
        self.grading = GradingPool(config.grading_workers, config.grading_timeout) if config.grading_workers else None
        """where the ``verify`` reward grades once the app has installed it
        (``piscale.grading.install_pool``), off the event loop."""
        for name, preset in config.presets.items():
            if preset.algorithm not in ALGORITHMS:
                raise ValueError(f"preset {name!r}: unknown algorithm {preset.algorithm!r}; choose one of {', '.join(ALGORITHMS)}")

    async def offload(self, function: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """``function(*args, **kwargs)`` on the planning thread (parsing,
        tokenising, planning: CPU work that would stall the event loop)."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._planning, functools.partial(function, *args, **kwargs))

    def plan_chat(self, request: ChatRequest) -> Plan:
        """A chat request as a plan (:meth:`Planner.plan_chat`)."""
        return self.planner.plan_chat(request)

    def plan_completion(self, request: CompletionRequest) -> Plan:
        """A completion request as a plan (:meth:`Planner.plan_completion`)."""
        return self.planner.plan_completion(request)

    # -- running --------------------------------------------------------------
    async def complete(self, plan: Plan, disconnected: Callable[[], Awaitable[None]] | None = None) -> dict[str, Any]:
        """The response body, or APIError (408 on timeout) / ClientGone."""
        work = asyncio.ensure_future(self._complete(plan))
        watcher = asyncio.ensure_future(disconnected()) if disconnected is not None else None
        waiting = {work} | ({watcher} if watcher is not None else set())
        try:
            done, _ = await asyncio.wait(waiting, timeout=plan.timeout, return_when=asyncio.FIRST_COMPLETED)
        finally:
            if watcher is not None:
                watcher.cancel()
            if not work.done():
                work.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await work
        if work in done:
            return work.result()
        if watcher is not None and watcher in done:
            self.metrics.cancelled += 1
            raise ClientGone()
        self.metrics.timed_out += 1
        raise APIError(408, f"the request did not finish within its timeout of {plan.timeout:g} s", code="timeout")

    async def _complete(self, plan: Plan) -> dict[str, Any]:
        try:
            async with self.gate.admitted(plan.need):
                return await self._complete_admitted(plan)
        except GateFull as error:
            self.metrics.turned_away += 1
            raise server_full(str(error)) from None

    def check_room(self, plan: Plan) -> None:
        """429 now when the request would wait and the queue is full (a
        stream must know before it answers 200)."""
        try:
            self.gate.check_room(plan.need)
        except GateFull as error:
            self.metrics.turned_away += 1
            raise server_full(str(error)) from None

    async def _complete_admitted(self, plan: Plan) -> dict[str, Any]:
        policy = MeteredLM(self.lm)
        reward = self._reward(plan)
        try:
            if plan.search is not None:
                work = [self._search(policy, reward, p, plan) for p in plan.prompts]
            else:
                work = [self._generate(policy, p, s) for p, s in zip(plan.prompts, plan.samplings)]
            if plan.prompt_logprobs:
                work += [generation.prompt_logprobs(policy, p.ids, plan.logprob_start) for p in plan.prompts]
            results = await all_of(work)
            prompt_lps = results[len(plan.prompts) :] if plan.prompt_logprobs else None
            usage = self._usage(policy, reward)
            self.metrics.count_usage(usage)
            return self.renderer.body(plan, results[: len(plan.prompts)], prompt_lps, usage)
        except ValueError as error:
            raise bad_request(str(error)) from None
        finally:
            self._release(policy, reward)

    async def _generate(self, policy: MeteredLM, prompt: PromptInput, sampling: Sampling) -> list[Choice]:
        if sampling.max_tokens == 0:  # echo only: the prompt is scored, nothing generated
            return [Choice([], [], "", "length") for _ in sampling.seeds]
        return await generation.generate(policy, self.kept, prompt.ids, sampling)

    def _reward(self, plan: Plan) -> RequestReward:
        try:
            return self.rewards.build(plan.reward)
        except (ValueError, KeyError, FileNotFoundError) as error:
            raise bad_request(f"reward {plan.reward!r} could not be built: {error}", param="reward") from None

    async def _search(self, policy: MeteredLM, reward: RequestReward, prompt: PromptInput, plan: Plan, report=None) -> SearchOutput:
        assert plan.search is not None
        self.metrics.searches[plan.search.algorithm] += 1
        return await generation.search(policy, reward.reward, prompt.ids, prompt.question, plan.search, report)

    def _release(self, policy: MeteredLM, reward: RequestReward) -> None:
        busy = policy.release_all() + reward.release_all()
        if busy:
            self._spawn(self._release_when_idle(busy))

    def _spawn(self, coroutine) -> asyncio.Task:
        task = asyncio.ensure_future(coroutine)
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        return task

    async def _release_when_idle(self, handles: list[int], attempts: int = 6000) -> None:
        """Release sequences whose cancelled extension still runs in the engine."""
        for _ in range(attempts):
            await asyncio.sleep(0.05)
            still = []
            for handle in handles:
                try:
                    self.lm.release([handle])
                except RuntimeError:
                    still.append(handle)
                except KeyError:
                    pass
            if not still:
                return
            handles = still
        log.warning("%d sequences were still busy after a request ended; leaving them", len(handles))

    def _usage(self, policy: MeteredLM, reward: RequestReward) -> dict[str, Any]:
        prompt = policy.usage.prefill_tokens + policy.cached_tokens + policy.usage.scored_tokens
        completion = policy.usage.generated_tokens
        return {
            "prompt_tokens": prompt,
            "completion_tokens": completion,
            "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": policy.cached_tokens},
            "reward_tokens": reward.tokens,
        }

    # -- streaming ----------------------------------------------------------------
    async def stream(self, plan: Plan) -> AsyncIterator[str]:
        """Server-sent events of a request: OpenAI chunks, progress events
        (a chunk with no choices and a ``piscale_progress`` field) when asked,
        a usage chunk when asked, an error event if the work fails, [DONE]."""
        queue: asyncio.Queue = asyncio.Queue()
        producer = self._spawn(self._produce(plan, queue))
        loop = asyncio.get_running_loop()
        deadline = loop.time() + plan.timeout
        try:
            while True:
                try:
                    item = await asyncio.wait_for(queue.get(), max(deadline - loop.time(), 0))
                except TimeoutError:
                    self.metrics.timed_out += 1
                    error = APIError(408, f"the request did not finish within its timeout of {plan.timeout:g} s", code="timeout")
                    yield sse(error.body())
                    break
                if item is None:
                    break
                if isinstance(item, APIError):
                    yield sse(item.body())
                    break
                yield sse(item)
            yield "data: [DONE]\n\n"
        except asyncio.CancelledError:
            self.metrics.cancelled += 1
            raise
        finally:
            producer.cancel()

    async def _produce(self, plan: Plan, queue: asyncio.Queue) -> None:
        policy = MeteredLM(self.lm)
        reward: RequestReward | None = None
        try:
            async with self.gate.admitted(plan.need):
                reward = self._reward(plan)
                await self._produce_admitted(plan, queue, policy, reward)
        except GateFull as error:
            self.metrics.turned_away += 1
            queue.put_nowait(server_full(str(error)))
        except ValueError as error:
            queue.put_nowait(bad_request(str(error)))
        except APIError as error:
            queue.put_nowait(error)
        except Exception:
            log.exception("streamed request %s failed", plan.request_id)
            queue.put_nowait(internal_error(plan.request_id))
        finally:
            self._release(policy, reward or RequestReward(None))

    async def _produce_admitted(self, plan: Plan, queue: asyncio.Queue, policy: MeteredLM, reward: RequestReward) -> None:
        if plan.endpoint == "chat" and plan.search is None:
            for index in range(plan.n * len(plan.prompts)):
                opening = {"index": index, "delta": {"role": "assistant", "content": plan.echo_text}, "logprobs": None, "finish_reason": None}
                queue.put_nowait(self.renderer.chunk(plan, [opening]))
        await all_of(
            [
                self._stream_search(policy, reward, prompt, p, plan, queue)
                if plan.search is not None
                else self._stream_plain(policy, prompt, p, plan, queue)
                for p, prompt in enumerate(plan.prompts)
            ]
        )
        usage = self._usage(policy, reward)
        self.metrics.count_usage(usage)
        if plan.include_usage:
            queue.put_nowait(self.renderer.chunk(plan, [], usage=usage))
        queue.put_nowait(None)

    async def _stream_plain(self, policy: MeteredLM, prompt: PromptInput, p: int, plan: Plan, queue: asyncio.Queue) -> None:
        sampling = plan.samplings[p]
        first = {j: True for j in range(plan.n)}
        if sampling.max_tokens == 0:
            deltas = [Delta(j, "", [], [], "length") for j in range(plan.n)]
            text = prompt.text if plan.echo else ""
            queue.put_nowait(self.renderer.chunk(plan, [self.renderer.delta_choice(plan, p * plan.n + d.index, text, d) for d in deltas]))
            return
        async for deltas in generation.generate_stream(policy, self.kept, prompt.ids, sampling, self.config.stream_chunk_tokens):
            choices = []
            for delta in deltas:
                text = delta.text
                if plan.endpoint == "completion" and plan.echo and first[delta.index]:
                    text = prompt.text + text
                first[delta.index] = False
                choices.append(self.renderer.delta_choice(plan, p * plan.n + delta.index, text, delta))
            queue.put_nowait(self.renderer.chunk(plan, choices))

    async def _stream_search(self, policy, reward, prompt: PromptInput, p: int, plan: Plan, queue: asyncio.Queue) -> None:
        def report(event: dict[str, Any]) -> None:
            queue.put_nowait(self.renderer.chunk(plan, [], progress={"prompt": p, **event}))

        output = await self._search(policy, reward, prompt, plan, report if plan.progress else None)
        pieces = output.steps or [""]
        if plan.endpoint == "completion" and plan.echo:
            pieces = [prompt.text + pieces[0], *pieces[1:]]
        for k, piece in enumerate(pieces):
            last = k == len(pieces) - 1
            delta = Delta(0, piece, [], [], output.finish_reason if last else None)
            if plan.endpoint == "chat":
                choice: dict[str, Any] = {
                    "index": p,
                    "delta": {"role": "assistant", "content": piece} if k == 0 else {"content": piece},
                    "logprobs": None,
                    "finish_reason": delta.finish_reason,
                }
            else:
                choice = {"index": p, "text": piece, "logprobs": None, "finish_reason": delta.finish_reason}
            extra = {"piscale": {"searches": [self.renderer.search_summary(output, plan)]}} if last else {}
            queue.put_nowait(self.renderer.chunk(plan, [choice], **extra))

    def gauges(self) -> list[tuple[str, str, str, float]]:
        """The service's own numbers for /metrics."""
        gauges = [
            ("piscale_kept_sequences", "gauge", "Sequences kept for continuation.", len(self.kept)),
            ("piscale_kept_sequence_hits_total", "counter", "Requests that forked a kept sequence.", self.kept.hits),
            ("piscale_kept_sequence_misses_total", "counter", "Requests that prefilled their prompt.", self.kept.misses),
            ("piscale_requests_waiting", "gauge", "Requests waiting for engine capacity.", self.gate.waiting),
        ]
        if self.grading is not None:
            gauges.append(("piscale_grading_in_progress", "gauge", "Answers being graded in worker processes.", self.grading.busy))
            gauges.append(
                ("piscale_grading_timed_out_total", "counter", "Gradings stopped by their time limit.", self.grading.timed_out)
            )
        if self.gate.limit is not None:
            gauges.append(("piscale_sequences_admitted", "gauge", "Sequences the admitted requests may hold.", self.gate.in_use))
            gauges.append(("piscale_sequences_limit", "gauge", "Sequences requests may hold together.", self.gate.limit))
        return gauges

    async def close(self) -> None:
        for task in list(self._background):
            task.cancel()
        self.kept.clear()
        self._planning.shutdown(wait=False, cancel_futures=True)
        if self.grading is not None:
            self.grading.close()
        await self.rewards.close()


async def all_of(coroutines: list) -> list:
    """Run coroutines concurrently; their results in order. The first
    failure is raised as it is (not in a group) after the others have been
    cancelled and have finished cleaning up."""
    tasks = [asyncio.ensure_future(c) for c in coroutines]
    try:
        return list(await asyncio.gather(*tasks))
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
