"""piscale on a live vLLM server (the CPU build, SmolLM2-135M in float32),
through the OpenAI engine (vLLM in this process: tests/test_vllm_engine.py).
Run with ``make test-vllm``; without vLLM in the test interpreter every test
here skips.

* the engine contract suite, referenced by transformers on the same weights;
* greedy steps equal the hf engine's on the same folder;
* particle filtering, best-of-N and DVTS run end to end, with the model
  judging itself (so scoring requests go to vLLM too);
* vLLM's prefix-cache hit counter grows across a particle-filtering run: forks
  share their prefix on the server;
* two vLLM replicas give the answer of one under the same seed.

vLLM caches whole blocks of the KV cache only (128 tokens on its CPU backend)
and recomputes the tail of every request, so the contract check that counts
prefilled tokens exactly fails there by design; it is an expected failure,
and the tests below bound the same cost by the block size. (The check that
a judge's Yes and No read their prompt once passes since both engines ask
for them in one request.)
"""

from __future__ import annotations

import re

import httpx
import pytest

from piscale import search
from piscale.lm.base import StepParams
from piscale.lm.openai import OpenAILM
from piscale.lm.server_pool import parse_metrics
from piscale.lm.testing import (
    CHECKS,
    EngineCase,
    check_forks_share_one_prefill_and_resampling_prefills_nothing,
)
from piscale.rewards.judge import LLMJudge

pytestmark = pytest.mark.vllm

QUESTION = "What is 12 times 7? Answer in one short sentence."
PAGED_CACHE = (
    "vLLM caches whole KV blocks and recomputes each request's tail, so the prefilled tokens "
    "are not counted once per prompt; bounded by the block size in this module's own tests"
)
EXACT_PREFILL_CHECKS = {check_forks_share_one_prefill_and_resampling_prefills_nothing}


@pytest.fixture
def remote(vllm_server, vllm_reference):
    return OpenAILM(vllm_server.model, vllm_server.base_url, tokenizer=vllm_reference[1], max_retries=1)


def server_metrics(root: str) -> dict[str, float]:
    return parse_metrics(httpx.get(root + "/metrics", timeout=10).text)


def block_size(root: str) -> int:
    text = httpx.get(root + "/metrics", timeout=10).text
    match = re.search(r'vllm:cache_config_info\{[^}]*\bblock_size="(\d+)"', text)
    assert match, "vLLM's /metrics has no cache_config_info with a block size"
    return int(match.group(1))


CONTRACT = pytest.mark.parametrize(
    "check",
    [
        pytest.param(
            check,
            marks=[pytest.mark.xfail(strict=True, raises=AssertionError, reason=PAGED_CACHE)]
            if check in EXACT_PREFILL_CHECKS
            else [],
        )
        for check in CHECKS
    ],
    ids=[check.__name__.removeprefix("check_") for check in CHECKS],
)


# -- a vLLM server through the OpenAI engine --------------------------------------------------


@CONTRACT
async def test_contract(vllm_server, vllm_reference, check):
    from test_lm_contract import transformers_case

    model, tokenizer = vllm_reference
    local = transformers_case(model, tokenizer)
    lm = OpenAILM(vllm_server.model, vllm_server.base_url, tokenizer=tokenizer, max_retries=1)
    await check(EngineCase(lm, local.reference_greedy, local.reference_logprobs))
    await lm.close()


async def test_forks_read_the_prompt_about_once(vllm_server, remote):
    """Eight copies of a prompt over three steps of resampling: what vLLM
    reads uncached is the prompt once per distinct prefix plus at most one
    partial block per request, far less than eight prompts per step."""
    block = block_size(vllm_server.root)
    prompt = remote.prompt_ids("Write a long story about a dragon who counts sheep. " * 24)
    assert len(prompt) > 2 * block
    [handles] = await remote.open([prompt], copies=8)
    params = StepParams(max_tokens=6, stop=("\n\n",), temperature=1.0)
    for step in range(3):
        await remote.extend(handles, params, seeds=list(range(step * 8, step * 8 + 8)))
        survivors = remote.fork([handles[i] for i in (0, 0, 1, 3, 3, 3, 5, 7)])
        remote.release(handles)
        handles = survivors
    remote.release(handles)
    used = remote.server_usage
    assert used.requests == 24
    assert used.prompt_tokens >= 24 * len(prompt)
    assert used.cached_tokens > 0
    assert remote.usage.prefill_tokens <= len(prompt) + 24 * block
    assert remote.usage.prefill_tokens < used.prompt_tokens / 2


