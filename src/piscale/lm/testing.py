"""The backend contract as checks any engine can run against itself.

A third-party backend passes the same suite as piscale's own engines: build
an ``EngineCase`` (the backend, plus two references computed *another way*
than through its step and fork machinery: an unforked greedy generation of a
whole lineage, and the per-token log-probabilities of one full forward pass
over a finished sequence) and await every check in ``CHECKS``, or
``run_contract`` for all of them in order::

    import asyncio
    from piscale.lm.testing import EngineCase, run_contract

    asyncio.run(run_contract(EngineCase(my_lm, my_greedy, my_logprobs)))

Each check is a coroutine that raises ``AssertionError`` when the engine
breaks the contract; the checks need no test framework, and under pytest
each can be one parametrised test (as ``tests/test_lm_contract.py`` does).
Every check releases the sequences it opens, so one backend can run them all.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass

from piscale.lm.base import LanguageModel, StepParams

GREEDY = StepParams(max_tokens=12, stop=("\n",), temperature=0.0)


@dataclass
class EngineCase:
    """A backend and the references its checks compare against."""

    lm: LanguageModel
    reference_greedy: Callable[[list[int], int], list[int]]
    """prompt ids, n new tokens -> the prompt and n greedy tokens, in one go."""
    reference_logprobs: Callable[[list[int], int], list[float]]
    """full ids, prompt length -> log p of each token after the prompt."""
    logprob_tolerance: float = 1e-4


def prompts_for(lm: LanguageModel) -> list[list[int]]:
    """Three chat prompts of different lengths, in the backend's template."""
    return [
        lm.prompt_ids("What is 12 times 7?"),
        lm.prompt_ids("Name a prime number larger than 10, please."),
        lm.prompt_ids("Hi"),
    ]


@contextlib.contextmanager
def raises(kind: type[BaseException], match: str | None = None) -> Iterator[None]:
    """Assert that the block raises ``kind`` with a message that ``match``
    (a regular expression) is found in."""
    try:
        yield
    except kind as error:
        if match is not None:
            assert re.search(match, str(error)), f"{kind.__name__} {str(error)!r} does not match {match!r}"
    else:
        raise AssertionError(f"did not raise {kind.__name__}")


def _close(a: list[float], b: list[float], tolerance: float) -> bool:
    return max(abs(x - y) for x, y in zip(a, b)) < tolerance


async def greedy_lineage(lm: LanguageModel, prompt: list[int], steps: int, fork_every_step: bool) -> list[int]:
    """Generate ``steps`` steps; between steps, fork the sequence into three
    and continue from one of the copies (the others are released)."""
    [[handle]] = await lm.open([prompt])
    for _ in range(steps):
        [_step] = await lm.extend([handle], GREEDY)
        if fork_every_step:
            children = lm.fork([handle, handle, handle])
            lm.release([handle, children[0], children[2]])
            handle = children[1]
    ids = lm.token_ids(handle)
    lm.release([handle])
    return ids


async def check_greedy_lineage_through_forks_equals_one_generation(case: EngineCase) -> None:
    prompt = prompts_for(case.lm)[0]
    ids = await greedy_lineage(case.lm, prompt, steps=4, fork_every_step=True)
    assert ids[: len(prompt)] == prompt
    assert len(ids) > len(prompt) + 4
    assert ids == case.reference_greedy(prompt, len(ids) - len(prompt))


async def check_step_logprobs_match_a_full_forward_pass(case: EngineCase) -> None:
    lm = case.lm
    prompt = prompts_for(lm)[1]
    [[handle]] = await lm.open([prompt])
    stepped: list[float] = []
    for seed in range(3):
        [out] = await lm.extend([handle], StepParams(max_tokens=10, stop=("\n",), temperature=1.0), seeds=[seed])
        assert len(out.logprobs) == len(out.token_ids)
        stepped.extend(out.logprobs)
    ids = lm.token_ids(handle)
    lm.release([handle])
    reference = case.reference_logprobs(ids, len(prompt))
    assert len(stepped) == len(reference)
    assert _close(stepped, reference, case.logprob_tolerance)


