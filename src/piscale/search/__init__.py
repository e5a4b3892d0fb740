"""Inference-time scaling algorithms behind one entry point.

>>> result = await run(lm, reward, "What is 2 + 3?", algorithm="pf", budget=8, seed=0)
>>> result.answer, result.usage["generated_tokens"]

``ALGORITHMS`` names them: particle filtering (``pf``), particle Gibbs
(``pg``), parallel tempering (``pt``), best-of-N (``bon``), weighted best-of-N
(``wbon``), self-consistency (``sc``), beam search (``beam``) and DVTS
(``dvts``). Each is a short module reading like its pseudocode; all share the
particle tree (``piscale.search.node``) and the backend/reward driver
(``piscale.search.driver``); the SMC ones share one kernel
(``piscale.search.kernel``).

The budget means what Puri et al. (2025) mean: particles for ``pf``;
particles x iterations for ``pg``; particles x chains x iterations for ``pt``;
samples for ``bon``, ``wbon`` and ``sc``; generations per step (N, kept N/M
times M expansions) for ``beam`` and ``dvts``.

``run_many`` solves many questions at once: their searches run concurrently,
so the backend merges their steps into the same batches, and each question
draws from its own generator seeded by ``seed``, so its result is the same as
when it is solved alone.
"""

from __future__ import annotations

import asyncio
import functools
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from piscale.grading import extract_answer
from piscale.lm.base import LanguageModel
from piscale.rewards.base import Reward
from piscale.search import beam, bon, dvts, pf, pg, pt, sc, wbon
from piscale.search.driver import Driver
from piscale.search.layout import Layout
from piscale.search.node import Node, split_steps
from piscale.search.result import Candidate, Outcome, SearchResult
from piscale.search.settings import Settings, build_settings
from piscale.search.trace import TraceRecorder, load_trace

__all__ = [
    "ALGORITHMS",
    "DEFAULT_SYSTEM_PROMPT",
    "Algorithm",
    "Candidate",
    "SearchResult",
    "Settings",
    "load_trace",
    "run",
    "run_many",
    "split_steps",
]

DEFAULT_SYSTEM_PROMPT = "Please reason step by step, and put your final answer within \\boxed{}."

_GENERATION = ("temperature", "top_p", "max_steps", "max_step_tokens", "max_tokens", "step_delimiter")
_SMC = ("aggregation", "potential", "softmax_temperature", "ess_threshold", "selection")


@dataclass(frozen=True)
class Algorithm:
    name: str
    title: str
    search: Callable[[Driver, Any, Settings, np.random.Generator], Awaitable[Outcome]]
    """runs the search on the ``Layout`` that ``layout`` returned."""
    layout: Callable[[int, Settings], Layout]
    """how the budget is spent (particles, iterations, ...); raises if it cannot be."""
    options: tuple[str, ...]
    defaults: dict[str, Any] = field(default_factory=dict)
    reward_optional: Callable[[Any], bool] = lambda layout: False
    """whether the search can run without a reward at this layout."""


ALGORITHMS: dict[str, Algorithm] = {
    a.name: a
    for a in (
        Algorithm("pf", "particle filtering", pf.search, pf.layout, (*_GENERATION, *_SMC, "resampler")),
        Algorithm("pg", "particle Gibbs", pg.search, pg.layout, (*_GENERATION, *_SMC, "iterations"), {"iterations": 4}),
        Algorithm(
            "pt", "parallel tempering", pt.search, pt.layout,
            (*_GENERATION, *_SMC, "iterations", "chains", "temperatures"), {"iterations": 2, "chains": 2},
        ),
        Algorithm(
            "bon", "best-of-N", bon.search, bon.layout, (*_GENERATION, "aggregation"),
            reward_optional=bon.reward_optional,
        ),
        Algorithm("wbon", "weighted best-of-N", wbon.search, wbon.layout, (*_GENERATION, "aggregation")),
        Algorithm(
            "sc", "self-consistency", sc.search, sc.layout, (*_GENERATION, "aggregation"),
            reward_optional=lambda layout: True,
        ),
        Algorithm("beam", "beam search", beam.search, beam.layout, (*_GENERATION, "aggregation", "beam_width")),
        Algorithm("dvts", "diverse verifier tree search", dvts.search, dvts.layout, (*_GENERATION, "aggregation", "beam_width")),
    )
}


def algorithm(name: str) -> Algorithm:
    try:
        return ALGORITHMS[name]
    except KeyError:
        raise ValueError(f"unknown algorithm {name!r}; choose one of {', '.join(ALGORITHMS)}") from None


def prepare(name: str, budget: int, seed: int, options: dict[str, Any]) -> tuple[Algorithm, Settings, Layout]:
    """Validate a request before any work is done."""
    spec = algorithm(name)
    if isinstance(budget, bool) or not isinstance(budget, (int, np.integer)) or budget < 1:
        raise ValueError(f"budget must be a positive integer, got {budget!r}")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    settings = build_settings(spec.name, spec.options, spec.defaults, options)
    return spec, settings, spec.layout(int(budget), settings)


