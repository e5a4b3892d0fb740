"""The backend contract, one suite for every engine.

Each engine case gives a backend plus two references computed *another way*
than through the engine's step/fork machinery: an unforked greedy generation
of the whole lineage, and the per-token log-probabilities of a full forward
pass over a finished sequence. Engines that share this suite may differ in
everything else.
"""

from __future__ import annotations

import asyncio
import copy
from dataclasses import dataclass
from collections.abc import Callable

import pytest
import torch

from piscale.lm.base import LanguageModel, StepParams
from tiny_models import tiny_causal_lm

GREEDY = StepParams(max_tokens=12, stop=("\n",), temperature=0.0)


@dataclass
class EngineCase:
    lm: LanguageModel
    reference_greedy: Callable[[list[int], int], list[int]]
    """prompt ids, n new tokens -> the prompt and n greedy tokens, in one go."""
    reference_logprobs: Callable[[list[int], int], list[float]]
    """full ids, prompt length -> log p of each token after the prompt."""
    logprob_tolerance: float = 1e-4


def transformers_case(model, tokenizer) -> EngineCase:
    from piscale.lm.hf import TransformersLM

    def greedy(prompt: list[int], n: int) -> list[int]:
        config = copy.deepcopy(model.generation_config)
        config.eos_token_id = None  # a lineage runs on past EOS in these tests
        config.pad_token_id = tokenizer.pad_token_id
        config.max_new_tokens, config.do_sample = n, False
        with torch.inference_mode():
            return model.generate(torch.tensor([prompt], device=model.device), generation_config=config)[0].tolist()

    def logprobs(ids: list[int], prompt_length: int) -> list[float]:
        with torch.inference_mode():
            logits = model(torch.tensor([ids], device=model.device)).logits[0].float()
        table = torch.log_softmax(logits, dim=-1)
        return [float(table[j - 1, ids[j]]) for j in range(prompt_length, len(ids))]

    return EngineCase(TransformersLM(model, tokenizer), greedy, logprobs)


def _tiny(architecture: str, device: str = "cpu") -> EngineCase:
    model, tokenizer = tiny_causal_lm(architecture)
    return transformers_case(model.to(device), tokenizer)


def _tiny_cuda() -> EngineCase:
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    return _tiny("llama", "cuda")


def _default_model() -> EngineCase:
    from piscale.models import SMALL_MODEL, load_transformers

    model, tokenizer = load_transformers(SMALL_MODEL, device="cpu", dtype="float32")
    return transformers_case(model, tokenizer)


def _llamacpp_default_model() -> EngineCase:
    """The llama.cpp engine, referenced by llama.cpp's high-level API: one
    full evaluation keeping every logit, and a plain greedy loop."""
    from piscale.lm.llamacpp import LlamaCppLM, available

    if not available():
        pytest.skip("llama-cpp-python is not installed")
    import llama_cpp
    import numpy as np

    from piscale.models import SMALL_MODEL, gguf_path

    path = str(gguf_path(SMALL_MODEL))
    # 32 tokens per pass, as the engine reads: llama.cpp uses another attention
    # kernel from 64 query tokens on, and its logits differ slightly.
    reference = llama_cpp.Llama(
        model_path=path, n_ctx=2048, n_batch=32, n_ubatch=32, logits_all=True, flash_attn=True, verbose=False
    )

    def greedy(prompt: list[int], n: int) -> list[int]:
        reference.reset()
        ids = list(prompt)
        reference.eval(ids)
        for _ in range(n):
            ids.append(int(np.argmax(reference.scores[reference.n_tokens - 1])))
            reference.eval(ids[-1:])
        return ids

    def logprobs(ids: list[int], prompt_length: int) -> list[float]:
        reference.reset()
        reference.eval(ids)
        logits = np.asarray(reference.scores[: len(ids)], dtype=np.float64)
        table = logits - logits.max(axis=1, keepdims=True)
        table -= np.log(np.exp(table).sum(axis=1, keepdims=True))
        return [float(table[j - 1, ids[j]]) for j in range(prompt_length, len(ids))]

    return EngineCase(LlamaCppLM(path, context_length=1024, max_sequences=16), greedy, logprobs)


ENGINE_CASES: dict[str, Callable[[], EngineCase]] = {
    "hf-llama": lambda: _tiny("llama"),
    "hf-qwen2": lambda: _tiny("qwen2"),
    "hf-llama-cuda": _tiny_cuda,
    "hf-smollm2": _default_model,
    "llamacpp-smollm2": _llamacpp_default_model,
}
SLOW_CASES = {"hf-smollm2", "llamacpp-smollm2"}


@pytest.fixture(
    scope="module",
    params=[pytest.param(name, marks=[pytest.mark.slow] if name in SLOW_CASES else []) for name in ENGINE_CASES],
)
def case(request) -> EngineCase:
    return ENGINE_CASES[request.param]()


