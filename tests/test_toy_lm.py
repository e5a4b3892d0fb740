"""The exact toy language model honours the backend protocol."""

from __future__ import annotations

import asyncio
import math
from collections import Counter

import numpy as np
import pytest

from piscale.lm.base import StepParams
from piscale.lm.toy import EOS, STEP, ToyLM, counting_rule, counting_start

FULL = StepParams(max_tokens=64, stop=(), temperature=1.0)
STEPWISE = StepParams(max_tokens=64, stop=(STEP,), temperature=1.0)


def coin_rule(prompt: str, generated: tuple[str, ...]) -> dict[str, float]:
    """"x" or "y", then "z" or the end; answers: x, xz, y, yz."""
    if not generated:
        return {"x": 0.7, "y": 0.3}
    if len(generated) == 1:
        return {"z": 0.4, EOS: 0.6} if generated[0] == "x" else {"z": 0.9, EOS: 0.1}
    return {EOS: 1.0}


@pytest.fixture
def lm() -> ToyLM:
    return ToyLM()


def prompt(lm: ToyLM, question: str = "What is 1 + 1?") -> list[int]:
    return lm.prompt_ids(question, "Reason step by step.")


def test_enumerated_probabilities_are_exact():
    lm = ToyLM(coin_rule)
    answers = {a.text: a.probability for a in lm.enumerate_answers(prompt(lm))}
    assert answers == pytest.approx({"x": 0.42, "xz": 0.28, "y": 0.03, "yz": 0.27})


def test_counting_rule_probabilities_sum_to_one_and_match_a_hand_computation(lm):
    ids = prompt(lm)
    answers = lm.enumerate_answers(ids)
    assert sum(a.probability for a in answers) == pytest.approx(1.0)
    start = counting_start(lm.prompt_text(ids))
    by_text = {a.text: a.probability for a in answers}
    # P(Add) 0.8, P(" 2") 0.4, P(Add) 0.6, P(" 1") 0.6, P(answer after 2 steps) 0.6, P(right total) 0.6
    expected = 0.8 * 0.4 * 0.6 * 0.6 * 0.6 * 0.6
    assert by_text[f"Add 2\n\nAdd 1\n\n\\boxed{{{start + 3}}}"] == pytest.approx(expected)
    assert counting_rule("any", ("Add",)) == {" 1": 0.6, " 2": 0.4}


def test_sampling_frequencies_match_enumeration():
    lm = ToyLM(coin_rule)
    ids = prompt(lm)

    async def sample(n: int) -> list[str]:
        [handles] = await lm.open([ids], copies=n)
        outputs = await lm.extend(handles, FULL, seeds=list(range(n)))
        lm.release(handles)
        return [o.text for o in outputs]

    n = 20000
    counts = Counter(asyncio.run(sample(n)))
    for answer in lm.enumerate_answers(ids):
        p = answer.probability
        assert abs(counts[answer.text] / n - p) < 5 * math.sqrt(p * (1 - p) / n)


def test_temperature_and_top_p_reshape_the_distribution():
    lm = ToyLM(coin_rule)
    ids = prompt(lm)
    n = 20000

    async def first_tokens(params: StepParams) -> Counter:
        [handles] = await lm.open([ids], copies=n)
        outputs = await lm.extend(handles, params, seeds=list(range(n)))
        lm.release(handles)
        return Counter(o.text[0] for o in outputs)

    cold = asyncio.run(first_tokens(StepParams(max_tokens=1, stop=(), temperature=0.5)))
    p_x = 0.7**2 / (0.7**2 + 0.3**2)  # p^(1/T) renormalised
    assert abs(cold["x"] / n - p_x) < 5 * math.sqrt(p_x * (1 - p_x) / n)
    nucleus = asyncio.run(first_tokens(StepParams(max_tokens=1, stop=(), temperature=1.0, top_p=0.6)))
    assert nucleus == Counter({"x": n})
    greedy = asyncio.run(first_tokens(StepParams(max_tokens=1, stop=(), temperature=0.0)))
    assert greedy == Counter({"x": n})


def test_logprobs_are_temperature_one_log_probabilities():
    lm = ToyLM(coin_rule)

    async def go():
        [[handle]] = await lm.open([prompt(lm)])
        [output] = await lm.extend([handle], StepParams(max_tokens=8, stop=(), temperature=0.3), seeds=[5])
        return output

    output = asyncio.run(go())
    answers = {a.text: a.log_probability for a in lm.enumerate_answers(prompt(lm))}
    assert sum(output.logprobs) == pytest.approx(answers[output.text])


