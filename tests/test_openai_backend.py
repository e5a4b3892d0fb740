"""``OpenAILM`` against ``piscale serve --model toy``: every protocol
operation gives exactly what the toy backend gives when used directly, and a
search through the server equals the same search run locally. Failure
handling (retries, dropped sequences, the concurrency limit) is checked
against scripted servers (httpx mock transports)."""

from __future__ import annotations

import asyncio
import json
import math

import httpx
import pytest

from piscale import search
from piscale.lm import load
from piscale.lm.base import StepParams
from piscale.lm.openai import FailedStep, OpenAILM, ServerError
from piscale.lm.toy import ToyLM
from piscale.rewards.prefix import PrefixReward
from test_serve_support import serve_subprocess


@pytest.fixture(scope="module")
def base():
    with serve_subprocess("--model", "toy") as url:
        yield url


@pytest.fixture
def remote(base):
    return OpenAILM.from_spec(f"openai:toy@{base}/v1")


def outputs_as_tuples(outputs):
    return [(o.token_ids, o.text, [round(v, 12) for v in o.logprobs], o.finish_reason) for o in outputs]


def test_text_functions_match_the_toy(remote):
    toy = ToyLM()
    assert remote.context_length == toy.context_length
    assert remote.encode("Add 2\n\n\\boxed{7} é") == toy.encode("Add 2\n\n\\boxed{7} é")
    ids = toy.encode("Add 1\n\nAdd 2")
    assert remote.decode(ids) == toy.decode(ids)
    assert remote.prompt_ids("What is 2 + 2?", system="Be brief.") == toy.prompt_ids("What is 2 + 2?", system="Be brief.")
    messages = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "Add 1"}]
    assert remote.chat(messages, add_generation_prompt=False, continue_final_message=True) == toy.chat(
        messages, add_generation_prompt=False, continue_final_message=True
    )


async def exercise(lm, prompt):
    """open, extend, fork, extend again (sampled, greedy, capped), as a search would."""
    sampled = StepParams(max_tokens=20, stop=("\n\n",), temperature=0.8)
    [handles] = await lm.open([prompt], copies=4)
    first = await lm.extend(handles, sampled, seeds=[1, 2, 3, 4])
    live = [h for h, o in zip(handles, first) if o.finish_reason != "eos"]
    lm.release([h for h in handles if h not in live])
    children = lm.fork([live[0], live[0], live[-1]])
    lm.release(live)
    second = await lm.extend(children, sampled, seeds=[9, 10, 11])
    greedy = await lm.extend(
        [h for h, o in zip(children, second) if o.finish_reason != "eos"], StepParams(max_tokens=2, stop=(), temperature=0.0)
    )
    return first, second, greedy, [lm.token_ids(h) for h in children]


async def test_extend_and_fork_match_the_toy(remote):
    toy = ToyLM()
    prompt = toy.prompt_ids("What is 5 + 3?")
    local = await exercise(toy, prompt)
    through_server = await exercise(remote, prompt)
    for mine, theirs in zip(local[:3], through_server[:3]):
        assert outputs_as_tuples(theirs) == outputs_as_tuples(mine)
    assert through_server[3] == local[3]
    assert remote.failures == []


async def test_the_context_window_ends_a_step(base):
    prompt = ToyLM().prompt_ids("What is 1 + 1?")
    toy = ToyLM(context_length=len(prompt) + 2)
    remote = OpenAILM("toy", base + "/v1", context_length=len(prompt) + 2)
    results = []
    for lm in (toy, remote):
        [[handle]] = await lm.open([prompt])
        results.append(await lm.extend([handle], StepParams(max_tokens=10, stop=(), temperature=0.0)))
    assert outputs_as_tuples(results[1]) == outputs_as_tuples(results[0])
    assert results[0][0].finish_reason == "context"


async def test_score_matches_the_toy(remote):
    toy = ToyLM()
    prompt = toy.prompt_ids("What is 2 + 1?")
    continuations = [toy.encode("Add 1\n\nAdd 2\n\n\\boxed{5}"), toy.encode("Hello"), []]
    expected = await toy.score([prompt] * 3, continuations)
    got = await remote.score([prompt] * 3, continuations)
    assert [s.token_ids for s in got] == [s.token_ids for s in expected]
    assert got[0].logprobs == pytest.approx(expected[0].logprobs)
    assert got[1].logprobs == [-math.inf] * len(continuations[1])
    assert got[2].logprobs == []