def prompts_for(lm: LanguageModel) -> list[list[int]]:
    return [
        lm.prompt_ids("What is 12 times 7?"),
        lm.prompt_ids("Name a prime number larger than 10, please."),
        lm.prompt_ids("Hi"),
    ]


async def greedy_lineage(lm: LanguageModel, prompt: list[int], steps: int, fork_every_step: bool) -> list[int]:
    """Generate ``steps`` steps; between steps, fork the sequence into three
    and continue from one of the copies (the others are released)."""
    [[handle]] = await lm.open([prompt])
    for _ in range(steps):
        [out] = await lm.extend([handle], GREEDY)
        if fork_every_step:
            children = lm.fork([handle, handle, handle])
            lm.release([handle, children[0], children[2]])
            handle = children[1]
    ids = lm.token_ids(handle)
    lm.release([handle])
    return ids


async def test_greedy_lineage_through_forks_equals_one_generation(case: EngineCase):
    prompt = prompts_for(case.lm)[0]
    ids = await greedy_lineage(case.lm, prompt, steps=4, fork_every_step=True)
    assert ids[: len(prompt)] == prompt
    assert len(ids) > len(prompt) + 4
    assert ids == case.reference_greedy(prompt, len(ids) - len(prompt))


async def test_step_logprobs_match_a_full_forward_pass(case: EngineCase):
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
    assert max(abs(a - b) for a, b in zip(stepped, reference)) < case.logprob_tolerance


async def test_batched_equals_unbatched(case: EngineCase):
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
        assert max(abs(x - y) for x, y in zip(a.logprobs, b.logprobs)) < case.logprob_tolerance


async def test_concurrent_requests_share_forward_passes(case: EngineCase):
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


async def test_forks_share_one_prefill_and_resampling_prefills_nothing(case: EngineCase):
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


async def test_seeded_sampling_ignores_batch_neighbours(case: EngineCase):
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


async def test_step_ends_at_stop_string_or_token_cap(case: EngineCase):
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


async def test_score_matches_a_full_forward_pass(case: EngineCase):
    lm = case.lm
    prompts = prompts_for(lm)
    continuations = [lm.encode(" 84 is the answer."), lm.encode("Eleven"), lm.encode("Hello!\n\nBye")]
    scores = await lm.score(prompts, continuations)
    for prompt, continuation, scored in zip(prompts, continuations, scores):
        reference = case.reference_logprobs(prompt + continuation, len(prompt))
        assert scored.token_ids == continuation
        assert max(abs(a - b) for a, b in zip(scored.logprobs, reference)) < case.logprob_tolerance
        assert scored.total == pytest.approx(sum(reference), abs=len(reference) * case.logprob_tolerance)


async def test_one_token_continuations_of_one_prompt_read_it_once(case: EngineCase):
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
        assert max(abs(a - b) for a, b in zip(scored.logprobs, expected)) < case.logprob_tolerance


async def test_a_cancelled_extend_stops_costing_passes(case: EngineCase):
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
    with pytest.raises(asyncio.CancelledError):
        await task
    await asyncio.sleep(0.5)  # a pass under way when the call was cancelled may finish
    passes = lm.usage.forward_passes
    await asyncio.sleep(0.5)
    assert lm.usage.forward_passes == passes
    assert lm.usage.since(before).generated_tokens < 2 * 200
    lm.release([first, second])  # no longer busy
    [[handle]] = await lm.open([prompts_for(lm)[1]])
    [step] = await lm.extend([handle], GREEDY)
    assert step.token_ids
    lm.release([handle])


async def test_bad_handles_and_inputs_are_rejected(case: EngineCase):
    lm = case.lm
    with pytest.raises(KeyError, match="unknown"):
        lm.release([10**9])
    with pytest.raises(KeyError, match="unknown"):
        await lm.extend([10**9], GREEDY)
    with pytest.raises(ValueError):
        await lm.open([[]])
    [[handle]] = await lm.open([prompts_for(lm)[2]])
    with pytest.raises(ValueError, match="seeds"):
        await lm.extend([handle], GREEDY, seeds=[1, 2])
    lm.release([handle])
    with pytest.raises(ValueError):
        StepParams(max_tokens=0)


async def test_one_token_prompts_decode_like_longer_ones(case: EngineCase):
    lm = case.lm
    first = lm.encode("A")[:1]
    groups = await lm.open([first, prompts_for(lm)[0]])
    outs = await lm.extend([g[0] for g in groups], GREEDY)
    ids = lm.token_ids(groups[0][0])
    lm.release([g[0] for g in groups])
    assert ids == case.reference_greedy(first, len(outs[0].token_ids))
