"""The llama.cpp engine: sampling maths without a model, then the engine on
the packaged SmolLM2-135M-Instruct GGUF, checked against llama.cpp's own
full evaluation (the high-level ``llama_cpp.Llama`` with every logit kept)."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from piscale.lm.base import StepParams
from piscale.lm.chat_template import render_chat_template
from piscale.lm.llamacpp import available
from piscale.lm.llamacpp_gather import plan_gather
from piscale.lm.llamacpp_sampling import sample_token

needs_llama_cpp = pytest.mark.skipif(not available(), reason="llama-cpp-python is not installed")


# -- sampling, no model needed ----------------------------------------------------


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    return x - np.log(np.sum(np.exp(x - x.max()))) - x.max()


def test_greedy_picks_the_first_maximum_and_reports_its_log_probability():
    logits = np.array([0.5, 3.0, -1.0, 3.0], dtype=np.float32)
    token, logprob = sample_token(logits, 0.0, 1.0, None)
    assert token == 1
    assert logprob == pytest.approx(np.log(np.exp(3.0) / np.exp(logits.astype(float)).sum()), abs=1e-6)


def test_sampling_frequencies_follow_the_tempered_softmax():
    logits = np.array([2.0, 1.0, 0.0, -1.0, 0.5])
    temperature = 0.7
    expected = np.exp(logits / temperature) / np.exp(logits / temperature).sum()
    rng = np.random.default_rng(123)
    draws = 20000
    counts = np.zeros(len(logits))
    for _ in range(draws):
        token, logprob = sample_token(logits, temperature, 1.0, rng)
        counts[token] += 1
        # the reported log-probability is at temperature 1, not the sampling one
        assert logprob == pytest.approx(_log_softmax(logits)[token], abs=1e-6)
    # binomial standard error is at most sqrt(0.25 / 20000) = 0.0035
    np.testing.assert_allclose(counts / draws, expected, atol=0.015)


def test_top_p_keeps_only_the_nucleus_in_proportion():
    probs = np.array([0.05, 0.5, 0.15, 0.3])
    logits = np.log(probs)
    rng = np.random.default_rng(7)
    draws = 10000
    counts = np.bincount([sample_token(logits, 1.0, 0.7, rng)[0] for _ in range(draws)], minlength=4)
    # the smallest set reaching 0.7 is {0.5, 0.3}; renormalised: 0.625 / 0.375
    assert counts[0] == 0 and counts[2] == 0
    assert counts[1] / draws == pytest.approx(0.625, abs=0.02)


def test_top_p_over_a_flat_vocabulary_keeps_exactly_the_nucleus():
    # 1000 equal tokens: the nucleus of 0.5 is 500 tokens (the first 500 in
    # a stable sort), each drawn with probability 1/500.
    logits = np.zeros(1000)
    rng = np.random.default_rng(0)
    draws = [sample_token(logits, 1.0, 0.5, rng)[0] for _ in range(5000)]
    assert max(draws) == 499
    assert len(set(draws)) > 490


def test_nucleus_needing_the_low_probability_tail_is_found():
    # one token with 60% of the mass and 4000 tokens sharing 40%: top_p 0.9
    # reaches into tokens 24000x less likely than the first, below the
    # first weight floors
    tail = 4000
    logits = np.concatenate([[np.log(0.6)], np.full(tail, np.log(0.4 / tail))])
    rng = np.random.default_rng(3)
    draws = np.array([sample_token(logits, 1.0, 0.9, rng)[0] for _ in range(4000)])
    # nucleus: the head plus 3000 tail tokens; the head has 0.6 / 0.9 of it
    assert np.mean(draws == 0) == pytest.approx(0.6 / 0.9, abs=0.025)
    assert 2900 < draws.max() <= 3001  # 3001 only by rounding at the boundary


def test_draws_across_vocabulary_blocks_follow_the_probabilities():
    # mass at both ends of a block and in the last, partial block
    logits = np.full(5000, -30.0)
    peaks = {1023: np.log(0.2), 1024: np.log(0.3), 4999: np.log(0.5)}
    for token, value in peaks.items():
        logits[token] = value
    rng = np.random.default_rng(11)
    draws = np.array([sample_token(logits, 1.0, 1.0, rng)[0] for _ in range(6000)])
    for token, value in peaks.items():
        assert np.mean(draws == token) == pytest.approx(np.exp(value), abs=0.02)
    assert set(draws) <= set(peaks)


def test_draws_depend_on_the_seed_only():
    logits = np.random.default_rng(1).normal(size=5000)
    same_seed = {sample_token(logits, 0.9, 0.95, np.random.default_rng(42))[0] for _ in range(3)}
    assert len(same_seed) == 1
    other_seeds = {sample_token(logits, 0.9, 0.95, np.random.default_rng(seed))[0] for seed in range(20)}
    assert len(other_seeds) > 10


def test_chat_template_continuing_the_final_message():
    template = (
        "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}</{{ m['role'] }}>{% endfor %}"
        "{% if add_generation_prompt %}<assistant>{% endif %}"
    )
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "The answer is"}]
    assert render_chat_template(template, messages[:1]) == "<user>hi</user><assistant>"
    text = render_chat_template(template, messages, continue_final_message=True)
    assert text == "<user>hi</user><assistant>The answer is"
    import jinja2

    with pytest.raises(jinja2.TemplateError, match="boom"):
        render_chat_template("{{ raise_exception('boom') }}", messages)


# -- the engine on a real model ---------------------------------------------------


# -- moving a pass's slots onto consecutive ids, no model needed ----------------


def _apply(plan, contents: dict[int, str]) -> dict[int, str]:
    """Run the copies in order, as llama.cpp does at the next pass: each
    reads its source as it is at that moment."""
    contents = dict(contents)
    for source, destination in plan:
        contents[destination] = contents.pop(source)
    return contents


def test_consecutive_members_need_no_move():
    assert plan_gather([4, 5, 6, 7], free_ids=[0, 1, 9], n_ids=10) == []
    assert plan_gather([3], free_ids=[], n_ids=10) == []


def test_gather_evicts_other_slots_then_fills_the_window():
    # members 0, 2, 4; id 1 and 3 hold idle slots; 5..7 are free
    plan = plan_gather([0, 2, 4], free_ids=[5, 6, 7], n_ids=8)
    # best window [0, 3): evict 1 (to free id 5), bring 4 into 1: two moves
    assert plan == [(1, 5), (4, 1)]
    after = _apply(plan, {0: "m0", 1: "idle1", 2: "m2", 3: "idle3", 4: "m4"})
    assert {after[i] for i in (0, 1, 2)} == {"m0", "m2", "m4"}
    assert sorted(v for v in after.values() if v.startswith("idle")) == ["idle1", "idle3"]


def test_gather_needs_one_free_id_and_swaps_through_it():
    # every id is taken: nothing can move
    assert plan_gather([0, 2], free_ids=[], n_ids=4) == []
    # one free id inside the only gap: the member moves in, nothing is evicted
    assert plan_gather([0, 3], free_ids=[1], n_ids=4) == [(3, 1)]
    # members 0, 2, 4, 6 among idle 1, 3, 5 and one free id (7): the window
    # [0, 4) holds two members, a free id nowhere near, so the idle slots in it
    # swap with outside members through the free id
    plan = plan_gather([0, 2, 4, 6], free_ids=[7], n_ids=8)
    after = _apply(plan, {0: "m0", 1: "i1", 2: "m2", 3: "i3", 4: "m4", 5: "i5", 6: "m6"})
    ids = sorted(i for i, v in after.items() if v.startswith("m"))
    assert ids == list(range(ids[0], ids[0] + 4))
    assert sorted(v for v in after.values() if v.startswith("i")) == ["i1", "i3", "i5"]


def test_random_tables_end_with_members_consecutive_and_every_slot_kept():
    rng = np.random.default_rng(5)
    for _ in range(400):
        n = int(rng.integers(2, 40))
        states = rng.choice(["member", "idle", "free", "pinned"], size=n, p=[0.4, 0.25, 0.3, 0.05])
        members = [i for i in range(n) if states[i] == "member"]
        free = [i for i in range(n) if states[i] == "free"]
        pinned = [i for i in range(n) if states[i] == "pinned"]
        contents = {i: f"{states[i]}{i}" for i in range(n) if states[i] != "free"}
        plan = plan_gather(members, free, n, pinned)
        after = _apply(plan, contents)
        assert sorted(after.values()) == sorted(contents.values())  # nothing lost or duplicated
        assert all(after[i] == f"pinned{i}" for i in pinned)
        assert not {i for move in plan for i in move} & set(pinned)
        if plan:
            ids = sorted(i for i, v in after.items() if v.startswith("member"))
            assert ids == list(range(ids[0], ids[0] + len(members)))
        elif len(members) > 1 and members[-1] - members[0] != len(members) - 1:
            # skipped only when no id is free to move through, or every
            # window holds a pinned id
            k = len(members)
            assert not free or all(any(states[i] == "pinned" for i in range(a, a + k)) for a in range(n - k + 1))


@pytest.fixture(scope="module")
def model_path(small_model_path) -> str:
    """The packaged default model (conftest pulls it once)."""
    if not available():
        pytest.skip("llama-cpp-python is not installed")
    return str(small_model_path)


@pytest.fixture(scope="module")
def lm(model_path):
    from piscale.lm.llamacpp import LlamaCppLM

    engine = LlamaCppLM(model_path, context_length=1024, max_sequences=12)
    yield engine
    asyncio.run(engine.close())


@pytest.fixture(scope="module")
def reference(model_path):
    """llama.cpp's own evaluation of a whole sequence: log-softmax of the
    logits at every position, from the high-level API. It reads 32 tokens per
    pass, like the engine, so that both use the same attention kernel."""
    import llama_cpp

    llm = llama_cpp.Llama(
        model_path=model_path, n_ctx=2048, n_batch=32, n_ubatch=32, logits_all=True, flash_attn=True, verbose=False
    )

    def logprobs_of(tokens: list[int], start: int) -> np.ndarray:
        llm.reset()
        llm.eval(tokens)
        logits = np.asarray(llm.scores[: len(tokens)], dtype=np.float64)
        out = []
        for position in range(start, len(tokens)):
            out.append(_log_softmax(logits[position - 1])[tokens[position]])
        return np.array(out)

    yield logprobs_of
    llm.close()


QUESTION = "Write one short sentence about the sea."
GREEDY = StepParams(max_tokens=40, stop=(), temperature=0.0)



@needs_llama_cpp
@pytest.mark.slow
def test_chat_template_from_gguf_metadata(lm):
    ids = lm.chat([{"role": "user", "content": "Hi"}])
    # SmolLM2's template: a default system turn, then the user turn, then the
    # assistant header; <|im_start|> is token 1 and <|im_end|> token 2.
    expected = (
        [1] + lm.encode("system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face") + [2]
        + lm.encode("\n") + [1] + lm.encode("user\nHi") + [2] + lm.encode("\n") + [1] + lm.encode("assistant\n")
    )
    assert ids == expected
    assert lm.decode(ids, skip_special_tokens=False).endswith("<|im_start|>assistant\n")
    assert lm.decode(lm.encode("Hello, world! 42")) == "Hello, world! 42"
    assert lm.eos_token_ids >= {2}


@needs_llama_cpp
@pytest.mark.slow
async def test_greedy_lineage_through_forks_equals_one_unforked_generation(lm):
    prompt = lm.prompt_ids(QUESTION)
    [[whole]] = await lm.open([prompt])
    [unforked] = await lm.extend([whole], GREEDY)
    lm.release([whole])

    [[current]] = await lm.open([prompt])
    pieces: list[int] = []
    while len(pieces) < len(unforked.token_ids):
        # resample: two copies of the current particle, keep the second
        keep, drop = lm.fork([current, current])
        lm.release([current, drop])
        current = keep
        [step] = await lm.extend([current], StepParams(max_tokens=7, stop=(), temperature=0.0))
        pieces += step.token_ids
        if step.finish_reason == "eos":
            break
    assert pieces[: len(unforked.token_ids)] == unforked.token_ids
    assert lm.token_ids(current)[: len(prompt) + len(unforked.token_ids)] == prompt + unforked.token_ids
    lm.release([current])


@needs_llama_cpp
@pytest.mark.slow
async def test_step_log_probabilities_match_a_full_evaluation(lm, reference):
    prompt = lm.prompt_ids(QUESTION)
    [[handle]] = await lm.open([prompt])
    steps = [await lm.extend([handle], StepParams(max_tokens=12, stop=(), temperature=0.9), seeds=[s]) for s in (1, 2)]
    tokens = lm.token_ids(handle)
    lm.release([handle])
    ours = np.array([lp for [step] in steps for lp in step.logprobs])
    assert tokens == prompt + [t for [step] in steps for t in step.token_ids]
    theirs = reference(tokens, len(prompt))
    np.testing.assert_allclose(ours, theirs, atol=1e-4)
    assert np.all(ours <= 0)


@needs_llama_cpp
@pytest.mark.slow
async def test_score_matches_a_full_evaluation_and_shares_the_prompt(lm, reference):
    prompt = lm.prompt_ids("What is the capital of France?")
    answers = [lm.encode(a) for a in ("Paris is the capital of France.", "Berlin.", "I like trains very much.")]
    other_prompt = lm.prompt_ids("Name a colour.")
    before = lm.usage.snapshot()
    scored = await lm.score([prompt, prompt, prompt, other_prompt], answers + [lm.encode("Blue")])
    used = lm.usage.since(before)
    for output, answer, context in zip(scored, answers + [lm.encode("Blue")], [prompt] * 3 + [other_prompt]):
        assert output.token_ids == answer
        np.testing.assert_allclose(output.logprobs, reference(context + answer, len(context)), atol=1e-4)
    # each distinct prompt is read once; each continuation but its last token
    expected = len(prompt) + len(other_prompt) + sum(len(a) - 1 for a in answers) + len(lm.encode("Blue")) - 1
    assert used.scored_tokens == expected
    assert scored[0].total > scored[2].total  # the sensible answer is likelier
    assert lm.live_sequences == 0


@needs_llama_cpp
@pytest.mark.slow
async def test_batched_equals_unbatched_with_per_sequence_seeds(lm):
    questions = ["Name a fruit.", "Tell me a joke.", "What is 2+2?", "Describe a cat."]
    prompts = [lm.prompt_ids(q) for q in questions]
    params = StepParams(max_tokens=16, stop=(), temperature=0.8, top_p=0.95)
    seeds = [11, 12, 13, 14]
    groups = await lm.open(prompts)
    handles = [g[0] for g in groups]
    together = await lm.extend(handles, params, seeds)
    again = await lm.extend(handles, params, seeds)
    lm.release(handles)
    for prompt, seed, first, second in zip(prompts, seeds, together, again):
        [[alone]] = await lm.open([prompt])
        [one] = await lm.extend([alone], params, [seed])
        [two] = await lm.extend([alone], params, [seed])
        lm.release([alone])
        assert one.token_ids == first.token_ids and two.token_ids == second.token_ids
        np.testing.assert_allclose(one.logprobs, first.logprobs, atol=1e-4)
        np.testing.assert_allclose(two.logprobs, second.logprobs, atol=1e-4)
    # different seeds on the same prompt give different samples
    assert len({tuple(o.token_ids) for o in together}) == 4


@needs_llama_cpp
@pytest.mark.slow
async def test_open_copies_and_forks_cost_no_prefill(lm):
    prompt = lm.prompt_ids(QUESTION)
    before = lm.usage.snapshot()
    copies_before = lm.cache_copies
    [copies] = await lm.open([prompt], copies=4)
    after_open = lm.usage.since(before)
    assert after_open.prefill_tokens == len(prompt)
    assert after_open.forward_passes == -(-len(prompt) // lm.prefill_chunk)
    prefill_passes = after_open.forward_passes
    params = StepParams(max_tokens=5, stop=(), temperature=1.0)
    first = await lm.extend(copies, params, seeds=[0, 1, 2, 3])
    # the four copies shared one slot until they diverged: three cache copies
    assert lm.cache_copies - copies_before == 3
    children = lm.fork([copies[0], copies[0], copies[3]])
    lm.release(copies[1:3])
    second = await lm.extend(children, params, seeds=[5, 5, 6])
    used = lm.usage.since(before)
    assert used.prefill_tokens == len(prompt)
    assert used.generated_tokens == 4 * 5 + 3 * 5
    # the first token of each copy came from the prompt's logits: 4 passes, then 5
    assert used.forward_passes == prefill_passes + 4 + 5
    # each child shares a slot with a live ancestor, so each is copied once
    assert lm.cache_copies - copies_before == 6
    # two children of the same ancestor with the same seed are the same particle
    assert second[0].token_ids == second[1].token_ids
    assert lm.token_ids(children[2]) == prompt + first[3].token_ids + second[2].token_ids
    lm.release(children + [copies[0], copies[3]])
    assert lm.live_sequences == 0 and lm.free_slots == lm.max_sequences  # every slot came back


@needs_llama_cpp
@pytest.mark.slow
async def test_resampling_copies_only_ancestors_drawn_twice(lm):
    prompts = [lm.prompt_ids(q) for q in ("Name a fruit.", "Name a city.", "Name a tree.", "Name a dog.")]
    params = StepParams(max_tokens=4, stop=(), temperature=1.0)
    handles = [g[0] for g in await lm.open(prompts)]
    await lm.extend(handles, params, seeds=[1, 2, 3, 4])
    copies_before, free_before = lm.cache_copies, lm.free_slots
    children = lm.fork([handles[i] for i in (0, 0, 1, 3)])
    assert lm.cache_copies == copies_before  # forking copies nothing
    ancestor_tokens = [lm.token_ids(h) for h in handles]
    lm.release(handles)
    assert lm.free_slots == free_before + 1  # ancestor 2 had no child
    outputs = await lm.extend(children, params, seeds=[5, 6, 7, 8])
    assert lm.cache_copies - copies_before == 1
    for child, ancestor, out in zip(children, (0, 0, 1, 3), outputs):
        assert lm.token_ids(child) == ancestor_tokens[ancestor] + out.token_ids
    lm.release(children)


@needs_llama_cpp
@pytest.mark.slow
async def test_concurrent_extends_share_passes_and_match_sequential_ones(lm):
    prompts = [lm.prompt_ids(q) for q in ("Say hello.", "Count to three.")]
    params = StepParams(max_tokens=10, stop=(), temperature=0.7)
    groups = await lm.open(prompts, copies=2)
    before = lm.usage.snapshot()
    merged = await asyncio.gather(lm.extend(groups[0], params, [1, 2]), lm.extend(groups[1], params, [3, 4]))
    passes_merged = lm.usage.since(before).forward_passes
    lm.release([h for g in groups for h in g])
    groups = await lm.open(prompts, copies=2)
    sequential = [await lm.extend(groups[0], params, [1, 2]), await lm.extend(groups[1], params, [3, 4])]
    lm.release([h for g in groups for h in g])
    for a, b in zip(merged, sequential):
        assert [o.token_ids for o in a] == [o.token_ids for o in b]
    # 10 tokens each, the first from the prompt logits: 9 shared passes
    assert passes_merged == 9


@needs_llama_cpp
@pytest.mark.slow
async def test_step_ends_at_stop_string_token_cap_and_eos(lm):
    [[handle]] = await lm.open([lm.prompt_ids("List three colours, one per line.")])
    [step] = await lm.extend([handle], StepParams(max_tokens=60, stop=("\n",), temperature=0.0))
    assert step.finish_reason == "stop"
    assert step.text.count("\n") == 1 and step.text.rstrip(" ").endswith("\n")
    assert step.text == lm.decode(step.token_ids)
    [capped] = await lm.extend([handle], StepParams(max_tokens=3, stop=("\n",), temperature=0.0))
    assert capped.finish_reason == "length" and len(capped.token_ids) == 3
    [rest] = await lm.extend([handle], StepParams(max_tokens=200, stop=(), temperature=0.0))
    assert rest.finish_reason == "eos"
    assert rest.token_ids[-1] in lm.eos_token_ids and "<|im_end|>" not in rest.text
    lm.release([handle])


@needs_llama_cpp
@pytest.mark.slow
async def test_slots_are_reused_and_misuse_is_refused(model_path):
    from piscale.lm.llamacpp import LlamaCppLM

    small = LlamaCppLM(model_path, context_length=256, max_sequences=3)
    try:
        prompts = [small.encode(text) for text in ("Once upon a time", "In a galaxy", "The recipe")]
        greedy = StepParams(max_tokens=4, stop=(), temperature=0.0)
        for _ in range(3):  # more slots over time than there are
            handles = [g[0] for g in await small.open(prompts)]
            await small.extend(handles, greedy)
            small.release(handles)
        handles = [g[0] for g in await small.open(prompts)]
        [child] = small.fork([handles[0]])  # sharing a slot needs no new one
        with pytest.raises(RuntimeError, match="max_sequences"):
            await small.extend([child], greedy)  # but diverging does
        small.release([handles[0]])
        [step] = await small.extend([child], greedy)  # now the child holds the slot alone
        assert len(step.token_ids) == 4
        small.release([child] + handles[1:])
        with pytest.raises(KeyError, match="unknown or released"):
            small.release([12345])
        with pytest.raises(ValueError, match="empty"):
            await small.open([[]])
        with pytest.raises(ValueError, match="outside the vocabulary"):
            await small.open([[10**9]])
        with pytest.raises(ValueError, match="context window"):
            await small.open([list(range(100, 400))])
        [[handle]] = await small.open([prompts[0]])
        [capped] = await small.extend([handle], StepParams(max_tokens=400, stop=(), temperature=0.0))
        assert capped.finish_reason in ("context", "eos")
        if capped.finish_reason == "context":
            assert len(small.token_ids(handle)) == small.context_length
            [empty] = await small.extend([handle], StepParams(max_tokens=5, stop=(), temperature=0.0))
            assert empty.finish_reason == "context" and empty.token_ids == []
    finally:
        await small.close()
    with pytest.raises(RuntimeError, match="closed"):
        await small.open([prompts[0]])


@needs_llama_cpp
@pytest.mark.slow
async def test_scattered_sequences_are_gathered_and_decode_as_before(model_path):
    """Particles that finish a step early leave the others' ids scattered.
    Gathering moves the decoded ones onto consecutive ids; the idle ones,
    moved out of the way, must continue exactly as they would have."""
    from piscale.lm.llamacpp import LlamaCppLM

    results = {}
    for gather in (True, False):
        engine = LlamaCppLM(model_path, context_length=256, max_sequences=12, gather_slots=gather)
        try:
            [handles] = await engine.open([engine.prompt_ids(QUESTION)], copies=6)
            warm = StepParams(max_tokens=3, stop=(), temperature=0.9)
            await engine.extend(handles, warm, seeds=list(range(6)))  # each gets a slot of its own
            greedy = StepParams(max_tokens=8, stop=(), temperature=0.0)
            first = await engine.extend(handles[::2], greedy)
            ids = sorted(engine._sequences[h].slot.seq_id for h in handles[::2])
            second = await engine.extend(handles[1::2], greedy)
            results[gather] = (first + second, ids, engine.cache_moves)
        finally:
            await engine.close()
    (gathered, ids, moves), (plain, plain_ids, plain_moves) = results[True], results[False]
    assert ids == list(range(ids[0], ids[0] + 3)) and moves > 0
    assert plain_ids != list(range(plain_ids[0], plain_ids[0] + 3)) and plain_moves == 0
    for a, b in zip(gathered, plain):
        assert a.token_ids == b.token_ids
        np.testing.assert_allclose(a.logprobs, b.logprobs, atol=1e-4)


@needs_llama_cpp
@pytest.mark.slow
async def test_unified_cache_shares_cells_and_stays_close_to_the_reference(model_path, reference):
    from piscale.lm.llamacpp import LlamaCppLM

    pooled = LlamaCppLM(model_path, context_length=512, max_sequences=4, unified_cache=True)
    try:
        prompt = pooled.prompt_ids(QUESTION)
        [handles] = await pooled.open([prompt], copies=3)
        outputs = await pooled.extend(handles, StepParams(max_tokens=8, stop=(), temperature=1.0), seeds=[1, 2, 3])
        children = pooled.fork(handles)
        pooled.release(handles)
        more = await pooled.extend(children, StepParams(max_tokens=8, stop=(), temperature=1.0), seeds=[4, 5, 6])
        for child, first, second in zip(children, outputs, more):
            tokens = pooled.token_ids(child)
            assert tokens == prompt + first.token_ids + second.token_ids
            # other sequences in the pooled cache move logits a little, not more
            np.testing.assert_allclose(
                first.logprobs + second.logprobs, reference(tokens, len(prompt)), atol=0.1
            )
        pooled.release(children)
        assert pooled.free_slots == 4
    finally:
        await pooled.close()


@needs_llama_cpp
@pytest.mark.slow
async def test_long_prompts_and_continuations_agree_with_token_by_token_decoding(lm):
    story = (
        "The history of the Roman Empire is long and complicated. It began when Augustus became the first "
        "emperor in 27 BC, and in the west it ended in 476 AD when the last emperor was deposed. Over these "
        "centuries the empire grew to cover the whole Mediterranean, building roads, aqueducts and cities."
    )
    prompt = lm.prompt_ids(f"Summarise this text in two sentences.\n\n{story}")
    assert len(prompt) > 2 * lm.prefill_chunk + 10
    [[alone]] = await lm.open([prompt])
    [generated] = await lm.extend([alone], StepParams(max_tokens=70, stop=(), temperature=0.0))
    # packed behind another prompt, the same prompt is split differently
    [[hi_first, hi_second], [together]] = await lm.open([lm.prompt_ids("Hi"), prompt], copies=[2, 1])
    [same] = await lm.extend([together], StepParams(max_tokens=70, stop=(), temperature=0.0))
    assert same.token_ids == generated.token_ids
    np.testing.assert_array_equal(same.logprobs, generated.logprobs)
    # scoring reads the whole continuation in chunks, and gives the same numbers
    [scored] = await lm.score([prompt], [generated.token_ids])
    np.testing.assert_allclose(scored.logprobs, generated.logprobs, atol=1e-9)
    lm.release([alone, together, hi_first, hi_second])


@needs_llama_cpp
async def test_fork_and_release_do_not_wait_for_a_running_pass(lm):
    """fork and release run on the event loop; a server stalls if they wait
    for a long pass (a big scoring batch) to give up the engine."""
    [[handle]] = await lm.open([lm.encode("Once upon a time")])
    text = lm.encode(" ".join(f"word{i}" for i in range(100)))
    prompts, continuations = [text[:8]] * 3, [text[8:]] * 3
    # the prompt is read once; a continuation's last token needs no pass
    total = 8 + sum(len(c) - 1 for c in continuations)
    before = lm.usage.scored_tokens
    scoring = asyncio.create_task(lm.score(prompts, continuations))
    for _ in range(500):  # until the scoring thread holds the engine
        if lm._context_lock.locked():
            break
        await asyncio.sleep(0.01)
    assert lm._context_lock.locked()
    [child] = lm.fork([handle])
    lm.release([handle, child])
    # the scoring is still under way: fork and release did not wait for it
    assert lm.usage.scored_tokens - before < total
    scores = await scoring
    assert lm.usage.scored_tokens - before == total
    assert [len(s.logprobs) for s in scores] == [len(c) for c in continuations]
