"""The language-model backend protocol.

A backend turns token sequences into more tokens. Search algorithms talk to it
through five operations, all on opaque sequence *handles*:

* ``open(prompts, copies)``: prefill each prompt once and return ``copies``
  handles that share that prefill (the particles of one prompt);
* ``extend(handles, params, seeds)``: extend every handle by one *step*, i.e.
  until a stop string, EOS or the per-step token cap, and return the new
  tokens, their text, their log-probabilities and why the step ended;
* ``fork(ancestors)``: a new generation of handles, the i-th a copy of
  ``ancestors[i]`` (resampling); a backend copies cache rows, never re-reads;
* ``release(handles)``: the handles are finished or discarded; free their cache;
* ``score(prompts, continuations)``: log p(continuation | prompt) per token.

A backend owns its caches; callers only hold handles. Calls from concurrent
coroutines may be merged by the backend into the same forward passes, so
``asyncio.gather`` over many prompts batches them. Sampling randomness is per
sequence (seeded by ``seeds``) so that a sequence's tokens do not depend on
which other sequences happen to share its batch.
"""

from __future__ import annotations

import abc
import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Literal

Handle = int
"""An opaque sequence handle, issued by ``open`` or ``fork``."""

FinishReason = Literal["stop", "eos", "length", "context", "error"]
"""Why a step ended: a stop string, end of sequence, the step's token cap, the
context window, or a failure of the backend for this sequence alone (a remote
request that failed after its retries; ``StepOutput.error`` says why)."""
"""Why a step ended: a stop string, an end-of-sequence token, the per-step
token cap, or the model's context window."""


