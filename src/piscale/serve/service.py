"""From a parsed request to a response: planning, running, accounting.

``Service`` is the state of one server (held on the app, never global): the
backend, the kept sequences, the rewards, the metrics. A request goes through

1. **planning** (``plan_chat``, ``plan_completion``): every check that can
   fail is made before the backend is touched (model name, algorithm, budget,
   reward, options, token ids, lengths against the context window), and the
   request becomes a ``Plan``: its prompts as token ids, plain sampling or a
   search choice, what to return;
2. **running** (``complete`` or ``stream``): plain generation or a search per
   prompt (``piscale.serve.generation``) through the request's own metered
   view of the backend, under the request's timeout, cancelled when the
   client goes away; whatever happens, the request's sequences are released.

A request is *plain* when its budget is 1 and it names no reward (directly or
through a preset): it is then an ordinary completion. Otherwise it runs the
algorithm (default ``pf``) with the named reward or the server's default.

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
import json
import logging
import math
import secrets
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from piscale.lm.base import LanguageModel
from piscale.search import ALGORITHMS, prepare
from piscale.serve import generation
from piscale.serve.config import Preset, ServerConfig
from piscale.serve.errors import APIError, bad_request
from piscale.serve.gate import SequenceGate
from piscale.serve.generation import Choice, Delta, Sampling, SearchChoice, SearchOutput, derive_seed
from piscale.serve.kept import KeptSequences
from piscale.serve.metered import MeteredLM
from piscale.serve.metrics import Metrics
from piscale.serve.rewards import RequestReward, RewardPool
from piscale.serve.schema import ChatRequest, CommonRequest, CompletionRequest

log = logging.getLogger(__name__)

COMPLETION_DEFAULT_MAX_TOKENS = 16
"""What OpenAI's legacy completions endpoint generates when max_tokens is absent."""


@dataclass
class PromptInput:
    ids: list[int]
    text: str
    """the prompt as text (what ``echo`` returns)."""
    question: str
    """what the reward reads as the question."""


@dataclass
class Plan:
    endpoint: str
    """``chat`` or ``completion``."""
    model: str
    prompts: list[PromptInput]
    n: int
    samplings: list[Sampling]
    """one per prompt (plain generation)."""
    search: SearchChoice | None
    reward: str | None
    stream: bool
    include_usage: bool
    progress: bool
    timeout: float
    candidates: bool
    logprobs: bool
    echo: bool
    echo_text: str = ""
    """chat: the final assistant message being continued, returned in front."""
    prompt_logprobs: bool = False
    logprob_start: int = 1
    """prompt log-probabilities are computed from this position on."""
    tokens_as_ids: bool = False
    return_token_ids: bool = False
    need: int = 1
    """sequences the request may hold at once (for the capacity gate)."""
    request_id: str = field(default_factory=lambda: uuid.uuid4().hex[:24])
    created: int = field(default_factory=lambda: int(time.time()))


class ClientGone(Exception):
    """The client disconnected before the answer was ready."""