async def check_batched_equals_unbatched(case: EngineCase) -> None:
    lm = case.lm
    prompts = prompts_for(lm)
    params = StepParams(max_tokens=10, stop=("\n\n",), temperature=0.9)
    alone = []
    for i, prompt in enumerate(prompts):
        [[handle]] = await lm.open([prompt])
        alone.append((await lm.extend([handle], params, seeds=[100 + i]))[0])
        lm.release([handle])
    groups = await lm.open(prompts)
    handles = [g[0] for g in groups]
    together = await lm.extend(handles, params, seeds=[100, 101, 102])
    lm.release(handles)
    for a, b in zip(alone, together):
        assert a.token_ids == b.token_ids
        assert a.finish_reason == b.finish_reason
        assert _close(a.logprobs, b.logprobs, case.logprob_tolerance)


async def check_concurrent_requests_share_forward_passes(case: EngineCase) -> None:
    lm = case.lm
    prompts = prompts_for(lm)
    params = StepParams(max_tokens=8, stop=("\x00",), temperature=0.0)

    async def one(prompt):
        [[handle]] = await lm.open([prompt])
        [out] = await lm.extend([handle], params)
        lm.release([handle])
        return out

    before = lm.usage.snapshot()
    sequential = [await one(p) for p in prompts]
    sequential_passes = lm.usage.since(before).forward_passes
    before = lm.usage.snapshot()
    concurrent = await asyncio.gather(*(one(p) for p in prompts))
    concurrent_passes = lm.usage.since(before).forward_passes
    assert [o.token_ids for o in concurrent] == [o.token_ids for o in sequential]
    assert concurrent_passes < sequential_passes


async def check_forks_share_one_prefill_and_resampling_prefills_nothing(case: EngineCase) -> None:
    lm = case.lm
    prompt = prompts_for(lm)[0]
    before = lm.usage.snapshot()
    [handles] = await lm.open([prompt], copies=8)
    opened = lm.usage.since(before)
    assert opened.prefill_tokens <= len(prompt)
    params = StepParams(max_tokens=6, stop=("\n\n",), temperature=1.0)
    for step in range(3):
        await lm.extend(handles, params, seeds=list(range(step * 8, step * 8 + 8)))
        survivors = lm.fork([handles[i] for i in (0, 0, 1, 3, 3, 3, 5, 7)])
        lm.release(handles)
        handles = survivors
    total = lm.usage.since(before)
    assert total.prefill_tokens == opened.prefill_tokens
    assert total.generated_tokens >= 8 * 3
    lm.release(handles)


async def check_seeded_sampling_ignores_batch_neighbours(case: EngineCase) -> None:
    lm = case.lm
    prompt = prompts_for(lm)[2]
    params = StepParams(max_tokens=10, stop=("\n\n",), temperature=1.0, top_p=0.9)
    [[a]] = await lm.open([prompt])
    [alone] = await lm.extend([a], params, seeds=[7])
    [handles] = await lm.open([prompt], copies=3)
    outs = await lm.extend(handles, params, seeds=[3, 7, 11])
    lm.release([a, *handles])
    assert outs[1].token_ids == alone.token_ids
    assert len({tuple(o.token_ids) for o in outs}) > 1


async def check_step_ends_at_stop_string_or_token_cap(case: EngineCase) -> None:
    lm = case.lm
    [[handle]] = await lm.open([prompts_for(lm)[0]])
    [capped] = await lm.extend([handle], StepParams(max_tokens=3, stop=("\x00",), temperature=0.0))
    assert capped.finish_reason in ("length", "eos")
    if capped.finish_reason == "length":
        assert len(capped.token_ids) == 3
    # Any character the model emits next is a stop string of that step.
    [probe] = await lm.extend(lm.fork([handle]), StepParams(max_tokens=1, temperature=0.0))
    stop_text = probe.text
    if stop_text and probe.finish_reason != "eos":
        [stopped] = await lm.extend([handle], StepParams(max_tokens=50, stop=(stop_text,), temperature=0.0))
        assert stopped.finish_reason == "stop"
        assert stopped.text.endswith(stop_text) or stop_text in stopped.text
    lm.release([handle])


