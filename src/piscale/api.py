"""The Python entry points: build a backend and a reward from specs, then search.

>>> import piscale
>>> result = piscale.solve("What is 12 * 7?", model="smollm2-135m-instruct", reward="arith", budget=8)
>>> result.answer, result.usage["generated_tokens"]

Backends and rewards are cached per process by spec, so repeated calls reuse
loaded models. Pass ``lm=`` / ``reward=`` objects to bypass the specs.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping, Sequence
from functools import lru_cache

from piscale.lm.base import LanguageModel, StepParams
from piscale.models import DEFAULT_MODEL
from piscale.rewards.base import Reward
from piscale.search import DEFAULT_SYSTEM_PROMPT, SearchResult

DEFAULT_REWARD = "judge"
"""An LLM judge over the policy model itself: needs no extra weights."""


MAX_AUTOMATIC_SLOTS = 64
"""The most cache slots chosen for llama.cpp when the caller names none;
each reserves ``context_length`` cells (64 x 2048 cells of
SmolLM2-135M take 3 GB), and 64 sequences decode near the CPU's peak."""


def engine_options_for(
    spec: str, engine: str, device: str | None, options: Mapping | None, sequences: int
) -> dict:
    """``options`` with llama.cpp's ``max_sequences`` set, when not given, to
    hold ``sequences`` sequences at once plus two for scoring (at least 16,
    at most ``MAX_AUTOMATIC_SLOTS``). Other engines hold what fits memory and
    get ``options`` unchanged."""
    from piscale.lm import pick_engine

    options = dict(options or {})
    if "max_sequences" in options or pick_engine(spec, engine, device) != "llamacpp":
        return options
    return {**options, "max_sequences": min(MAX_AUTOMATIC_SLOTS, max(16, sequences + 2))}


@lru_cache(maxsize=8)
def _backend(spec: str, engine: str, device: str | None, options: tuple = ()) -> LanguageModel:
    from piscale.lm import load

    return load(spec, engine=engine, device=device, **dict(options))


def load_lm(
    spec: str = DEFAULT_MODEL, *, engine: str = "auto", device: str | None = None, options: Mapping | None = None
) -> LanguageModel:
    """A backend for ``spec``, loaded once per process and set of engine
    ``options`` (keyword arguments of the engine's class, e.g.
    ``{"max_sequences": 64}`` for llama.cpp)."""
    return _backend(spec, engine, device, tuple(sorted((options or {}).items())))


def load_reward(
    spec: str | None,
    *,
    policy: LanguageModel,
    policy_spec: str,
    engine: str = "auto",
    device: str | None = None,
    trust_remote_code: bool = False,
) -> Reward | None:
    """A reward for ``spec`` (see ``piscale.rewards.from_spec``); ``"judge"``
    alone means a judge over the policy model. None stays None.

    Local reward models go on ``device`` when given, else on the policy's
    device (a policy on CUDA gets its PRM on CUDA too), else the CPU.
    ``trust_remote_code`` lets a checkpoint run its own code (Qwen2.5-Math-PRM
    needs it); it is off unless asked for."""
    if spec is None or spec == "none":
        return None
    from piscale.rewards import from_spec

    if spec == "judge":
        spec = f"judge:{policy_spec}"
    return from_spec(
        spec,
        policy=policy,
        policy_spec=policy_spec,
        device=reward_device(device, policy),
        load_lm=lambda s: load_lm(s, engine=engine, device=device),
        trust_remote_code=trust_remote_code,
    )


def reward_device(device: str | None, policy: LanguageModel) -> str:
    """``device`` if given, else where the policy's tensors are, else "cpu"."""
    if device is not None:
        return device
    return str(policy.device) if policy.device is not None else "cpu"


def _resolve(model, reward, engine, device, engine_options=None, trust_remote_code=False):
    if isinstance(model, LanguageModel):
        lm = model
    else:
        lm = load_lm(model, engine=engine, device=device, options=engine_options)
    model_spec = model if isinstance(model, str) else lm.name
    if isinstance(reward, Reward) or reward is None:
        return lm, reward
    reward_model = load_reward(
        reward, policy=lm, policy_spec=model_spec, engine=engine, device=device, trust_remote_code=trust_remote_code
    )
    return lm, reward_model