class FavourTwos(PrefixReward):
    """A reward that prefers "Add 2" steps and a boxed 5, so resampling has
    something to choose."""

    async def score_prefixes(self, items):
        scores = []
        for _, steps in items:
            text = "".join(steps)
            scores.append(min(0.95, 0.2 + 0.2 * text.count("Add 2") + (0.5 if "\\boxed{5}" in text else 0.0)))
        return scores


@pytest.mark.parametrize("algorithm,budget", [("pf", 6), ("pg", 8), ("beam", 4)])
async def test_a_search_through_the_server_equals_the_local_search(remote, algorithm, budget):
    question = "What is 4 + 1?"
    local = await search.run(ToyLM(), FavourTwos(), question, algorithm, budget, seed=5)
    through = await search.run(remote, FavourTwos(), question, algorithm, budget, seed=5)
    assert through.text == local.text
    assert [c.text for c in through.candidates] == [c.text for c in local.candidates]
    assert through.usage["generated_tokens"] == local.usage["generated_tokens"]


def test_load_routes_openai_specs(base):
    lm = load(f"openai:toy@{base}/v1")
    assert isinstance(lm, OpenAILM) and lm.model == "toy" and lm.base_url == base + "/v1"
    assert OpenAILM.from_spec("openai:org/model-7b").base_url == "http://127.0.0.1:8000/v1"
    with pytest.raises(ValueError, match="openai:MODEL@"):
        OpenAILM.from_spec("openai:@http://x")
    with pytest.raises(ValueError, match="prompt_format"):
        OpenAILM("m", "http://x/v1", prompt_format="bytes")


# -- scripted servers ---------------------------------------------------------------------


def completion(token: int = 7, logprob: float = -0.5, finish: str = "length") -> dict:
    return {
        "choices": [
            {"index": 0, "text": "x", "token_ids": [token], "logprobs": {"token_logprobs": [logprob], "tokens": [f"token_id:{token}"]},
             "finish_reason": finish, "stop_reason": None}
        ],
        "usage": {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4},
    }


def scripted(handler) -> OpenAILM:
    return OpenAILM(
        "m", "http://scripted/v1", context_length=100, retry_backoff=0.001, max_retries=3,
        transport=httpx.MockTransport(handler),
    )


async def test_transient_errors_are_retried():
    calls = []

    def handler(request: httpx.Request) -> httpx.Response:
        calls.append(json.loads(request.content))
        if len(calls) <= 2:
            return httpx.Response(503, json={"error": {"message": "busy"}})
        return httpx.Response(200, json=completion())

    lm = scripted(handler)
    [[handle]] = await lm.open([[1, 2, 3]])
    [output] = await lm.extend([handle], StepParams(max_tokens=1, stop=()), seeds=[42])
    assert (output.token_ids, output.logprobs, output.finish_reason) == ([7], [-0.5], "length")
    assert lm.retries == 2 and len(calls) == 3
    assert calls[-1]["prompt"] == [1, 2, 3] and calls[-1]["seed"] == 42 and calls[-1]["max_tokens"] == 1
    assert lm.token_ids(handle) == [1, 2, 3, 7]


async def test_a_failing_sequence_is_dropped_with_its_reason():
    def handler(request: httpx.Request) -> httpx.Response:
        if json.loads(request.content)["seed"] == 13:
            return httpx.Response(400, json={"error": {"message": "no such thing"}})
        return httpx.Response(200, json=completion())

    lm = scripted(handler)
    [handles] = await lm.open([[1, 2]], copies=3)
    outputs = await lm.extend(handles, StepParams(max_tokens=1, stop=()), seeds=[1, 13, 2])
    assert [o.finish_reason for o in outputs] == ["length", "error", "length"]
    assert isinstance(outputs[1], FailedStep) and "no such thing" in outputs[1].error
    assert [f.handle for f in lm.failures] == [handles[1]]
    assert lm.token_ids(handles[1]) == [1, 2]  # nothing was added to it
    assert lm.retries == 0  # a 400 is not retried
    twin = lm.fork([handles[1]])[0]
    with pytest.raises(ServerError, match="2 of 2"):  # when every sequence fails, the call fails
        await lm.extend([handles[1], twin], StepParams(max_tokens=1, stop=()), seeds=[13, 13])
    strict = OpenAILM("m", "http://scripted/v1", context_length=100, on_failure="raise", transport=httpx.MockTransport(handler))
    [pair] = await strict.open([[1, 2]], copies=2)
    with pytest.raises(ServerError, match="1 of 2"):
        await strict.extend(pair, StepParams(max_tokens=1, stop=()), seeds=[1, 13])