async def check_score_matches_a_full_forward_pass(case: EngineCase) -> None:
    lm = case.lm
    prompts = prompts_for(lm)
    continuations = [lm.encode(" 84 is the answer."), lm.encode("Eleven"), lm.encode("Hello!\n\nBye")]
    scores = await lm.score(prompts, continuations)
    for prompt, continuation, scored in zip(prompts, continuations, scores):
        reference = case.reference_logprobs(prompt + continuation, len(prompt))
        assert scored.token_ids == continuation
        assert _close(scored.logprobs, reference, case.logprob_tolerance)
        # within len(reference) * tolerance, or one part in a million of a large total
        expected = sum(reference)
        assert abs(scored.total - expected) <= max(1e-6 * abs(expected), len(reference) * case.logprob_tolerance)


async def check_one_token_continuations_of_one_prompt_read_it_once(case: EngineCase) -> None:
    """A judge asks for P(Yes) and P(No) after the same prompt: one read of
    the prompt answers both, and mixing in a longer continuation changes
    no value."""
    lm = case.lm
    prompt = prompts_for(lm)[0]
    yes, no, longer = lm.encode(" Yes")[:1], lm.encode(" No")[:1], lm.encode(" Yes, it is.")
    before = lm.usage.snapshot()
    both = await lm.score([prompt, prompt], [yes, no])
    assert lm.usage.since(before).scored_tokens == len(prompt)
    reference = [case.reference_logprobs(prompt + c, len(prompt)) for c in (yes, no, longer)]
    mixed = await lm.score([prompt, prompt, prompt], [yes, longer, no])
    for scored, expected in zip([*both, mixed[0], mixed[2], mixed[1]], [reference[0], reference[1], *reference]):
        assert _close(scored.logprobs, expected, case.logprob_tolerance)


async def check_a_cancelled_extend_stops_costing_passes(case: EngineCase) -> None:
    """A search that is cancelled (a client that went away) must not keep
    the engine decoding its sequences to the end of the step."""
    lm = case.lm
    [[first, second]] = await lm.open([prompts_for(lm)[0]], copies=2)
    before = lm.usage.snapshot()
    task = asyncio.create_task(lm.extend([first, second], StepParams(max_tokens=200, stop=(), temperature=0.0)))
    for _ in range(1000):
        if lm.usage.since(before).generated_tokens >= 4:
            break
        await asyncio.sleep(0.01)
    task.cancel()
    with raises(asyncio.CancelledError):
        await task
    # A pass under way when the call was cancelled may finish, and on a busy
    # CPU it can take over a second: wait for half a second without a pass.
    settled = False
    for _ in range(20):
        passes = lm.usage.forward_passes
        await asyncio.sleep(0.5)
        if lm.usage.forward_passes == passes:
            settled = True
            break
    assert settled, "the engine kept running forward passes for 10 s after its caller was cancelled"
    assert lm.usage.since(before).generated_tokens < 2 * 200
    lm.release([first, second])  # no longer busy
    [[handle]] = await lm.open([prompts_for(lm)[1]])
    [step] = await lm.extend([handle], GREEDY)
    assert step.token_ids
    lm.release([handle])


async def check_bad_handles_and_inputs_are_rejected(case: EngineCase) -> None:
    lm = case.lm
    with raises(KeyError, match="unknown"):
        lm.release([10**9])
    with raises(KeyError, match="unknown"):
        await lm.extend([10**9], GREEDY)
    with raises(ValueError):
        await lm.open([[]])
    [[handle]] = await lm.open([prompts_for(lm)[2]])
    with raises(ValueError, match="seeds"):
        await lm.extend([handle], GREEDY, seeds=[1, 2])
    lm.release([handle])
    with raises(ValueError):
        StepParams(max_tokens=0)


