"""Planning a request: every check that can fail is made here, before the
backend is touched (model name, algorithm, budget, reward, options, token
ids, lengths against the context window), and the request becomes a
:class:`Plan`: its prompts as token ids, plain sampling or a search choice,
what to return.

A request is *plain* when its budget is 1 and it names no reward (directly or
through a preset): it is then an ordinary completion. Otherwise it runs the
algorithm (default ``pf``) with the named reward or the server's default.
"""

from __future__ import annotations

import secrets
import time
import uuid
from dataclasses import dataclass, field

from piscale.lm.base import LanguageModel
from piscale.search import ALGORITHMS, prepare
from piscale.serve.config import Preset, ServerConfig
from piscale.serve.errors import APIError, bad_request, too_large
from piscale.serve.gate import SequenceGate
from piscale.serve.generation import Sampling, SearchChoice, derive_seed
from piscale.serve.rewards import RewardPool
from piscale.serve.schema import ChatRequest, CommonRequest, CompletionRequest

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


class Planner:
    """Turns parsed requests into plans for one server: its configuration,
    backend (for tokenising and the context window), capacity gate and
    rewards."""

    def __init__(self, config: ServerConfig, lm: LanguageModel, gate: SequenceGate, rewards: RewardPool):
        self.config = config
        self.lm = lm
        self.gate = gate
        self.rewards = rewards
        self.vocabulary_size = lm.vocab_size
        """How many token ids the backend accepts, where it says; prompts of
        token ids are checked against it before they reach a shared batch."""

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
        # Before any prompt is tokenised: a request of many prompts is
        # refused for what it is, not after the work of reading it.
        self._check_size(len(items) * request.n, "n")
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

    def _check_size(self, need: int, param: str) -> None:
        limit = self.config.max_request_sequences
        if need > limit:
            raise too_large(
                f"this request asks for {need} sequences (prompts x {param}); this server allows {limit} per request",
                param=param,
            )

    def _plan(self, endpoint, request, prompts, samplings, search, reward, logprobs, **extra) -> Plan:
        need = len(prompts) * (search.budget if search is not None else request.n)
        self._check_size(need, "budget" if search is not None else "n")
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

