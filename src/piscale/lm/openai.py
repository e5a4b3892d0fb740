"""The backend protocol over any OpenAI-compatible ``/v1/completions`` server.

``OpenAILM`` lets piscale drive a serving engine (vLLM, SGLang, a llama.cpp
server, or ``piscale serve`` itself) as its generator: the engine does the
batching, tensor parallelism and caching, piscale orchestrates the particles.

How the protocol maps onto HTTP:

* a sequence is a list of token ids held here; ``open`` and ``fork`` make
  lists, ``release`` drops them, none of them calls the server;
* ``extend`` sends, for every sequence, one completion request whose prompt
  is the sequence's *exact* token ids (or its text, for servers that take no
  token ids), so the server's prefix cache finds every shared prefix: the
  prompt once for all particles, and a particle's earlier steps. It asks for
  the generated token ids (``return_token_ids``, or vLLM's
  ``return_tokens_as_token_ids`` in the log-probabilities), their
  log-probabilities, and the stop string kept in the text
  (``include_stop_str_in_output``; SGLang's ``no_stop_trim``); the seed of
  each sequence goes in the request, so a step depends only on its own seed;
* ``score`` reads the one-token continuations of a prompt (a judge's Yes
  and No) from one request that generates a token and asks for those
  tokens' log-probabilities (vLLM's ``logprob_token_ids``): an ordinary
  request, so the prompt comes from the server's prefix cache. Longer
  continuations, and servers without that field, ask for prompt
  log-probabilities: ``echo`` with ``max_tokens`` 0 (OpenAI's legacy way;
  vLLM and ``piscale serve``), or vLLM's ``prompt_logprobs`` (vLLM reads
  such a request in full, past its prefix cache); ``logprob_start_len``
  (SGLang's name) tells servers that support it to score only the
  continuation;
* ``encode``/``decode``/``chat`` use a local transformers tokenizer when one
  is given (fast, no round trip; a catalog name or ``.gguf`` path reads the
  tokenizer from the GGUF file), else the server's ``/tokenize`` and
  ``/detokenize`` (vLLM, SGLang, llama.cpp's server, ``piscale serve``) or
  ``/extras/tokenize`` (llama-cpp-python's server);
* requests switch off the sampling changes servers make by default
  (``NEUTRAL_SAMPLING``: top-k, min-p, repetition penalties), so a step is a
  draw from the model itself, as the importance weights assume.

Several servers of the same model (replicas, data parallel) are one backend:
give ``base_url`` a list, or the spec ``openai:MODEL@URL1,URL2``. Routing is
prefix-affine: a sequence stays on the replica it was opened on, and its
forks follow it, so every continuation lands where its prefix is cached; the
copies of a new prompt are spread over the replicas by load (each replica
prefills the prompt once); a scoring request goes where the same prompt was
last scored, else to the least busy replica.

What the servers did is counted in ``usage`` and ``server_usage``:
``wall_time`` is the time with at least one request in flight; the requests,
prompt, completion and cached tokens are the servers' own figures where they
report them (vLLM reports cached tokens with ``--enable-prompt-tokens-details``);
``prefill_tokens`` is the prompt tokens the servers did not find cached;
``forward_passes`` is read from each server's ``/metrics`` (vLLM's engine
iterations, ``piscale serve``'s forward passes), which counts the passes run
for every client of a shared server; a server without such a counter gets an
estimate (one pass to read a call's prompts plus one per token of its longest
step).

The HTTP side (clients, retries, the in-flight time, ``/metrics``) is
``piscale.lm.server_pool.ServerPool``; this module maps the backend protocol
onto requests. Requests run at most ``max_concurrency`` at a time (per replica); transient failures
(connection errors, 408, 429, 5xx) are retried with exponential backoff. A
sequence whose request still fails is not fatal: its step comes back empty
with ``finish_reason == "error"`` and the reason in ``error`` (also listed in
``failures``), and only when every sequence of a call fails does ``extend``
raise ``ServerError``. The search driver drops such a particle: its weight
becomes zero, so resampling replaces it and it is never the answer, and the
search result records why.

    lm = OpenAILM.from_spec("openai:Qwen/Qwen2.5-Math-1.5B-Instruct@http://gpu-box:8000/v1")
    two = OpenAILM.from_spec("openai:Qwen/Qwen2.5-Math-1.5B-Instruct@http://gpu-a:8000/v1,http://gpu-b:8000/v1")
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import re
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import httpx

from piscale.lm.base import Handle, ScoreOutput, StepOutput, StepParams, Usage, find_stop
from piscale.lm.server_pool import ServerError, ServerPool
from piscale.lm.table import SequenceTable, TableLM, check_open, check_score

log = logging.getLogger(__name__)

DEFAULT_BASE_URL = "http://127.0.0.1:8000/v1"
API_KEY_ENV = "PISCALE_OPENAI_API_KEY"
_SPEC = re.compile(r"^openai:(?P<model>[^@]+?)(?:@(?P<url>https?://\S+))?$")
_TOKEN_ID = re.compile(r"^token_id:(-?\d+)$")
NEUTRAL_SAMPLING = {"top_k": 0, "min_p": 0.0, "repeat_penalty": 1.0, "repetition_penalty": 1.0}
"""Request fields that leave sampling untouched on llama.cpp, vLLM and SGLang
(top_k 0 means no top-k on all three; vLLM before 0.8 wanted -1)."""
LOGPROB_FLOOR = -9999.0
"""Servers write an impossible token's log-probability (-inf, which JSON
cannot hold) as this number (vLLM, ``piscale serve``); read back as -inf."""


def _logprob(value: Any) -> float:
    if value is None:
        return float("nan")
    value = float(value)
    return -math.inf if value <= LOGPROB_FLOOR else value


@dataclass
class FailedStep(StepOutput):
    """The step of a sequence whose request failed: no tokens, and why."""


@dataclass(frozen=True)
class SequenceFailure:
    handle: Handle
    reason: str


@dataclass
class _Sequence:
    tokens: list[int]
    replica: int = 0
    busy: bool = False


class _LRU:
    """A small bounded memo for tokenizer round trips."""

    def __init__(self, size: int = 4096):
        self.size = size
        self._items: OrderedDict[Any, Any] = OrderedDict()

    def get(self, key: Any) -> Any:
        if key in self._items:
            self._items.move_to_end(key)
            return self._items[key]
        return None

    def put(self, key: Any, value: Any) -> None:
        self._items[key] = value
        self._items.move_to_end(key)
        while len(self._items) > self.size:
            self._items.popitem(last=False)


class OpenAILM(TableLM):
    """A backend over an OpenAI-compatible server; see the module doc.

    ``model``: the model name the server knows. ``base_url``: the server's
    OpenAI root (ending in ``/v1``), or a list of them (replicas of one model). ``tokenizer``: a transformers tokenizer
    or a name/path to load one from; None uses the server's. ``prompt_format``:
    ``ids`` (token ids, exact) or ``text`` (for servers that take no ids).
    ``score_mode``: ``auto``, ``echo`` or ``prompt_logprobs``. ``on_failure``:
    ``drop`` (a failed sequence gets a ``FailedStep``) or ``raise``.
    ``server_passes``: read forward passes from the servers' ``/metrics``
    (True) or always estimate them (False).
    ``transport``: an httpx transport (tests)."""

    def __init__(
        self,
        model: str,
        base_url: str | Sequence[str] = DEFAULT_BASE_URL,
        *,
        api_key: str | None = None,
        tokenizer: Any = None,
        context_length: int | None = None,
        max_concurrency: int = 64,
        max_retries: int = 4,
        retry_backoff: float = 0.5,
        timeout: float = 600.0,
        prompt_format: str = "ids",
        score_mode: str = "auto",
        on_failure: str = "drop",
        name: str | None = None,
        server_passes: bool = True,
        transport: httpx.AsyncBaseTransport | None = None,
    ):
        if prompt_format not in ("ids", "text"):
            raise ValueError(f"prompt_format must be 'ids' or 'text', got {prompt_format!r}")
        if score_mode not in ("auto", "echo", "prompt_logprobs"):
            raise ValueError(f"score_mode must be auto, echo or prompt_logprobs, got {score_mode!r}")
        if on_failure not in ("drop", "raise"):
            raise ValueError(f"on_failure must be 'drop' or 'raise', got {on_failure!r}")
        if max_concurrency < 1 or max_retries < 0 or retry_backoff < 0 or timeout <= 0:
            raise ValueError("max_concurrency >= 1, max_retries >= 0, retry_backoff >= 0 and timeout > 0 are required")
        urls = [base_url] if isinstance(base_url, str) else list(base_url)
        if not urls:
            raise ValueError("base_url names no server")
        for url in urls:
            if not isinstance(url, str) or not re.match(r"^https?://", url):
                raise ValueError(f"base_url must start with http:// or https://, got {url!r}")
        urls = [url.rstrip("/") for url in urls]
        if len(set(urls)) != len(urls):
            raise ValueError(f"base_url names a server twice: {urls}")
        self.model = model
        self.usage = Usage()
        self.servers = ServerPool(
            urls, usage=self.usage, api_key=api_key, max_concurrency=max_concurrency, max_retries=max_retries,
            retry_backoff=retry_backoff, timeout=timeout, transport=transport,
        )
        self.replicas = self.servers.replicas
        self.server_usage = self.servers.server_usage
        self.base_url = urls[0]
        self.root_url = self.replicas[0].root_url
        self.name = name or f"openai:{model}@{','.join(urls)}"
        self.prompt_format = prompt_format
        self.score_mode = score_mode
        self.on_failure = on_failure
        self.server_passes = server_passes
        self.failures: list[SequenceFailure] = []
        """every sequence request that finally failed, with the reason."""
        if isinstance(tokenizer, str):
            from piscale.models import load_tokenizer

            tokenizer = load_tokenizer(tokenizer)
        self.tokenizer = tokenizer
        self._context_length = context_length
        self._sequences: SequenceTable[_Sequence] = SequenceTable()
        self._encoded = _LRU()
        self._decoded = _LRU()
        self._tokenizer_route: str | None = None
        self._echo_max_tokens = 0
        self._score_affinity = _LRU()
        self._next_token_scoring: bool | None = None
        """whether the server returns the log-probabilities of given tokens
        at a generated position (vLLM's ``logprob_token_ids``); None until
        tried."""

    @classmethod
    def from_spec(cls, spec: str, **options: Any) -> OpenAILM:
        """``openai:MODEL@http://host:port/v1``, or several URLs joined by
        commas for replicas (the URL defaults to ``DEFAULT_BASE_URL``; the
        key comes from ``api_key=`` or the ``PISCALE_OPENAI_API_KEY``
        environment variable)."""
        match = _SPEC.match(spec.strip())
        if match is None:
            raise ValueError(f"an OpenAI-compatible model spec reads openai:MODEL@http://HOST:PORT/v1, got {spec!r}")
        options.setdefault("api_key", os.environ.get(API_KEY_ENV))
        urls = [url for url in (match["url"] or DEFAULT_BASE_URL).split(",") if url]
        return cls(match["model"], urls if len(urls) > 1 else urls[0], **options)

    @property
    def retries(self) -> int:
        """Transient request failures that were retried."""
        return self.servers.retries

    def _sync_post(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        """A blocking POST for the tokenizer calls the protocol makes
        synchronous (prefer a local tokenizer where speed matters)."""
        try:
            return self.servers.sync_post(path, body)
        except ServerError as error:
            raise ServerError(
                f"{error}; a server without /tokenize needs a local tokenizer: OpenAILM(..., tokenizer='NAME_OR_PATH')",
                error.status,
            ) from error

    # -- server facts -------------------------------------------------------
    @property
    def context_length(self) -> int:  # type: ignore[override]
        if self._context_length is None:
            self._context_length = self._probe_context_length()
        return self._context_length

    def _probe_context_length(self) -> int:
        try:
            response = self.servers.sync_client().get(self.base_url + "/models")
            models = response.json().get("data", []) if response.status_code == 200 else []
        except (httpx.HTTPError, ValueError):
            models = []
        for entry in models:
            if entry.get("id") == self.model and isinstance(entry.get("max_model_len"), int):
                return int(entry["max_model_len"])
        if self.tokenizer is not None and isinstance(getattr(self.tokenizer, "model_max_length", None), int):
            length = self.tokenizer.model_max_length
            if length < 10**7:
                return length
        log.warning("%s does not report the context length of %s; pass context_length=", self.base_url, self.model)
        return 1 << 20

    @property
    def eos_token_ids(self) -> frozenset[int]:  # type: ignore[override]
        if self.tokenizer is not None and getattr(self.tokenizer, "eos_token_id", None) is not None:
            return frozenset({int(self.tokenizer.eos_token_id)})
        return frozenset()

    # -- text ---------------------------------------------------------------
    def encode(self, text: str) -> list[int]:
        if self.tokenizer is not None:
            return list(self.tokenizer.encode(text, add_special_tokens=False))
        cached = self._encoded.get(text)
        if cached is None:
            if self._extras_tokenizer():
                cached = tuple(self._sync_post("/extras/tokenize", {"model": self.model, "input": text})["tokens"])
            else:
                body = {"model": self.model, "prompt": text, "add_special_tokens": False}
                cached = tuple(self._sync_post("/tokenize", body)["tokens"])
            self._encoded.put(text, cached)
        return list(cached)

    def decode(self, token_ids: Sequence[int]) -> str:
        key = tuple(int(t) for t in token_ids)
        if not key:
            return ""
        if self.tokenizer is not None:
            return self.tokenizer.decode(list(key), skip_special_tokens=True)
        cached = self._decoded.get(key)
        if cached is None:
            if self._extras_tokenizer():
                cached = self._sync_post("/extras/detokenize", {"model": self.model, "tokens": list(key)})["text"]
            else:
                cached = self._sync_post("/detokenize", {"model": self.model, "tokens": list(key)})["prompt"]
            self._decoded.put(key, cached)
        return cached

    def _extras_tokenizer(self) -> bool:
        """Whether the server tokenizes at ``/extras/tokenize`` (llama-cpp-python's
        server) rather than ``/tokenize`` (vLLM, SGLang, llama.cpp's own server,
        ``piscale serve``): asked once, by which of the two exists."""
        if self._tokenizer_route is None:
            try:
                probe = self.servers.sync_client().post(self.root_url + "/tokenize", json={"model": self.model, "prompt": "a"})
                missing = probe.status_code in (404, 405)
            except httpx.HTTPError:
                missing = False  # unreachable: the real call reports it, with retries
            self._tokenizer_route = "/extras/tokenize" if missing else "/tokenize"
        return self._tokenizer_route == "/extras/tokenize"

    def chat(self, messages, *, add_generation_prompt: bool = True, continue_final_message: bool = False) -> list[int]:
        messages = [dict(m) for m in messages]
        if self.tokenizer is not None:
            text = self.tokenizer.apply_chat_template(
                messages,
                tokenize=False,
                add_generation_prompt=add_generation_prompt and not continue_final_message,
                continue_final_message=continue_final_message,
            )
            return self.encode(text)
        body = {
            "model": self.model,
            "messages": messages,
            "add_generation_prompt": add_generation_prompt and not continue_final_message,
            "continue_final_message": continue_final_message,
            "add_special_tokens": False,
        }
        return list(self._sync_post("/tokenize", body)["tokens"])

    # -- sequences ----------------------------------------------------------
    async def open(self, prompts, copies=1) -> list[list[Handle]]:
        prompts, counts = check_open(prompts, copies, self.context_length)
        self.usage.calls += 1
        # Nothing is sent yet: the first extension of each copy carries the
        # prompt, and the server's prefix cache prefills it once per replica.
        groups = []
        for prompt, count in zip(prompts, counts):
            groups.append([self._add(_Sequence(list(prompt), replica)) for replica in self._spread(count)])
        return groups

    def _spread(self, count: int) -> list[int]:
        """Replicas for ``count`` new copies of one prompt: as even as the
        replicas' open sequences allow, the least loaded first."""
        if len(self.replicas) == 1:
            return [0] * count
        load = [target.live for target in self.replicas]
        chosen = []
        for _ in range(count):
            replica = min(range(len(load)), key=lambda r: (load[r], r))
            load[replica] += 1
            chosen.append(replica)
        return sorted(chosen)

    def _add(self, sequence: _Sequence) -> Handle:
        self.replicas[sequence.replica].live += 1
        return self._sequences.add(sequence)

    def fork(self, ancestors: Sequence[Handle]) -> list[Handle]:
        # A fork stays on its parent's replica, which holds its prefix.
        return [self._add(_Sequence(list(p.tokens), p.replica)) for p in self._sequences.to_fork(ancestors)]

    def release(self, handles: Sequence[Handle]) -> None:
        for sequence in self._sequences.release(handles):
            self.replicas[sequence.replica].live -= 1

    def replica_of(self, handle: Handle) -> str:
        """The base URL of the replica that ``handle``'s requests go to."""
        return self.replicas[self._sequences.checked(handle).replica].base_url

    def token_ids(self, handle: Handle) -> list[int]:
        return list(self._sequences.checked(handle).tokens)

    # -- generation ---------------------------------------------------------
    async def extend(self, handles, params: StepParams, seeds=None) -> list[StepOutput]:
        handles = list(handles)
        sequences = self._sequences.to_extend(handles, seeds)
        if not handles:
            return []
        for sequence in sequences:
            sequence.busy = True
        self.usage.calls += 1
        await self._read_passes({s.replica for s in sequences}, baseline=True)
        try:
            results = await asyncio.gather(
                *(
                    self._step(sequence, params, None if seeds is None else int(seeds[i]))
                    for i, sequence in enumerate(sequences)
                ),
                return_exceptions=True,
            )
        finally:
            for sequence in sequences:
                sequence.busy = False
        outputs: list[StepOutput] = []
        failed: list[str] = []
        for handle, sequence, result in zip(handles, sequences, results):
            if isinstance(result, asyncio.CancelledError):
                raise result
            if isinstance(result, BaseException):
                if not isinstance(result, (ServerError, httpx.HTTPError, ValueError, KeyError, TypeError)):
                    raise result
                reason = f"{type(result).__name__}: {result}"
                failed.append(reason)
                self.failures.append(SequenceFailure(handle, reason))
                outputs.append(FailedStep([], "", [], "error", error=reason))  # type: ignore[arg-type]
                continue
            sequence.tokens.extend(result.token_ids)
            outputs.append(result)
        await self._count_passes(sequences, outputs, scoring=False)
        if failed and (self.on_failure == "raise" or len(failed) == len(handles)):
            raise ServerError(f"{len(failed)} of {len(handles)} sequence requests failed; first: {failed[0]}")
        return outputs

    def _prompt(self, tokens: list[int]) -> list[int] | str:
        """What a request sends for ``tokens``: the ids, or their text with
        the special tokens written out (a chat prompt's markup is made of
        them, and the server reads them back as the same special tokens)."""
        if self.prompt_format == "ids":
            return tokens
        if self.tokenizer is not None:
            return self.tokenizer.decode(tokens, skip_special_tokens=False)
        return self.decode(tokens)

    async def _step(self, sequence: _Sequence, params: StepParams, seed: int | None) -> StepOutput:
        tokens = list(sequence.tokens)
        room = self.context_length - len(tokens)
        if room <= 0:
            return StepOutput([], "", [], "context")
        body: dict[str, Any] = {
            "model": self.model,
            "prompt": self._prompt(tokens),
            "max_tokens": min(params.max_tokens, room),
            "temperature": params.temperature,
            "top_p": params.top_p,
            # The proposal must be the model's own distribution: switch off
            # the truncations and penalties that servers apply by default
            # (llama.cpp: top_k 40, min_p 0.05, repeat_penalty 1.1), each
            # under the names the servers use.
            **NEUTRAL_SAMPLING,
            "n": 1,
            "stream": False,
            "logprobs": 1,
            "include_stop_str_in_output": True,
            "no_stop_trim": True,
            "return_tokens_as_token_ids": True,
            "return_token_ids": True,
        }
        if params.stop:
            body["stop"] = list(params.stop)
        if seed is not None:
            body["seed"] = seed
        target = self.replicas[sequence.replica]
        data = await self.servers.post(target.base_url + "/completions", body, sequence.replica)
        self._count_usage(data.get("usage"), prompt_length=len(tokens))
        choice = _first_choice(data)
        text = choice.get("text") or ""
        token_ids, logprobs = self._generated(choice, text)
        self.usage.generated_tokens += len(token_ids)
        finish = self._finish(choice, text, token_ids, params, len(tokens))
        if finish == "stop":
            stop_reason = choice.get("stop_reason")
            if isinstance(stop_reason, str) and find_stop(text, [stop_reason]) is None:
                text += stop_reason  # a server that trimmed the stop string anyway
        return StepOutput(token_ids, text, logprobs, finish)

    def _count_usage(self, usage: Any, prompt_length: int, scoring: bool = False) -> None:
        """Add a response's ``usage`` to the counters: the prompt tokens the
        server read (those not found in its cache) are prefilled, or scored
        for a scoring request."""
        if not isinstance(usage, dict):
            self.server_usage.prompt_tokens += prompt_length
            if scoring:
                self.usage.scored_tokens += prompt_length
            else:
                self.usage.prefill_tokens += prompt_length
            return
        prompt_tokens = int(usage.get("prompt_tokens") or prompt_length)
        cached = int((usage.get("prompt_tokens_details") or {}).get("cached_tokens") or 0)
        self.server_usage.prompt_tokens += prompt_tokens
        self.server_usage.completion_tokens += int(usage.get("completion_tokens") or 0)
        self.server_usage.cached_tokens += cached
        read = max(prompt_tokens - cached, 0)
        if scoring:
            self.usage.scored_tokens += read
        else:
            self.usage.prefill_tokens += read

    # -- forward passes -----------------------------------------------------
    async def _read_passes(self, replicas: set[int], baseline: bool) -> float:
        """The growth of the servers' pass counters (``ServerPool.read_passes``);
        nothing is read when ``server_passes`` is off."""
        return await self.servers.read_passes(replicas, baseline) if self.server_passes else 0.0

    async def _count_passes(self, sequences: Sequence[_Sequence], outputs: Sequence[Any], scoring: bool) -> None:
        """Add a call's forward passes: the growth of the servers' counters,
        or for servers without one, an estimate (one pass to read the
        prompts, plus one per token of the longest step)."""
        measured = {s.replica for s in sequences if self.replicas[s.replica].pass_counter is not None}
        passes = await self._read_passes(measured, baseline=False) if self.server_passes else 0.0
        estimated: dict[int, int] = {}
        for sequence, output in zip(sequences, outputs):
            if self.server_passes and self.replicas[sequence.replica].pass_counter is not None:
                continue
            steps = 0 if scoring else len(getattr(output, "token_ids", ()) or ())
            estimated[sequence.replica] = max(estimated.get(sequence.replica, 0), 1 + steps)
        self.usage.forward_passes += int(round(passes)) + sum(estimated.values())

    def _generated(self, choice: dict[str, Any], text: str) -> tuple[list[int], list[float]]:
        """The generated token ids and their log-probabilities, from whatever
        the server returned: ``token_ids``, ``token_id:N`` labels, llama.cpp's
        ``content`` entries, or (last resort, inexact) the text re-encoded."""
        logprobs_field = choice.get("logprobs") or {}
        token_ids = choice.get("token_ids")
        values: list[float] | None = None
        if isinstance(logprobs_field, dict) and "token_logprobs" in logprobs_field:
            values = [_logprob(v) for v in logprobs_field["token_logprobs"]]
            labels = logprobs_field.get("tokens") or []
            if token_ids is None and labels and all(_TOKEN_ID.match(str(t)) for t in labels):
                token_ids = [int(_TOKEN_ID.match(str(t)).group(1)) for t in labels]  # type: ignore[union-attr]
        elif isinstance(logprobs_field, dict) and isinstance(logprobs_field.get("content"), list):
            entries = logprobs_field["content"]
            values = [_logprob(e.get("logprob")) for e in entries]
            if token_ids is None and all(isinstance(e.get("id"), int) for e in entries):
                token_ids = [int(e["id"]) for e in entries]
        if token_ids is None:
            token_ids = self.encode(text) if text else []
        token_ids = [int(t) for t in token_ids]
        if values is None or len(values) != len(token_ids):
            values = [float("nan")] * len(token_ids)
        return token_ids, values

    def _finish(self, choice: dict[str, Any], text: str, token_ids: list[int], params: StepParams, prompt_length: int) -> str:
        reason = choice.get("finish_reason")
        if reason == "length":
            return "context" if prompt_length + len(token_ids) >= self.context_length else "length"
        stop_reason = choice.get("stop_reason")
        if isinstance(stop_reason, str) or (params.stop and find_stop(text, params.stop) is not None):
            return "stop"
        if reason == "stop":
            return "eos"
        return "length" if len(token_ids) >= params.max_tokens else "eos"

    # -- scoring ------------------------------------------------------------
    async def score(self, prompts, continuations) -> list[ScoreOutput]:
        pairs = check_score(prompts, continuations, self.context_length)
        self.usage.calls += 1
        routes = [_Sequence(p, self._score_replica(p)) for p, _ in pairs]
        await self._read_passes({r.replica for r in routes}, baseline=True)
        outputs: list[ScoreOutput | None] = [None] * len(pairs)
        if self.score_mode == "auto" and self._next_token_scoring is not False:
            await self._score_next_tokens(pairs, routes, outputs)
        # One request per distinct prompt goes first, the rest of its pairs
        # after it, so that those find the prompt in the server's cache.
        first: dict[tuple[int, ...], int] = {}
        for i, (prompt, continuation) in enumerate(pairs):
            if continuation and outputs[i] is None:
                first.setdefault(tuple(prompt), i)
        leaders = set(first.values())

        async def run(indices: list[int]) -> None:
            done = await asyncio.gather(*(self._score_one(*pairs[i], routes[i].replica) for i in indices))
            for i, output in zip(indices, done):
                outputs[i] = output

        await run(sorted(leaders))
        await run([i for i in range(len(pairs)) if i not in leaders and outputs[i] is None])
        await self._count_passes(routes, outputs, scoring=True)
        return [o for o in outputs if o is not None]

    async def _score_next_tokens(self, pairs, routes: list[_Sequence], outputs: list[ScoreOutput | None]) -> None:
        """Fill ``outputs`` for the one-token continuations, one request per
        prompt. A server that ignores or refuses ``logprob_token_ids`` is
        marked so, and its pairs are left for prompt log-probabilities."""
        groups: dict[tuple[int, ...], list[int]] = {}
        for i, (prompt, continuation) in enumerate(pairs):
            if len(continuation) == 1:
                groups.setdefault(tuple(prompt), []).append(i)
        if not groups:
            return

        async def one(prompt: tuple[int, ...], indices: list[int]) -> bool:
            tokens = sorted({pairs[i][1][0] for i in indices})
            body: dict[str, Any] = {
                "model": self.model,
                "prompt": self._prompt(list(prompt)),
                "max_tokens": 1,
                "temperature": 0.0,
                "logprobs": len(tokens),
                "logprob_token_ids": tokens,
                "return_tokens_as_token_ids": True,
            }
            replica = routes[indices[0]].replica
            try:
                data = await self.servers.post(self.replicas[replica].base_url + "/completions", body, replica)
            except ServerError as error:
                if error.status in (400, 422):
                    return False
                raise
            self._count_usage(data.get("usage"), prompt_length=len(prompt), scoring=True)
            field = _first_choice(data).get("logprobs") or {}
            tables = field.get("top_logprobs") if isinstance(field, dict) else None
            table = tables[0] if isinstance(tables, list) and tables and isinstance(tables[0], dict) else {}
            values = {int(m.group(1)): v for key, v in table.items() if (m := _TOKEN_ID.match(str(key)))}
            if any(token not in values for token in tokens):
                return False
            for i in indices:
                outputs[i] = ScoreOutput(list(pairs[i][1]), [_logprob(values[pairs[i][1][0]])])
            return True

        answered = await asyncio.gather(*(one(prompt, indices) for prompt, indices in groups.items()))
        if all(answered):
            self._next_token_scoring = True
        elif not any(answered):
            self._next_token_scoring = False

    def _score_replica(self, prompt: list[int]) -> int:
        """Where a scoring prompt goes: where the same prompt went before (its
        cache is there), else to the replica with the fewest requests in flight."""
        if len(self.replicas) == 1:
            return 0
        key = tuple(prompt)
        replica = self._score_affinity.get(key)
        if replica is None:
            replica = min(range(len(self.replicas)), key=lambda r: (self.replicas[r].in_flight, self.replicas[r].live, r))
            self._score_affinity.put(key, replica)
        return replica

    async def _score_one(self, prompt: list[int], continuation: list[int], replica: int = 0) -> ScoreOutput:
        if not continuation:
            return ScoreOutput([], [])
        modes = ["echo", "prompt_logprobs"] if self.score_mode == "auto" else [self.score_mode]
        failure: ServerError | None = None
        for mode in modes:
            try:
                values = await self._prompt_logprobs(prompt, continuation, mode, replica)
            except ServerError as error:
                if error.status != 400 and error.status != 422:
                    raise
                failure = error
                continue
            if self.score_mode == "auto":
                self.score_mode = mode  # remember what this server supports
            return ScoreOutput(continuation, values)
        raise ServerError(
            f"{self.base_url} returns no prompt log-probabilities (tried {', '.join(modes)}): {failure}", 400
        )

    async def _prompt_logprobs(self, prompt: list[int], continuation: list[int], mode: str, replica: int = 0) -> list[float]:
        ids = prompt + continuation
        body: dict[str, Any] = {
            "model": self.model,
            "prompt": self._prompt(ids),
            "temperature": 0.0,
            "logprob_start_len": len(prompt),
            "return_tokens_as_token_ids": True,
        }
        if mode == "echo":
            body.update(echo=True, max_tokens=self._echo_max_tokens, logprobs=1)
        else:
            body.update(max_tokens=1, prompt_logprobs=0)
        url = self.replicas[replica].base_url + "/completions"
        try:
            data = await self.servers.post(url, body, replica)
        except ServerError as error:
            if mode != "echo" or body["max_tokens"] != 0 or error.status not in (400, 422):
                raise
            # Some servers (llama-cpp-python's) want max_tokens >= 1; the one
            # generated token's entry is past the continuation and ignored.
            self._echo_max_tokens = body["max_tokens"] = 1
            data = await self.servers.post(url, body, replica)
        self._count_usage(data.get("usage"), prompt_length=len(ids), scoring=True)
        choice = _first_choice(data)
        start, end = len(prompt), len(ids)
        if mode == "echo":
            field = choice.get("logprobs") or {}
            values = field.get("token_logprobs") if isinstance(field, dict) else None
            if not isinstance(values, list) or len(values) < end:
                raise ServerError(f"{self.base_url} returned no echoed prompt log-probabilities", 400)
            chosen = values[start:end]
        else:
            entries = choice.get("prompt_logprobs") or data.get("prompt_logprobs")
            if not isinstance(entries, list) or len(entries) < end:
                raise ServerError(f"{self.base_url} returned no prompt_logprobs", 400)
            chosen = [_logprob_of(entries[i], ids[i]) for i in range(start, end)]
        if any(v is None for v in chosen):
            raise ServerError(f"{self.base_url} left continuation tokens without a log-probability", 400)
        return [_logprob(v) for v in chosen]

    async def close(self) -> None:
        self._sequences.clear()
        await self.servers.close()


def _first_choice(data: dict[str, Any]) -> dict[str, Any]:
    choices = data.get("choices") if isinstance(data, dict) else None
    if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
        raise ServerError("the server's answer has no choices")
    return choices[0]


def _logprob_of(entry: Any, token: int) -> float | None:
    """vLLM's prompt_logprobs entry: {"TOKEN_ID": {"logprob": x, ...}, ...}."""
    if not isinstance(entry, dict):
        return None
    value = entry.get(str(token))
    if isinstance(value, dict):
        return value.get("logprob")
    if isinstance(value, (int, float)):
        return float(value)
    return None