async def check_one_token_prompts_decode_like_longer_ones(case: EngineCase) -> None:
    lm = case.lm
    first = lm.encode("A")[:1]
    groups = await lm.open([first, prompts_for(lm)[0]])
    outs = await lm.extend([g[0] for g in groups], GREEDY)
    ids = lm.token_ids(groups[0][0])
    lm.release([g[0] for g in groups])
    assert ids == case.reference_greedy(first, len(outs[0].token_ids))


def _unvalidated(params: StepParams, **fields: object) -> StepParams:
    """``params`` with fields set past its validation: what a caller that
    builds parameters by hand, or a bug, could hand an engine."""
    for name, value in fields.items():
        object.__setattr__(params, name, value)
    return params


async def check_a_failing_sequence_fails_only_its_own_request(case: EngineCase) -> None:
    """A sequence the engine cannot sample (here, a temperature of NaN that
    slipped past validation) fails its own ``extend`` call at most; the
    calls sharing its passes get exactly what they get alone, and every
    sequence, the bad one included, can still be extended."""
    lm = case.lm
    prompts = prompts_for(lm)
    params = StepParams(max_tokens=6, stop=(), temperature=1.0)
    alone = []
    for seed, prompt in enumerate(prompts):
        [[handle]] = await lm.open([prompt])
        [out] = await lm.extend([handle], params, seeds=[seed])
        alone.append(out.token_ids)
        lm.release([handle])
    groups = await lm.open([*prompts, prompts[0]])
    good, [bad] = [g[0] for g in groups[:-1]], groups[-1]
    broken = _unvalidated(StepParams(max_tokens=6, stop=(), temperature=1.0), temperature=float("nan"))
    outcomes = await asyncio.gather(
        *(lm.extend([h], params, seeds=[seed]) for seed, h in enumerate(good)),
        lm.extend([bad], broken, seeds=[0]),
        return_exceptions=True,
    )
    for outcome, expected in zip(outcomes[:-1], alone):
        assert not isinstance(outcome, BaseException), f"a good request failed beside a bad one: {outcome!r}"
        assert outcome[0].token_ids == expected
    before = lm.token_ids(bad)
    if isinstance(outcomes[-1], BaseException):
        assert before == prompts[0], "a failed step changed its sequence"
    [after] = await lm.extend([bad], GREEDY)
    assert lm.token_ids(bad)[: len(before)] == before and after.token_ids
    assert lm.token_ids(bad)[len(before) :] == case.reference_greedy(before, len(after.token_ids))[len(before) :]
    lm.release([*good, bad])


CHECKS: tuple[Callable[[EngineCase], Awaitable[None]], ...] = (
    check_greedy_lineage_through_forks_equals_one_generation,
    check_step_logprobs_match_a_full_forward_pass,
    check_batched_equals_unbatched,
    check_concurrent_requests_share_forward_passes,
    check_forks_share_one_prefill_and_resampling_prefills_nothing,
    check_seeded_sampling_ignores_batch_neighbours,
    check_step_ends_at_stop_string_or_token_cap,
    check_score_matches_a_full_forward_pass,
    check_one_token_continuations_of_one_prompt_read_it_once,
    check_a_cancelled_extend_stops_costing_passes,
    check_bad_handles_and_inputs_are_rejected,
    check_one_token_prompts_decode_like_longer_ones,
    check_a_failing_sequence_fails_only_its_own_request,
)
"""Every check of the contract, in the order ``run_contract`` runs them."""


async def run_contract(case: EngineCase) -> None:
    """Run every check against ``case``; the first failure raises."""
    for check in CHECKS:
        await check(case)