async def test_greedy_steps_equal_the_hf_engine(remote, vllm_reference):
    await greedy_steps_equal_the_hf_engine(remote, vllm_reference)
    assert remote.usage.forward_passes > 0 and remote.usage.wall_time > 0


async def greedy_steps_equal_the_hf_engine(remote, vllm_reference):
    from piscale.lm.hf import TransformersLM

    model, tokenizer = vllm_reference
    local = TransformersLM(model, tokenizer)
    prompt = local.chat([{"role": "user", "content": QUESTION}])
    assert remote.chat([{"role": "user", "content": QUESTION}]) == prompt
    greedy = StepParams(max_tokens=24, stop=("\n",), temperature=0.0)
    [[here]] = await local.open([prompt])
    [[there]] = await remote.open([prompt])
    for _ in range(3):
        [mine] = await local.extend([here], greedy)
        [theirs] = await remote.extend([there], greedy)
        assert theirs.token_ids == mine.token_ids and theirs.text == mine.text
        assert theirs.finish_reason == mine.finish_reason
        assert max(abs(a - b) for a, b in zip(theirs.logprobs, mine.logprobs)) < 1e-4
        if mine.finish_reason not in ("stop", "length"):
            break
    assert remote.token_ids(there) == local.token_ids(here)
    remote.release([there])


@pytest.mark.parametrize("algorithm", ["pf", "bon", "dvts"])
async def test_searches_run_end_to_end(remote, algorithm):
    result = await search.run(
        remote, LLMJudge(remote), QUESTION, algorithm, 4, seed=0, max_steps=3, max_step_tokens=24, max_tokens=64
    )
    assert result.text
    assert len(result.candidates) >= 1
    assert result.usage["generated_tokens"] > 0
    assert remote.failures == []
    assert remote.server_usage.requests > 0 and remote.usage.scored_tokens > 0


async def test_particle_filtering_hits_the_prefix_cache(vllm_server, remote):
    """A question longer than one KV block, so that its blocks can be shared."""
    block = block_size(vllm_server.root)
    question = "Here are some notes. " + "Sheep graze on the hill and the farmer counts them. " * 16 + QUESTION
    assert len(remote.prompt_ids(question)) > block
    before = server_metrics(vllm_server.root)
    await search.run(
        remote, LLMJudge(remote), question, "pf", 8, seed=1, max_steps=4, max_step_tokens=32, max_tokens=128
    )
    after = server_metrics(vllm_server.root)
    hits = after["vllm:prefix_cache_hits_total"] - before["vllm:prefix_cache_hits_total"]
    queries = after["vllm:prefix_cache_queries_total"] - before["vllm:prefix_cache_queries_total"]
    assert hits > 0 and queries >= hits
    assert remote.server_usage.cached_tokens == pytest.approx(hits, rel=0.05)


@pytest.mark.slow
async def test_two_replicas_give_the_answer_of_one(vllm_server, vllm_model_folder, vllm_reference):
    from vllm_support import vllm_server as start

    options = dict(seed=3, max_steps=3, max_step_tokens=24, max_tokens=64)
    one = OpenAILM(vllm_server.model, vllm_server.base_url, tokenizer=vllm_reference[1])
    alone = await search.run(one, LLMJudge(one), QUESTION, "pf", 4, **options)
    with start(vllm_model_folder) as second:
        two = OpenAILM(vllm_server.model, [vllm_server.base_url, second.base_url], tokenizer=vllm_reference[1])
        spread = await search.run(two, LLMJudge(two), QUESTION, "pf", 4, **options)
    assert spread.text == alone.text
    assert [c.text for c in spread.candidates] == [c.text for c in alone.candidates]
    assert min(two.server_usage.requests_by_replica or [0]) > 0