@dataclass(frozen=True)
class StepParams:
    """How to generate one step.

    ``stop`` strings end a step once they appear in the step's text; the stop
    string stays in the returned text (it is part of the sequence, so the next
    step continues after it). ``max_tokens`` caps the tokens of one step.
    ``temperature == 0`` is greedy decoding.
    """

    max_tokens: int = 256
    stop: tuple[str, ...] = ("\n\n",)
    temperature: float = 0.8
    top_p: float = 1.0

    def __post_init__(self) -> None:
        if isinstance(self.max_tokens, bool) or not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            raise ValueError(f"max_tokens must be an integer >= 1, got {self.max_tokens!r}")
        for name in ("temperature", "top_p"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"{name} must be a finite number, got {value!r}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if any(not s for s in self.stop):
            raise ValueError("stop strings must be non-empty")


@dataclass
class StepOutput:
    """What one ``extend`` produced for one sequence."""

    token_ids: list[int]
    text: str
    logprobs: list[float]
    """log p(token | everything before it) under the model at temperature 1,
    for each new token (the sampling temperature does not change them)."""
    finish_reason: FinishReason
    error: str | None = None
    """Why the step failed, when ``finish_reason == "error"``."""


@dataclass
class ScoreOutput:
    """log p(continuation | prompt), token by token."""

    token_ids: list[int]
    logprobs: list[float]

    @property
    def total(self) -> float:
        return float(sum(self.logprobs))

    @property
    def mean(self) -> float:
        return self.total / max(len(self.logprobs), 1)


@dataclass
class Usage:
    """Work done by a backend. Every counter only grows; ``snapshot`` and
    ``since`` give the work of one request."""

    prefill_tokens: int = 0
    """tokens read in prefill passes (prompts, and anything re-read)."""
    generated_tokens: int = 0
    scored_tokens: int = 0
    """tokens read by ``score``."""
    forward_passes: int = 0
    calls: int = 0
    wall_time: float = 0.0
    """seconds spent inside the backend's compute."""

    def snapshot(self) -> Usage:
        return Usage(**asdict(self))

    def since(self, earlier: Usage) -> Usage:
        now = asdict(self)
        return Usage(**{k: now[k] - v for k, v in asdict(earlier).items()})

    def add(self, other: Usage) -> None:
        for k, v in asdict(other).items():
            setattr(self, k, getattr(self, k) + v)

    def to_dict(self) -> dict:
        return asdict(self)


class Stopwatch:
    """Adds the wall time of a ``with`` block to a ``Usage``."""

    def __init__(self, usage: Usage):
        self.usage = usage

    def __enter__(self) -> Stopwatch:
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        self.usage.wall_time += time.perf_counter() - self.start


class LanguageModel(abc.ABC):
    """A backend. Subclasses: ``piscale.lm.hf.TransformersLM`` (local, CPU or
    CUDA), ``piscale.lm.llamacpp.LlamaCppLM`` (local GGUF on CPU),
    ``piscale.lm.vllm.VLLMLM`` (vLLM in this process),
    ``piscale.lm.openai.OpenAILM`` (any OpenAI-compatible server)."""

    name: str = "lm"
    usage: Usage
    eos_token_ids: frozenset[int]
    context_length: int
    device: object = None
    """Where the model's torch tensors live (a ``torch.device``), for engines
    that run torch in this process; None for the others (llama.cpp, remote
    servers). Local reward models default to the same device."""

    # -- capacity and vocabulary ----------------------------------------------
    max_sequences: int | None = None
    """How many sequences the engine can hold at once (a fixed number of cache
    slots, as llama.cpp allocates), or None where there is no fixed limit
    (memory permitting). Callers size their batches of problems by it."""

    @property
    def live_sequences(self) -> int | None:
        """How many sequences the engine holds now (opened or forked and not
        yet released), or None for an engine that does not count them."""
        return None

    vocab_size: int | None = None
    """How many token ids the engine accepts (ids run from 0 to
    ``vocab_size - 1``), or None where the engine does not say (a remote
    server). Prompts of token ids are checked against it."""

    # -- text ---------------------------------------------------------------
    @abc.abstractmethod
    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` with no special tokens added."""

    @abc.abstractmethod
    def decode(self, token_ids: Sequence[int]) -> str: ...

    @abc.abstractmethod
    def chat(
        self,
        messages: Sequence[dict],
        *,
        add_generation_prompt: bool = True,
        continue_final_message: bool = False,
    ) -> list[int]:
        """Token ids of ``messages`` formatted with the model's chat template."""

    def prompt_ids(self, question: str, system: str | None = None) -> list[int]:
        """A user question as a chat prompt ready for the assistant's answer."""
        messages = [{"role": "system", "content": system}] if system else []
        messages.append({"role": "user", "content": question})
        return self.chat(messages)

    # -- sequences ----------------------------------------------------------
    @abc.abstractmethod
    async def open(
        self, prompts: Sequence[Sequence[int]], copies: int | Sequence[int] = 1
    ) -> list[list[Handle]]:
        """Prefill each prompt once; return ``copies`` handles per prompt."""

    @abc.abstractmethod
    async def extend(
        self,
        handles: Sequence[Handle],
        params: StepParams,
        seeds: Sequence[int] | None = None,
    ) -> list[StepOutput]:
        """Extend each handle by one step. ``seeds[i]`` seeds the sampling of
        ``handles[i]`` for this step; equal seeds and equal sequences give
        equal steps, whatever else is in the batch."""

    @abc.abstractmethod
    def fork(self, ancestors: Sequence[Handle]) -> list[Handle]:
        """New handles, the i-th a copy of ``ancestors[i]``. The ancestors stay
        valid until released."""

    @abc.abstractmethod
    def release(self, handles: Sequence[Handle]) -> None:
        """Free the handles. Releasing an unknown handle is an error."""

    @abc.abstractmethod
    def token_ids(self, handle: Handle) -> list[int]:
        """All token ids of a sequence: its prompt, then everything generated."""

    # -- scoring ------------------------------------------------------------
    @abc.abstractmethod
    async def score(
        self, prompts: Sequence[Sequence[int]], continuations: Sequence[Sequence[int]]
    ) -> list[ScoreOutput]:
        """log p(continuation | prompt) per continuation token, in batch."""

    async def close(self) -> None:
        """Free everything the backend holds."""


def find_stop(text: str, stops: Sequence[str], search_from: int = 0) -> int | None:
    """End index (exclusive) of the earliest stop string in ``text`` that ends
    after ``search_from``, or None. Searching from a little before the newest
    token catches stop strings split across tokens."""
    best = None
    for stop in stops:
        i = text.find(stop, max(0, search_from - len(stop) + 1))
        if i >= 0 and (best is None or i + len(stop) < best):
            best = i + len(stop)
    return best

