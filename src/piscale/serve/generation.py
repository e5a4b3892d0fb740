"""The work behind one request: plain generation or a search.

Plain generation is what an ordinary completion server does, on the backend
protocol directly: open the prompt (or fork a kept sequence holding it),
extend every choice by one step that ends at the request's stop strings, EOS
or ``max_tokens``, and cut the text at the stop string. Streaming extends in
chunks of a few tokens and sends what is safe to send: text that cannot be the
start of a stop string still being written.

Seeds: choice i of a request with seed s samples with ``derive_seed(s, i)``
(s itself for the first choice), and chunk k of a streamed choice with
``derive_seed(seed_i, k)``, so a request that finishes within its first call
gives the same tokens whether streamed or not, and equal requests give equal
answers whatever else the server is doing.

A search runs one of ``piscale.search.ALGORITHMS`` on the request's prompt
tokens (a chat prompt is formatted by the model's chat template, exactly as
the client sent its messages), with progress reported after every step.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from piscale.lm.base import StepOutput, StepParams, find_stop
from piscale.rewards.base import Reward
from piscale.search import run
from piscale.search.node import split_steps
from piscale.search.settings import Settings
from piscale.search.trace import TraceRecorder
from piscale.serve.kept import KeptSequences
from piscale.serve.metered import MeteredLM

_MASK63 = (1 << 63) - 1


def derive_seed(seed: int, index: int) -> int:
    """The ``index``-th seed derived from ``seed``: ``seed`` itself for index
    0, else a splitmix64 hash of the pair (kept under 2^63)."""
    if index == 0:
        return seed & _MASK63
    z = (seed + index * 0x9E3779B97F4A7C15) & ((1 << 64) - 1)
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & ((1 << 64) - 1)
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & ((1 << 64) - 1)
    return (z ^ (z >> 31)) & _MASK63


@dataclass(frozen=True)
class Sampling:
    """How plain generation samples every choice of one prompt."""

    max_tokens: int
    temperature: float
    top_p: float
    stop: tuple[str, ...]
    include_stop: bool
    seeds: tuple[int, ...]
    """one per choice."""

    def params(self, max_tokens: int | None = None) -> StepParams:
        return StepParams(
            max_tokens=max_tokens or self.max_tokens, stop=self.stop, temperature=self.temperature, top_p=self.top_p
        )


@dataclass
class Choice:
    """One finished choice of plain generation."""

    token_ids: list[int]
    logprobs: list[float]
    text: str
    finish_reason: str
    """OpenAI's: ``stop`` (a stop string or end of sequence) or ``length``."""
    stop_reason: str | None = None
    """the stop string that ended it (None for end of sequence or length)."""


@dataclass
class Delta:
    """What one streamed chunk adds to a choice."""

    index: int
    text: str
    token_ids: list[int]
    logprobs: list[float]
    finish_reason: str | None = None
    stop_reason: str | None = None


def cut_at_stop(text: str, stops: Sequence[str], include_stop: bool, search_from: int = 0) -> tuple[str, str] | None:
    """(text up to the first stop string, that stop string), or None when no
    stop string occurs; the stop string stays when ``include_stop``."""
    end = find_stop(text, stops, search_from)
    if end is None:
        return None
    stop = max((s for s in stops if text[end - len(s) : end] == s), key=len)
    return (text[:end] if include_stop else text[: end - len(stop)]), stop


def settle(output: StepOutput, sampling: Sampling) -> Choice:
    """A backend step as an OpenAI choice."""
    if output.finish_reason == "eos":
        return Choice(output.token_ids, output.logprobs, output.text, "stop")
    cut = cut_at_stop(output.text, sampling.stop, sampling.include_stop)
    if cut is not None:
        return Choice(output.token_ids, output.logprobs, cut[0], "stop", cut[1])
    return Choice(output.token_ids, output.logprobs, output.text, "length")


async def generate(view: MeteredLM, kept: KeptSequences, prompt: Sequence[int], sampling: Sampling) -> list[Choice]:
    """Every choice of one prompt, in one backend call."""
    handles = await kept.acquire(view, prompt, len(sampling.seeds))
    outputs = await view.extend(handles, sampling.params(), list(sampling.seeds))
    _put_away(view, kept, handles, outputs)
    return [settle(output, sampling) for output in outputs]


def _put_away(view: MeteredLM, kept: KeptSequences, handles: Sequence[int], outputs: Sequence[StepOutput]) -> None:
    """Keep the sequences that can be continued; release the others."""
    for handle, output in zip(handles, outputs):
        if output.finish_reason == "eos" or kept.capacity == 0:
            view.release([handle])
        else:
            kept.keep(view, handle)


@dataclass
class _Streamed:
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    sent_chars: int = 0
    sent_tokens: int = 0