class Service:
    def __init__(self, config: ServerConfig, lm: LanguageModel):
        self.config = config
        self.lm = lm
        capacity = getattr(lm, "max_sequences", None)
        if isinstance(capacity, int) and not isinstance(capacity, bool):
            # A fixed number of cache slots: a quarter at most for kept
            # sequences, two for scoring (llama.cpp borrows them), the rest
            # for requests, admitted by the gate.
            kept = min(config.sequence_cache, capacity // 4)
            self.gate = SequenceGate(max(1, capacity - kept - 2))
        else:
            kept = config.sequence_cache
            self.gate = SequenceGate(None)
        self.kept = KeptSequences(lm, kept)
        self.metrics = Metrics()
        self.rewards = RewardPool(config, lm)
        self.vocabulary_size = _vocabulary_size(lm)
        self._background: set[asyncio.Task] = set()
        for name, preset in config.presets.items():
            if preset.algorithm not in ALGORITHMS:
                raise ValueError(f"preset {name!r}: unknown algorithm {preset.algorithm!r}; choose one of {', '.join(ALGORITHMS)}")

    # -- planning -------------------------------------------------------------
    def _preset(self, model: str) -> Preset | None:
        try:
            return self.config.resolve_model(model)
        except KeyError:
            raise APIError(
                404,
                f"the model {model!r} does not exist on this server; it serves {self.config.model_name!r} "
                f"(optionally with a preset suffix such as {self.config.model_name + ':pf-8'!r})",
                param="model",
                code="model_not_found",
            ) from None

    def _search_choice(self, request: CommonRequest, preset: Preset | None) -> tuple[SearchChoice | None, str | None]:
        asked = request.scaling()
        config = self.config
        budget = asked.budget if asked.budget is not None else preset.budget if preset else config.budget
        if isinstance(budget, bool) or not isinstance(budget, int) or budget < 1:
            raise bad_request(f"budget must be a positive integer, got {budget!r}", param="budget")
        if budget > config.max_budget:
            raise bad_request(f"budget {budget} is over this server's maximum of {config.max_budget}", param="budget")
        named_reward = asked.reward if asked.reward is not None else preset.reward if preset else None
        algorithm = asked.algorithm or (preset.algorithm if preset else None) or config.algorithm
        if algorithm not in ALGORITHMS:
            raise bad_request(f"unknown algorithm {algorithm!r}; choose one of {', '.join(ALGORITHMS)}", param="algorithm")
        if budget == 1 and named_reward is None:
            if asked.options:
                raise bad_request("options apply to a search; this request is plain generation (budget 1, no reward)", param="options")
            return None, None
        options = {**config.options, **(preset.options if preset else {}), **(asked.options or {})}
        if request.temperature is not None:
            options.setdefault("temperature", request.temperature)
        if request.top_p is not None:
            options.setdefault("top_p", request.top_p)
        cap = request.token_cap() if isinstance(request, ChatRequest) else request.max_tokens
        if cap is not None:
            if cap < 1:
                raise bad_request(f"max_tokens must be at least 1, got {cap}", param="max_tokens")
            options.setdefault("max_tokens", cap)
        for name in ("max_tokens", "max_step_tokens"):
            value = options.get(name)
            if isinstance(value, int) and value > config.max_tokens:
                raise bad_request(f"{name} {value} is over this server's maximum of {config.max_tokens}", param=name)
        seed = asked.seed if asked.seed is not None else request.seed if request.seed is not None else secrets.randbits(31)
        if seed < 0:
            raise bad_request(f"seed must be non-negative, got {seed}", param="seed")
        reward = self.rewards.check(named_reward if named_reward is not None else config.reward)
        choice = SearchChoice(algorithm, budget, None if reward == "none" else reward, options, seed)
        try:
            spec, _, shape = prepare(algorithm, budget, seed, options)
        except ValueError as error:
            raise bad_request(str(error), param="options") from None
        if named_reward is None and spec.reward_optional(shape):
            choice = SearchChoice(algorithm, budget, None, options, seed)  # e.g. self-consistency votes without one
        elif choice.reward is None and not spec.reward_optional(shape):
            raise bad_request(f"{spec.title} ({algorithm}) needs a reward; name one or use algorithm 'sc'", param="reward")
        for name, reason in (
            ("stop", request.stop_strings()),
            ("n", request.n > 1),
            ("logprobs", bool(getattr(request, "logprobs", None))),
            ("prompt_logprobs", request.prompt_logprobs is not None),
        ):
            if reason:
                raise bad_request(f"{name} is not supported with a search (algorithm {algorithm}, budget {budget})", param=name)
        return choice, choice.reward

    def _common(self, request: CommonRequest) -> None:
        if request.presence_penalty or request.frequency_penalty:
            raise bad_request("presence_penalty and frequency_penalty are not supported", param="presence_penalty")

    def _timeout(self, request: CommonRequest) -> float:
        asked = request.piscale.timeout if request.piscale and request.piscale.timeout else None
        return min(asked, self.config.request_timeout) if asked else self.config.request_timeout

    def _check_prompt(self, ids: list[int], what: str) -> None:
        if not ids:
            raise bad_request(f"{what} is empty", param="prompt")
        if self.vocabulary_size is not None:
            bad = [t for t in ids if not 0 <= t < self.vocabulary_size]
            if bad:
                raise bad_request(
                    f"{what} has token ids outside the vocabulary of {self.vocabulary_size}: {bad[:5]}", param="prompt"
                )
        context = self.lm.context_length
        if len(ids) >= context:
            raise bad_request(
                f"{what} has {len(ids)} tokens; this model's context window is {context} tokens "
                "(the prompt must leave room for at least one new token)",
                param="prompt",
                code="context_length_exceeded",
            )

    def _max_tokens(self, asked: int | None, default: int | None, prompts: list[PromptInput], echo: bool) -> int:
        context = self.lm.context_length
        longest = max(len(p.ids) for p in prompts)
        if asked is None:
            asked = default if default is not None else min(self.config.max_tokens, context - longest)
        if asked < 0 or (asked == 0 and not echo):
            raise bad_request(
                f"max_tokens must be at least 1 (0 only with echo, to score the prompt), got {asked}", param="max_tokens"
            )
        if asked > self.config.max_tokens:
            raise bad_request(f"max_tokens {asked} is over this server's maximum of {self.config.max_tokens}", param="max_tokens")
        if longest + asked > context:
            raise bad_request(
                f"this model's context window is {context} tokens; the request asks for {longest + asked} "
                f"({longest} in the prompt, {asked} to generate). Lower max_tokens or shorten the prompt.",
                param="max_tokens",
                code="context_length_exceeded",
            )
        return asked

    def _samplings(self, request: CommonRequest, prompts: list[PromptInput], max_tokens: int) -> list[Sampling]:
        base = request.seed if request.seed is not None else secrets.randbits(63)
        temperature = 1.0 if request.temperature is None else request.temperature
        top_p = 1.0 if request.top_p is None else request.top_p
        n = request.n
        return [
            Sampling(
                max_tokens=max_tokens,
                temperature=temperature,
                top_p=top_p,
                stop=request.stop_strings(),
                include_stop=request.include_stop_str_in_output,
                seeds=tuple(derive_seed(base, p * n + j) for j in range(n)),
            )
            for p in range(len(prompts))
        ]

    def plan_chat(self, request: ChatRequest) -> Plan:
        preset = self._preset(request.model)
        self._common(request)
        if request.add_generation_prompt and request.continue_final_message:
            raise bad_request("add_generation_prompt and continue_final_message cannot both be true", param="continue_final_message")
        messages = [m.plain(i) for i, m in enumerate(request.messages)]
        if request.continue_final_message and messages[-1]["role"] != "assistant":
            raise bad_request("continue_final_message needs the last message to be the assistant's", param="messages")
        try:
            ids = self.lm.chat(
                messages,
                add_generation_prompt=request.add_generation_prompt,
                continue_final_message=request.continue_final_message,
            )
        except ValueError as error:
            raise bad_request(f"messages: {error}", param="messages") from None
        self._check_prompt(ids, "the chat prompt")
        users = [m["content"] for m in messages if m["role"] == "user"]
        prompt = PromptInput(ids, "", users[-1] if users else messages[-1]["content"])
        if request.top_logprobs:
            raise bad_request(
                "top_logprobs must be 0: this server returns the log-probability of each sampled token only",
                param="top_logprobs",
            )
        search, reward = self._search_choice(request, preset)
        if search is None:
            max_tokens = self._max_tokens(request.token_cap(), None, [prompt], echo=False)
            samplings = self._samplings(request, [prompt], max_tokens)
        else:
            samplings = []
        echo_text = messages[-1]["content"] if request.echo and messages[-1]["role"] == "assistant" else ""
        return self._plan("chat", request, [prompt], samplings, search, reward, bool(request.logprobs), echo_text=echo_text)

    def plan_completion(self, request: CompletionRequest) -> Plan:
        preset = self._preset(request.model)
        self._common(request)
        if request.suffix:
            raise bad_request("suffix is not supported", param="suffix")
        if request.best_of is not None and request.best_of != request.n:
            raise bad_request("best_of is not supported (use a budget and an algorithm instead)", param="best_of")
        prompts = []
        items = request.prompts()
        for i, item in enumerate(items):
            what = "the prompt" if len(items) == 1 else f"prompt {i}"
            if isinstance(item, str):
                ids = self.lm.encode(item)
                prompts.append(PromptInput(ids, item, item))
                self._check_prompt(ids, what)
            else:
                ids = [int(t) for t in item]
                self._check_prompt(ids, what)
                try:
                    text = self.lm.decode(ids)
                except (ValueError, IndexError, OverflowError) as error:
                    raise bad_request(f"{what}: {error}", param="prompt") from None
                prompts.append(PromptInput(ids, text, text))
        search, reward = self._search_choice(request, preset)
        if search is None:
            max_tokens = self._max_tokens(request.max_tokens, COMPLETION_DEFAULT_MAX_TOKENS, prompts, echo=request.echo)
            samplings = self._samplings(request, prompts, max_tokens)
        else:
            samplings = []
        wants_prompt_logprobs = request.prompt_logprobs is not None or (request.echo and request.logprobs is not None)
        if wants_prompt_logprobs and request.stream:
            raise bad_request("prompt log-probabilities (prompt_logprobs, or echo with logprobs) are not streamed; set stream false", param="stream")
        return self._plan(
            "completion", request, prompts, samplings, search, reward, request.logprobs is not None,
            prompt_logprobs=wants_prompt_logprobs,
            logprob_start=max(1, request.logprob_start_len or 1),
        )

    def _plan(self, endpoint, request, prompts, samplings, search, reward, logprobs, **extra) -> Plan:
        need = len(prompts) * (search.budget if search is not None else request.n)
        if self.gate.limit is not None and need > self.gate.limit:
            raise bad_request(
                f"this request may hold {need} sequences at once, more than the {self.gate.limit} this engine "
                "serves together; lower the budget or n, or start the server with more engine capacity "
                "(e.g. --engine-option max_sequences=...)",
                param="budget" if search is not None else "n",
            )
        return Plan(
            need=need,
            endpoint=endpoint,
            model=request.model,
            prompts=prompts,
            n=request.n,
            samplings=samplings,
            search=search,
            reward=reward,
            stream=request.stream,
            include_usage=request.include_usage(),
            progress=request.wants_progress(),
            timeout=self._timeout(request),
            candidates=bool(request.piscale and request.piscale.candidates),
            logprobs=logprobs,
            echo=request.echo,
            tokens_as_ids=request.return_tokens_as_token_ids,
            return_token_ids=request.return_token_ids,
            **extra,
        )

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
        async with self.gate.admitted(plan.need):
            return await self._complete_admitted(plan)

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
            return self._body(plan, results[: len(plan.prompts)], prompt_lps, usage)
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

    # -- response bodies ----------------------------------------------------------
    def _token_label(self, token: int, as_id: bool) -> str:
        return f"token_id:{token}" if as_id else self.lm.decode([token])

    def _chat_logprobs(self, token_ids: list[int], logprobs: list[float], as_ids: bool) -> dict[str, Any]:
        content = []
        for token, logprob in zip(token_ids, logprobs):
            label = self._token_label(token, as_ids)
            content.append({"token": label, "logprob": logprob, "bytes": list(label.encode()), "top_logprobs": []})
        return {"content": content}

    def _completion_logprobs(
        self, token_ids: list[int], logprobs: list[float | None], as_ids: bool, offset: int = 0
    ) -> dict[str, Any]:
        tokens, offsets, position = [], [], offset
        for token in token_ids:
            label = self._token_label(token, as_ids)
            tokens.append(label)
            offsets.append(position)
            position += len(self.lm.decode([token]))
        return {"tokens": tokens, "token_logprobs": list(logprobs), "top_logprobs": None, "text_offset": offsets}

    def _body(self, plan: Plan, results: list, prompt_lps: list | None, usage: dict[str, Any]) -> dict[str, Any]:
        self.metrics.count_usage(usage)
        choices = []
        searches = []
        for p, (prompt, result) in enumerate(zip(plan.prompts, results)):
            outputs = [result] if isinstance(result, SearchOutput) else result
            for j, output in enumerate(outputs):
                index = p * plan.n + j
                if isinstance(output, SearchOutput):
                    choice_text, finish, stop_reason, token_ids, logprobs = output.text, output.finish_reason, None, None, None
                    searches.append(self._search_summary(output, plan))
                else:
                    choice_text, finish, stop_reason = output.text, output.finish_reason, output.stop_reason
                    token_ids, logprobs = output.token_ids, output.logprobs
                choices.append(
                    self._choice(plan, index, prompt, choice_text, finish, stop_reason, token_ids, logprobs,
                                 prompt_lps[p] if prompt_lps else None)
                )
        body: dict[str, Any] = {
            "id": f"{'chatcmpl' if plan.endpoint == 'chat' else 'cmpl'}-{plan.request_id}",
            "object": "chat.completion" if plan.endpoint == "chat" else "text_completion",
            "created": plan.created,
            "model": plan.model,
            "choices": choices,
            "usage": usage,
        }
        if plan.return_token_ids and plan.endpoint == "completion" and len(plan.prompts) == 1:
            body["prompt_token_ids"] = plan.prompts[0].ids
        if plan.search is not None:
            body["piscale"] = {"searches": searches}
        return body

    def _choice(self, plan, index, prompt, text, finish, stop_reason, token_ids, logprobs, prompt_lps) -> dict[str, Any]:
        if plan.endpoint == "chat":
            choice: dict[str, Any] = {
                "index": index,
                "message": {"role": "assistant", "content": plan.echo_text + text},
                "logprobs": self._chat_logprobs(token_ids, logprobs, plan.tokens_as_ids) if plan.logprobs and token_ids is not None else None,
                "finish_reason": finish,
                "stop_reason": stop_reason,
            }
        else:
            shown = (prompt.text + text) if plan.echo else text
            lp = None
            if plan.logprobs:
                ids: list[int] = []
                values: list[float | None] = []
                if plan.echo:
                    ids, values = list(prompt.ids), list(prompt_lps or [None] * len(prompt.ids))
                if token_ids is not None:
                    ids, values = ids + list(token_ids), values + list(logprobs)
                lp = self._completion_logprobs(ids, values, plan.tokens_as_ids)
            choice = {"index": index, "text": shown, "logprobs": lp, "finish_reason": finish, "stop_reason": stop_reason}
            if prompt_lps is not None:
                choice["prompt_logprobs"] = [
                    None if v is None else {str(t): {"logprob": v, "rank": None, "decoded_token": self.lm.decode([t])}}
                    for t, v in zip(prompt.ids, prompt_lps)
                ]
        if plan.return_token_ids and token_ids is not None:
            choice["token_ids"] = list(token_ids)
        return choice

    def _search_summary(self, output: SearchOutput, plan: Plan) -> dict[str, Any]:
        assert plan.search is not None
        summary: dict[str, Any] = {
            "algorithm": plan.search.algorithm,
            "budget": plan.search.budget,
            "seed": plan.search.seed,
            "reward": plan.search.reward,
            "answer": output.answer,
            "score": output.score,
            "settings": output.settings,
            "steps": len(output.steps),
            "search_usage": output.search_usage,
            "failures": output.failures,
        }
        if plan.candidates:
            summary["candidates"] = output.candidates
        return summary

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
                    yield _sse(error.body())
                    break
                if item is None:
                    break
                if isinstance(item, APIError):
                    yield _sse(item.body())
                    break
                yield _sse(item)
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
        except ValueError as error:
            queue.put_nowait(bad_request(str(error)))
        except APIError as error:
            queue.put_nowait(error)
        except Exception as error:
            log.exception("a streamed request failed")
            queue.put_nowait(APIError(500, f"internal error: {type(error).__name__}: {error}"))
        finally:
            self._release(policy, reward or RequestReward(None))

    async def _produce_admitted(self, plan: Plan, queue: asyncio.Queue, policy: MeteredLM, reward: RequestReward) -> None:
        if plan.endpoint == "chat" and plan.search is None:
            for index in range(plan.n * len(plan.prompts)):
                opening = {"index": index, "delta": {"role": "assistant", "content": plan.echo_text}, "logprobs": None, "finish_reason": None}
                queue.put_nowait(self._chunk(plan, [opening]))
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
            queue.put_nowait(self._chunk(plan, [], usage=usage))
        queue.put_nowait(None)

    async def _stream_plain(self, policy: MeteredLM, prompt: PromptInput, p: int, plan: Plan, queue: asyncio.Queue) -> None:
        sampling = plan.samplings[p]
        first = {j: True for j in range(plan.n)}
        if sampling.max_tokens == 0:
            deltas = [Delta(j, "", [], [], "length") for j in range(plan.n)]
            text = prompt.text if plan.echo else ""
            queue.put_nowait(self._chunk(plan, [self._delta_choice(plan, p * plan.n + d.index, text, d) for d in deltas]))
            return
        async for deltas in generation.generate_stream(policy, self.kept, prompt.ids, sampling, self.config.stream_chunk_tokens):
            choices = []
            for delta in deltas:
                text = delta.text
                if plan.endpoint == "completion" and plan.echo and first[delta.index]:
                    text = prompt.text + text
                first[delta.index] = False
                choices.append(self._delta_choice(plan, p * plan.n + delta.index, text, delta))
            queue.put_nowait(self._chunk(plan, choices))

    def _delta_choice(self, plan: Plan, index: int, text: str, delta: Delta) -> dict[str, Any]:
        if plan.endpoint == "chat":
            choice: dict[str, Any] = {
                "index": index,
                "delta": {"content": text} if text else {},
                "logprobs": self._chat_logprobs(delta.token_ids, delta.logprobs, plan.tokens_as_ids) if plan.logprobs else None,
                "finish_reason": delta.finish_reason,
            }
        else:
            choice = {
                "index": index,
                "text": text,
                "logprobs": self._completion_logprobs(delta.token_ids, delta.logprobs, plan.tokens_as_ids) if plan.logprobs else None,
                "finish_reason": delta.finish_reason,
            }
        if delta.finish_reason is not None:
            choice["stop_reason"] = delta.stop_reason
        if plan.return_token_ids:
            choice["token_ids"] = delta.token_ids
        return choice

    async def _stream_search(self, policy, reward, prompt: PromptInput, p: int, plan: Plan, queue: asyncio.Queue) -> None:
        def report(event: dict[str, Any]) -> None:
            queue.put_nowait(self._chunk(plan, [], progress={"prompt": p, **event}))

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
            extra = {"piscale": {"searches": [self._search_summary(output, plan)]}} if last else {}
            queue.put_nowait(self._chunk(plan, [choice], **extra))

    def _chunk(self, plan: Plan, choices: list[dict[str, Any]], usage: dict | None = None, progress: dict | None = None, **extra) -> dict[str, Any]:
        chunk: dict[str, Any] = {
            "id": f"{'chatcmpl' if plan.endpoint == 'chat' else 'cmpl'}-{plan.request_id}",
            "object": "chat.completion.chunk" if plan.endpoint == "chat" else "text_completion",
            "created": plan.created,
            "model": plan.model,
            "choices": choices,
        }
        if usage is not None:
            chunk["usage"] = usage
        if progress is not None:
            chunk["piscale_progress"] = progress
        chunk.update(extra)
        return chunk

    def gauges(self) -> list[tuple[str, str, str, float]]:
        """The service's own numbers for /metrics."""
        gauges = [
            ("piscale_kept_sequences", "gauge", "Sequences kept for continuation.", len(self.kept)),
            ("piscale_kept_sequence_hits_total", "counter", "Requests that forked a kept sequence.", self.kept.hits),
            ("piscale_kept_sequence_misses_total", "counter", "Requests that prefilled their prompt.", self.kept.misses),
            ("piscale_requests_waiting", "gauge", "Requests waiting for engine capacity.", self.gate.waiting),
        ]
        if self.gate.limit is not None:
            gauges.append(("piscale_sequences_admitted", "gauge", "Sequences the admitted requests may hold.", self.gate.in_use))
            gauges.append(("piscale_sequences_limit", "gauge", "Sequences requests may hold together.", self.gate.limit))
        return gauges

    async def close(self) -> None:
        for task in list(self._background):
            task.cancel()
        self.kept.clear()
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


LOGPROB_FLOOR = -9999.0
"""What an impossible token's log-probability (-inf) is written as: JSON has
no infinities, and vLLM writes the same number."""


def json_safe(value: Any) -> Any:
    """``value`` with every non-finite float replaced: -inf by
    ``LOGPROB_FLOOR``, +inf by its negation, NaN by None."""
    if isinstance(value, float):
        if math.isnan(value):
            return None
        if math.isinf(value):
            return LOGPROB_FLOOR if value < 0 else -LOGPROB_FLOOR
        return value
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def _sse(data: dict[str, Any]) -> str:
    return f"data: {json.dumps(json_safe(data), separators=(',', ':'))}\n\n"


def _vocabulary_size(lm: LanguageModel) -> int | None:
    """How many token ids the backend accepts, where it says; prompts of
    token ids are checked against it before they reach a shared batch."""
    size = getattr(lm, "vocab_size", None)
    if isinstance(size, int):
        return size
    vocabulary = getattr(lm, "vocabulary", None)
    if isinstance(vocabulary, (tuple, list)):
        return len(vocabulary)
    model_config = getattr(getattr(lm, "model", None), "config", None)
    size = getattr(model_config, "vocab_size", None)
    if isinstance(size, int):
        return size
    return None
