"""piscale's in-process vLLM engine (``piscale.lm.vllm``, ``--engine vllm``)
on the CPU build of vLLM, SmolLM2-135M in float32. Run with ``make test-vllm``;
without vLLM in the test interpreter these tests skip (the first one runs
instead: asking for the engine says what is missing).

* the engine contract suite, referenced by transformers on the same weights;
* greedy steps equal the hf engine's;
* particle filtering and best-of-N run end to end, the model judging itself;
* a judge's one-token scoring reads its prompt from the prefix cache, and
  gives the log-probabilities that prompt log-probabilities give.

The engine lives for this module only (a module after the server tests), so
that it does not hold memory while they start a second vLLM server.
"""

from __future__ import annotations

import dataclasses

import pytest

from piscale import search
from piscale.lm.base import StepParams
from piscale.lm.testing import EngineCase
from piscale.rewards.judge import LLMJudge
from test_vllm import CONTRACT, QUESTION, greedy_steps_equal_the_hf_engine

pytestmark = pytest.mark.vllm


@pytest.fixture(scope="module")
def engine(vllm_model_folder):
    """piscale's in-process vLLM engine on SmolLM2-135M (tests/vllm_support.py)."""
    from vllm_support import vllm_engine

    with vllm_engine(vllm_model_folder) as started:
        yield started


def test_without_vllm_the_engine_says_what_is_missing():
    """piscale imports and runs without vLLM; only asking for the engine fails."""
    from piscale.lm import load
    from piscale.lm.vllm import vllm_available

    if vllm_available():
        pytest.skip("vLLM is installed in this interpreter")
    with pytest.raises(ImportError, match="needs vLLM installed"):
        load("smollm2-135m-instruct", engine="vllm")


@CONTRACT
async def test_engine_contract(engine, vllm_reference, check):
    from test_lm_contract import transformers_case

    local = transformers_case(*vllm_reference)
    await check(EngineCase(engine, local.reference_greedy, local.reference_logprobs))


async def test_engine_greedy_steps_equal_the_hf_engine(engine, vllm_reference):
    await greedy_steps_equal_the_hf_engine(engine, vllm_reference)


@pytest.mark.parametrize("algorithm", ["pf", "bon"])
async def test_engine_searches_run_end_to_end(engine, algorithm):
    before = engine.cache.requests
    result = await search.run(
        engine, LLMJudge(engine), QUESTION, algorithm, 4, seed=0, max_steps=3, max_step_tokens=24, max_tokens=64
    )
    assert result.text
    assert len(result.candidates) == 4
    assert result.usage["generated_tokens"] > 0
    assert engine.cache.requests > before and engine.cache.scoring_requests > 0


async def test_engine_judge_scoring_reads_the_prefix_cache(engine):
    """One-token continuations are read at the first generated position of an
    ordinary request, which finds the prompt's blocks in the prefix cache;
    longer continuations ask for prompt log-probabilities, which vLLM reads
    in full. Both give the same numbers."""
    block = 128  # vLLM's KV block on its CPU backend
    prompt = engine.prompt_ids("Here are some notes. " + "Sheep graze on the hill and the farmer counts them. " * 32)
    assert len(prompt) > 2 * block
    [[handle]] = await engine.open([prompt])
    [step] = await engine.extend([handle], StepParams(max_tokens=4, temperature=0.0))
    engine.release([handle])
    yes, no = step.token_ids[0], step.token_ids[1]
    before = dataclasses.replace(engine.cache)
    [one_yes, one_no] = await engine.score([prompt, prompt], [[yes], [no]])
    cached = engine.cache.scored_cached_tokens - before.scored_cached_tokens
    assert engine.cache.scoring_requests - before.scoring_requests == 1  # one request for both tokens
    assert cached >= (len(prompt) // block - 1) * block > 0
    middle = dataclasses.replace(engine.cache)
    [both] = await engine.score([prompt], [[yes, no]])
    assert engine.cache.scored_cached_tokens == middle.scored_cached_tokens  # prompt log-probabilities: no cache
    assert one_yes.logprobs[0] == pytest.approx(both.logprobs[0], abs=1e-4)
    assert one_yes.logprobs[0] == pytest.approx(step.logprobs[0], abs=1e-4)
    assert one_no.logprobs[0] < one_yes.logprobs[0]  # greedy picked yes