def test_equal_seed_and_sequence_give_equal_steps_whatever_the_batch(lm):
    ids = prompt(lm)
    seeds = (11, 12, 13, 14)

    def live(handles: list[int]) -> list[int]:
        return [h for h in handles if lm.token_ids(h)[-1] != lm.eos_token_id]

    async def steps_of_one(crowd: bool) -> list[list[int]]:
        [[mine]] = await lm.open([ids])
        [same] = await lm.open([ids], copies=40)
        [other] = await lm.open([prompt(lm, "Another question")], copies=9)
        steps = []
        for seed in seeds:
            if not live([mine]):
                break
            neighbours = live(same + other) if crowd else []
            noise = list(range(1000 + seed * 100, 1000 + seed * 100 + len(neighbours)))
            outputs = await lm.extend([*neighbours, mine], STEPWISE, seeds=[*noise, seed])
            steps.append(outputs[-1].token_ids)
        return steps

    alone = asyncio.run(steps_of_one(crowd=False))
    crowded = asyncio.run(steps_of_one(crowd=True))
    assert alone == crowded and len(alone) >= 1


def test_steps_stop_at_the_delimiter_eos_and_caps(lm):
    ids = prompt(lm)

    async def go():
        [handles] = await lm.open([ids], copies=200)
        outputs = await lm.extend(handles, STEPWISE, seeds=list(range(200)))
        capped = await lm.extend(handles[:1], StepParams(max_tokens=1, stop=(STEP,)), seeds=[0]) if outputs[0].finish_reason == "stop" else None
        return handles, outputs, capped

    handles, outputs, capped = asyncio.run(go())
    reasons = Counter(o.finish_reason for o in outputs)
    assert set(reasons) == {"stop", "eos"}
    for output in outputs:
        if output.finish_reason == "stop":
            assert output.text.endswith(STEP) and output.text.count(STEP) == 1
        else:
            assert output.token_ids[-1] == lm.eos_token_id and "\\boxed{" in output.text
            assert EOS not in output.text
    assert capped is None or (len(capped[0].token_ids) == 1 and capped[0].finish_reason in ("length", "eos"))
    tiny = ToyLM(context_length=len(ids) + 2)

    async def overflow():
        [[handle]] = await tiny.open([ids])
        return await tiny.extend([handle], FULL, seeds=[1])

    [out] = asyncio.run(overflow())
    assert out.finish_reason in ("context", "eos") and len(out.token_ids) <= 2


def test_fork_copies_and_release_frees(lm):
    ids = prompt(lm)

    async def go():
        [[handle]] = await lm.open([ids])
        [greedy] = await lm.extend([handle], StepParams(stop=(STEP,), max_tokens=64, temperature=0.0))
        assert greedy.text == "Add 1\n\n"  # the most likely first step
        [copy] = lm.fork([handle])
        assert lm.token_ids(copy) == lm.token_ids(handle)
        one = await lm.extend([handle], STEPWISE, seeds=[9])
        two = await lm.extend([copy], STEPWISE, seeds=[9])
        assert one[0].token_ids == two[0].token_ids
        lm.release([handle, copy])
        assert lm.live_sequences == 0
        with pytest.raises(KeyError, match="unknown or released"):
            lm.release([handle])
        with pytest.raises(KeyError):
            lm.token_ids(copy)

    asyncio.run(go())


def test_protocol_errors(lm):
    ids = prompt(lm)

    async def go():
        [[a, b]] = await lm.open([ids], copies=2)
        with pytest.raises(ValueError, match="twice"):
            await lm.extend([a, a], STEPWISE)
        with pytest.raises(ValueError, match="seeds"):
            await lm.extend([a, b], STEPWISE, seeds=[1])
        while True:
            [out] = await lm.extend([a], STEPWISE)
            if out.finish_reason == "eos":
                break
        with pytest.raises(ValueError, match="end-of-sequence"):
            await lm.extend([a], STEPWISE)
        with pytest.raises(ValueError, match="copies"):
            await lm.open([ids], copies=0)
        with pytest.raises(ValueError, match="at least one token"):
            await lm.open([[]])

    asyncio.run(go())
    with pytest.raises(ValueError, match="not in the vocabulary"):
        ToyLM(lambda p, g: {"unknown-word": 1.0}).enumerate_answers(ids)
    with pytest.raises(ValueError, match="sum to"):
        ToyLM(lambda p, g: {EOS: 0.5}).enumerate_answers(ids)
    with pytest.raises(ValueError, match="without ending"):
        ToyLM(lambda p, g: {"a": 1.0}, max_answer_tokens=5).enumerate_answers(ids)


def test_score_gives_exact_log_probabilities():
    lm = ToyLM(coin_rule)
    ids = prompt(lm)
    answers = lm.enumerate_answers(ids)
    impossible = [lm.token_id["z"], lm.token_id["x"]]
    outputs = asyncio.run(lm.score([ids] * (len(answers) + 1), [list(a.token_ids) for a in answers] + [impossible]))
    for answer, output in zip(answers, outputs):
        assert output.total == pytest.approx(answer.log_probability)
    assert outputs[-1].logprobs == [-math.inf, -math.inf]
    assert lm.usage.scored_tokens == sum(len(ids) + len(a.token_ids) for a in answers) + len(ids) + 2