async def generate_stream(
    view: MeteredLM, kept: KeptSequences, prompt: Sequence[int], sampling: Sampling, chunk_tokens: int
) -> AsyncIterator[list[Delta]]:
    """Plain generation in chunks of ``chunk_tokens`` tokens; yields, after
    every backend call, the deltas of the choices that have something new.
    A stop string split across two chunks is found in the joined text; text
    that may be the start of a stop string is held back until it is not."""
    handles = await kept.acquire(view, prompt, len(sampling.seeds))
    states = [_Streamed() for _ in handles]
    active = list(range(len(handles)))
    hold = max((len(s) for s in sampling.stop), default=1) - 1
    round_ = 0
    while active:
        room = sampling.max_tokens - len(states[active[0]].token_ids)
        outputs = await view.extend(
            [handles[i] for i in active],
            sampling.params(min(chunk_tokens, room)),
            [derive_seed(sampling.seeds[i], round_) for i in active],
        )
        round_ += 1
        deltas, still = [], []
        for i, output in zip(active, outputs):
            state = states[i]
            state.token_ids += output.token_ids
            state.logprobs += output.logprobs
            text = view.decode(state.token_ids)
            finish: tuple[str, str | None] | None = None
            cut = None if output.finish_reason == "eos" else cut_at_stop(text, sampling.stop, sampling.include_stop, state.sent_chars)
            if output.finish_reason == "eos":
                finish, final = ("stop", None), text
            elif cut is not None:
                finish, final = ("stop", cut[1]), cut[0]
            elif output.finish_reason == "stop":  # the backend saw a stop its text no longer shows
                finish, final = ("stop", None), text
            elif output.finish_reason == "context" or len(state.token_ids) >= sampling.max_tokens:
                finish, final = ("length", None), text
            else:
                final = text[: max(state.sent_chars, len(text) - hold)]
                final = final.rstrip("\ufffd")  # a character whose bytes are not all there yet
            new_text = final[state.sent_chars :]
            state.sent_chars = max(state.sent_chars, len(final))
            new_tokens = state.token_ids[state.sent_tokens :]
            new_logprobs = state.logprobs[state.sent_tokens :]
            state.sent_tokens = len(state.token_ids)
            if finish is not None:
                deltas.append(Delta(i, new_text, new_tokens, new_logprobs, *finish))
                _put_away(view, kept, [handles[i]], [output])
            else:
                still.append(i)
                if new_text or new_tokens:
                    deltas.append(Delta(i, new_text, new_tokens, new_logprobs))
        active = still
        if deltas:
            yield deltas


async def prompt_logprobs(view: MeteredLM, prompt: Sequence[int], start: int = 1) -> list[float | None]:
    """log p(token | tokens before it) for the prompt tokens from position
    ``start`` on (at least 1: the first token has no context); None before.
    Scoring ``prompt[start:]`` given ``prompt[:start]`` in one call is what
    a client scoring a continuation asks for (``logprob_start_len``)."""
    start = max(1, start)
    if len(prompt) <= start:
        return [None] * len(prompt)
    [scored] = await view.score([list(prompt[:start])], [list(prompt[start:])])
    return [None] * start + list(scored.logprobs)


# -- search -------------------------------------------------------------------


@dataclass(frozen=True)
class SearchChoice:
    algorithm: str
    budget: int
    reward: str | None
    """a reward spec, or None for no reward."""
    options: dict[str, Any]
    seed: int


@dataclass
class SearchOutput:
    text: str
    answer: str | None
    finish_reason: str
    score: float | None
    candidates: list[dict[str, Any]]
    settings: dict[str, Any]
    steps: list[str]
    """the chosen text cut at the step delimiter (how it streams)."""
    search_usage: dict[str, Any]
    failures: list[dict[str, Any]]
    """particles dropped because the backend failed to write their step."""


async def search(
    view: MeteredLM,
    reward: Reward | None,
    prompt: Sequence[int],
    question: str,
    choice: SearchChoice,
    report: Callable[[dict[str, Any]], None] | None = None,
) -> SearchOutput:
    """Run the chosen algorithm on ``prompt`` (``piscale.search.run``), with
    the reward reading ``question``."""
    recorder = TraceRecorder(choice.algorithm, question, report=report) if report is not None else None
    result = await run(
        view, reward, question, choice.algorithm, choice.budget, choice.seed,
        prompt_ids=prompt, recorder=recorder, **dict(choice.options),
    )
    chosen = result.candidates[result.chosen]
    data = result.to_dict()
    return SearchOutput(
        text=result.text,
        answer=result.answer,
        finish_reason="stop" if chosen.finished else "length",
        score=chosen.score,
        candidates=data["candidates"],
        settings=result.settings,
        steps=split_steps(result.text, result.settings.get("step_delimiter", Settings.step_delimiter))
        if result.text
        else [],
        search_usage=dict(result.usage),
        failures=result.failures,
    )