async def test_requests_respect_the_concurrency_limit():
    in_flight, peak = 0, 0

    async def handler(request: httpx.Request) -> httpx.Response:
        nonlocal in_flight, peak
        in_flight += 1
        peak = max(peak, in_flight)
        await asyncio.sleep(0.02)
        in_flight -= 1
        return httpx.Response(200, json=completion())

    lm = OpenAILM("m", "http://scripted/v1", context_length=100, max_concurrency=2, transport=httpx.MockTransport(handler))
    [handles] = await lm.open([[1]], copies=7)
    outputs = await lm.extend(handles, StepParams(max_tokens=1, stop=()), seeds=list(range(7)))
    assert len(outputs) == 7 and peak == 2


async def test_scoring_falls_back_to_prompt_logprobs():
    def handler(request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content)
        if body.get("echo"):
            return httpx.Response(400, json={"error": {"message": "echo is not supported"}})
        ids = body["prompt"]
        entries = [None] + [{str(t): {"logprob": -0.25 * i, "rank": 1}} for i, t in enumerate(ids[1:], start=1)]
        return httpx.Response(200, json={"choices": [{"index": 0, "text": "", "finish_reason": "length", "prompt_logprobs": entries}]})

    lm = scripted(handler)
    [scored] = await lm.score([[5, 6]], [[7, 8]])
    assert scored.logprobs == [-0.5, -0.75]
    assert lm.score_mode == "prompt_logprobs"


async def test_echo_scoring_retries_with_one_token_where_zero_is_refused():
    bodies = []

    def handler(request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content)
        bodies.append(body)
        if body["max_tokens"] < 1:
            return httpx.Response(422, json={"detail": [{"msg": "max_tokens: Input should be greater than or equal to 1"}]})
        ids = body["prompt"]
        values = [None] + [-0.5 * i for i in range(1, len(ids))] + [-9.0]  # the generated token's entry comes last
        return httpx.Response(200, json={"choices": [{"index": 0, "text": "", "finish_reason": "length",
                                                      "logprobs": {"token_logprobs": values}}]})

    lm = scripted(handler)
    [scored] = await lm.score([[5, 6]], [[7, 8]])
    assert scored.logprobs == [-1.0, -1.5]
    assert lm.score_mode == "echo" and [b["max_tokens"] for b in bodies] == [0, 1]
    await lm.score([[5]], [[9]])  # remembered: no second refusal
    assert [b["max_tokens"] for b in bodies] == [0, 1, 1]


# -- the default model -------------------------------------------------------------------


@pytest.mark.slow
async def test_greedy_search_on_the_default_model_loses_nothing_through_the_server(small_model_path):
    """Particle filtering with greedy steps and the model judging itself, run
    on the default model's engine directly and through ``piscale serve`` in
    front of the same model: the same text, the same judge scores."""
    from piscale.models import SMALL_MODEL
    from piscale.rewards.judge import LLMJudge

    options = dict(temperature=0.0, max_steps=2, max_step_tokens=12, max_tokens=24)
    question = "What is 12 + 30?"
    local_lm = load(SMALL_MODEL)
    local = await search.run(local_lm, LLMJudge(local_lm), question, "pf", 3, seed=0, **options)
    await local_lm.close()
    with serve_subprocess("--model", SMALL_MODEL, startup_s=300) as url:
        remote = OpenAILM(SMALL_MODEL, url + "/v1")
        through = await search.run(remote, LLMJudge(remote), question, "pf", 3, seed=0, **options)
        await remote.close()
    assert through.text == local.text and len(through.text) >= 20
    assert [c.score for c in through.candidates] == pytest.approx([c.score for c in local.candidates], abs=1e-3)
    assert remote.failures == []