async def asolve_many(
    questions: Sequence[str],
    *,
    model: str | LanguageModel = DEFAULT_MODEL,
    reward: str | Reward | None = DEFAULT_REWARD,
    algorithm: str = "pf",
    budget: int = 8,
    seed: int = 0,
    engine: str = "auto",
    device: str | None = None,
    engine_options: Mapping | None = None,
    trust_remote_code: bool = False,
    system: str | None = DEFAULT_SYSTEM_PROMPT,
    trace: bool = False,
    progress: Callable[[int, dict], None] | None = None,
    **options,
) -> list[SearchResult]:
    """Search every question at once; the backend batches them together.

    ``model`` and ``reward`` are specs (``piscale models list``;
    ``piscale.rewards.from_spec``) or objects; ``engine`` is auto, hf,
    llamacpp, vllm or openai; ``engine_options`` go to the engine's constructor
    (e.g. llama.cpp's ``max_sequences``); ``trust_remote_code`` lets a reward
    checkpoint run its own code; ``system`` is the system prompt; ``trace``
    keeps each search's genealogy; ``progress(i, summary)`` is called after
    every step of question i (``piscale.search.trace.progress``). ``options`` are the algorithm's settings
    (``piscale.search.Settings``: ``temperature``, ``potential``,
    ``resampler``, ``selection`` ...)."""
    from piscale.search import run_many

    if isinstance(model, str):
        engine_options = engine_options_for(model, engine, device, engine_options, budget * len(questions))
    lm, reward_model = _resolve(model, reward, engine, device, engine_options, trust_remote_code)
    if algorithm == "sc" and reward == DEFAULT_REWARD:
        reward_model = None  # self-consistency votes; it needs no reward
    return await run_many(
        lm, reward_model, list(questions), algorithm=algorithm, budget=budget, seed=seed,
        system=system, trace=trace, progress=progress, **options,
    )


async def asolve(question: str, **kwargs) -> SearchResult:
    """``solve`` inside a running event loop."""
    [result] = await asolve_many([question], **kwargs)
    return result


def solve(
    question: str,
    *,
    model: str | LanguageModel = DEFAULT_MODEL,
    reward: str | Reward | None = DEFAULT_REWARD,
    algorithm: str = "pf",
    budget: int = 8,
    seed: int = 0,
    engine: str = "auto",
    device: str | None = None,
    engine_options: Mapping | None = None,
    trust_remote_code: bool = False,
    system: str | None = DEFAULT_SYSTEM_PROMPT,
    trace: bool = False,
    progress: Callable[[int, dict], None] | None = None,
    **options,
) -> SearchResult:
    """Answer one question with an inference-time scaling algorithm
    (``algorithm``: pf, pg, pt, bon, wbon, sc, beam or dvts) at ``budget``;
    the arguments are those of ``asolve_many``. Returns a ``SearchResult``."""
    return asyncio.run(
        asolve(
            question, model=model, reward=reward, algorithm=algorithm, budget=budget, seed=seed, engine=engine,
            device=device, engine_options=engine_options, trust_remote_code=trust_remote_code, system=system,
            trace=trace, progress=progress, **options,
        )
    )


def solve_many(questions: Sequence[str], **kwargs) -> list[SearchResult]:
    """``solve`` for many questions, batched through the same backend; the
    arguments are those of ``asolve_many``."""
    return asyncio.run(asolve_many(questions, **kwargs))


async def sample(
    lm: LanguageModel,
    question: str,
    n: int,
    *,
    max_tokens: int = 512,
    temperature: float = 0.8,
    top_p: float = 1.0,
    seed: int = 0,
    seeds: Sequence[int] | None = None,
    system: str | None = None,
) -> list:
    """``n`` complete answers to ``question``, sampled in one batch; answer i
    is seeded by ``seeds[i]`` when given, else by ``seed * 1_000_003 + i``.

    Returns one ``StepOutput`` per answer (tokens, text, log-probabilities and
    whether it ended on EOS or on the token cap)."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    if seeds is None:
        seeds = [seed * 1_000_003 + i for i in range(n)]
    elif len(seeds) != n:
        raise ValueError(f"{len(seeds)} seeds for {n} answers")
    [handles] = await lm.open([lm.prompt_ids(question, system)], copies=n)
    params = StepParams(max_tokens=max_tokens, stop=(), temperature=temperature, top_p=top_p)
    try:
        return await lm.extend(handles, params, seeds=list(seeds))
    finally:
        lm.release(handles)