def test_text_round_trips_and_chat_format(lm):
    text = "Natalia sold 48 clips, ½ in May — café ☕\n\nAdd 1"
    assert lm.decode(lm.encode(text)) == text
    assert lm.encode("Add 1\n\n") == [lm.token_id["Add"], lm.token_id[" 1"], lm.token_id[STEP]]
    ids = lm.chat([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}])
    assert lm.prompt_text(ids) == "<|system|>\nBe brief.<|end|>\n<|user|>\nHi<|end|>\n<|assistant|>\n"
    cont = lm.chat([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Add"}], continue_final_message=True)
    assert lm.prompt_text(cont).endswith("<|assistant|>\nAdd")
    with pytest.raises(ValueError, match="role"):
        lm.chat([{"role": "robot", "content": "x"}])


def test_usage_counts_and_concurrent_calls_share_passes():
    lm = ToyLM(coin_rule)
    ids = prompt(lm)

    async def go():
        [first, second] = await lm.open([ids, prompt(lm, "other")], copies=[3, 2])
        passes = lm.usage.forward_passes
        together = await asyncio.gather(lm.extend(first, FULL, seeds=[1, 2, 3]), lm.extend(second, FULL, seeds=[4, 5]))
        return passes, together

    passes_before, (a, b) = asyncio.run(go())
    longest = max(len(o.token_ids) for o in a + b)
    assert lm.usage.forward_passes - passes_before == longest  # one merged batch
    assert lm.usage.generated_tokens == sum(len(o.token_ids) for o in a + b)
    assert lm.usage.prefill_tokens == len(ids) + len(prompt(lm, "other"))
    assert lm.usage.calls == 3


def test_many_particles_are_vectorised():
    lm = ToyLM()
    ids = prompt(lm)

    async def go():
        [handles] = await lm.open([ids], copies=4096)
        outputs = await lm.extend(handles, STEPWISE, seeds=list(range(4096)))
        lm.release(handles)
        return outputs

    outputs = asyncio.run(go())
    first_steps = Counter(o.text for o in outputs)
    # P(first step is "Add 1\n\n") = 0.8 * 0.6
    assert abs(first_steps["Add 1\n\n"] / 4096 - 0.48) < 5 * math.sqrt(0.48 * 0.52 / 4096)
    assert np.isclose(sum(first_steps.values()), 4096)


def test_reopening_an_answer_prefix_continues_like_the_original(lm):
    ids = prompt(lm)

    async def go():
        [[original]] = await lm.open([ids])
        await lm.extend([original], StepParams(stop=(STEP,), temperature=0.0))
        [[reopened]] = await lm.open([lm.token_ids(original)])
        assert lm.token_ids(reopened) == lm.token_ids(original)
        for seed in (5, 6):
            a = await lm.extend([original], STEPWISE, seeds=[seed])
            b = await lm.extend([reopened], STEPWISE, seeds=[seed])
            assert a[0].token_ids == b[0].token_ids and a[0].logprobs == b[0].logprobs
            if a[0].finish_reason == "eos":
                break

    asyncio.run(go())
    with pytest.raises(ValueError, match="cannot produce"):
        asyncio.run(lm.open([ids + lm.encode("Subtract")]))


async def test_a_request_whose_decoding_fails_fails_alone(lm, monkeypatch):
    """Requests decoded together fail one by one: the one that cannot be
    decoded raises, the others get what they get alone."""
    prompts = [prompt(lm, f"What is {i} + 1?") for i in range(4)]
    alone = []
    for seed, ids in enumerate(prompts[:3]):
        [[handle]] = await lm.open([ids])
        [out] = await lm.extend([handle], FULL, seeds=[seed])
        alone.append(out.token_ids)
        lm.release([handle])
    decode = lm._decode
    poisoned = StepParams(max_tokens=63, stop=(), temperature=1.0)

    def failing(requests):
        if any(r.params is poisoned for r in requests):
            raise FloatingPointError("this request cannot be sampled")
        return decode(requests)

    monkeypatch.setattr(lm, "_decode", failing)
    handles = [h for [h] in await lm.open(prompts)]
    outcomes = await asyncio.gather(
        *(lm.extend([h], FULL, seeds=[seed]) for seed, h in enumerate(handles[:3])),
        lm.extend([handles[3]], poisoned, seeds=[0]),
        return_exceptions=True,
    )
    assert [o[0].token_ids for o in outcomes[:3]] == alone
    assert isinstance(outcomes[3], FloatingPointError)
    assert lm.token_ids(handles[3]) == prompts[3]  # the failed step wrote nothing
    assert lm.usage.generated_tokens == 2 * sum(len(t) for t in alone)  # the failed pass is not counted
    [again] = await lm.extend([handles[3]], FULL, seeds=[0])
    assert again.token_ids
    lm.release(handles)


@pytest.mark.parametrize("field,value", [("temperature", float("nan")), ("temperature", float("inf")),
                                         ("top_p", float("nan")), ("max_tokens", 2.5), ("max_tokens", True)])
def test_step_params_reject_non_finite_and_mistyped_values(field, value):
    with pytest.raises(ValueError, match=field):
        StepParams(**{field: value})