async def run(
    lm: LanguageModel,
    reward: Reward | None,
    question: str,
    algorithm: str = "pf",
    budget: int = 8,
    seed: int = 0,
    *,
    system: str | None = DEFAULT_SYSTEM_PROMPT,
    trace: bool = False,
    prompt_ids: Sequence[int] | None = None,
    recorder: TraceRecorder | None = None,
    progress: Callable[[dict], None] | None = None,
    **options: Any,
) -> SearchResult:
    """Answer ``question`` with ``algorithm`` at ``budget``; see the module doc.
    ``options`` are the algorithm's settings (``piscale.search.Settings``).
    ``prompt_ids`` replaces the chat prompt built from ``question`` and
    ``system`` (a server passes the prompt its client sent; the reward still
    reads ``question``). ``recorder`` watches the search instead of the
    trace that ``trace=True`` keeps (a server reports progress with one);
    ``progress`` is called with a summary of every step (see
    ``piscale.search.trace.progress``) plus the tokens generated so far and
    the seconds since the search began."""
    spec, settings, layout = prepare(algorithm, budget, seed, options)
    if not isinstance(question, str) or not question.strip():
        raise ValueError("the question must be a non-empty string")
    if reward is None and not spec.reward_optional(layout):
        raise ValueError(f"{spec.title} ({spec.name}) needs a reward; only sc and bon at budget 1 run without one")
    keep_trace = trace or recorder is not None

    def report(summary: dict) -> None:
        # Called during the search only, when ``driver`` and ``started`` exist.
        elapsed = time.perf_counter() - started
        progress({**summary, "generated_tokens": driver.usage.generated_tokens, "seconds": elapsed})

    if recorder is None and (trace or progress is not None):
        recorder = TraceRecorder(spec.name, question, report=None if progress is None else report)
    prompt = list(prompt_ids) if prompt_ids is not None else lm.prompt_ids(question, system)
    driver = Driver(lm, reward, question, prompt, settings, recorder)
    started = time.perf_counter()
    outcome = await spec.search(driver, layout, settings, np.random.default_rng(int(seed)))
    wall_time = time.perf_counter() - started
    driver.check_survivors(outcome.nodes)
    if outcome.nodes[outcome.chosen].failed:
        # every survivor tied at zero weight with the failed ones; take a survivor
        outcome.chosen = next(i for i, node in enumerate(outcome.nodes) if not node.failed)

    candidates = [_candidate(node, weight) for node, weight in zip(outcome.nodes, outcome.log_weights)]
    chosen = candidates[outcome.chosen]
    return SearchResult(
        question=question,
        algorithm=spec.name,
        budget=int(budget),
        seed=int(seed),
        settings={**{name: _setting(settings, name) for name in spec.options}, **layout.as_dict()},
        answer=chosen.answer,
        text=chosen.text,
        chosen=outcome.chosen,
        candidates=candidates,
        usage=driver.usage.to_dict(wall_time),
        failures=driver.failures,
        log_evidence=_finite_or_none(outcome.log_evidence),
        trace=recorder.finish(outcome.nodes[outcome.chosen], chosen.answer) if keep_trace else None,
    )


async def run_many(
    lm: LanguageModel,
    reward: Reward | None,
    questions: Sequence[str],
    algorithm: str = "pf",
    budget: int = 8,
    seed: int = 0,
    *,
    system: str | None = DEFAULT_SYSTEM_PROMPT,
    trace: bool = False,
    progress: Callable[[int, dict], None] | None = None,
    **options: Any,
) -> list[SearchResult]:
    """``run`` for every question, concurrently (one backend batch per step
    across all questions); each result equals solving its question alone.
    ``progress(i, summary)`` reports the steps of question i."""
    if isinstance(questions, str):
        raise TypeError("questions must be a list of strings, not one string")
    questions = list(questions)
    prepare(algorithm, budget, seed, options)
    return list(
        await asyncio.gather(
            *(
                run(
                    lm, reward, q, algorithm, budget, seed, system=system, trace=trace,
                    progress=None if progress is None else functools.partial(progress, i), **options,
                )
                for i, q in enumerate(questions)
            )
        )
    )


def _candidate(node: Node, log_weight: float | None) -> Candidate:
    text = node.response()
    finite = log_weight is not None and np.isfinite(log_weight)
    return Candidate(
        text=text,
        answer=extract_answer(text),
        score=node.score,
        log_weight=float(log_weight) if finite else None,
        finished=node.complete,
    )


def _finite_or_none(value: float | None) -> float | None:
    """JSON has no infinities: an estimate of zero evidence is stored as None."""
    if value is None or not np.isfinite(value):
        return None
    return float(value)


def _setting(settings: Settings, name: str) -> Any:
    value = settings.chain_temperatures if name == "temperatures" else getattr(settings, name)
    return list(value) if isinstance(value, tuple) else value

