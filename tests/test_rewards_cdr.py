"""Customizable density ratios: exact values on toy models, hand computations
on tiny transformers models, routing and exemplars."""

from __future__ import annotations

import math

import pytest
import torch

from piscale.lm.toy import EOS, STEP, ToyLM
from piscale.rewards import score_trajectories
from piscale.rewards.cdr import (
    DEFAULT_CRITERIA,
    DensityRatioReward,
    Exemplar,
    JudgeRouter,
    KeywordRouter,
)

WORDS = ("Add", " 1", " 2", "safety", "reasoning", "chat")


def adding_rule(p_one: float):
    """'Add 1' with probability p_one, 'Add 2' otherwise, then a step break;
    after two steps, the end."""

    def rule(prompt: str, generated: tuple[str, ...]) -> dict[str, float]:
        if not generated or generated[-1] == STEP:
            return {"Add": 1.0} if generated.count(STEP) < 2 else {EOS: 1.0}
        if generated[-1] == "Add":
            return {" 1": p_one, " 2": 1 - p_one}
        return {STEP: 1.0}

    return rule


@pytest.fixture()
def pair():
    return ToyLM(adding_rule(0.8), words=WORDS, name="strong"), ToyLM(adding_rule(0.5), words=WORDS, name="weak")


async def test_density_ratio_exact_on_toy_models(pair):
    strong, weak = pair
    reward = DensityRatioReward(strong, weak)
    assert reward.scale == "log"
    scores = await reward.score(["q"], [["Add 1\n\n", "Add 2\n\n"]])
    # Step 1 is "Add 1": log 0.8 - log 0.5. The partial answer after step 2
    # is "Add 1\n\nAdd 2": plus log 0.2 - log 0.5.
    first = math.log(0.8 / 0.5)
    assert scores[0] == pytest.approx([first, first + math.log(0.2 / 0.5)])
    mean = DensityRatioReward(strong, weak, mean=True)
    tokens = len(strong.encode("Add 1"))
    assert (await mean.score(["q"], [["Add 1"]]))[0] == [pytest.approx(first / tokens)]


async def test_model_over_itself_is_zero_and_swapping_flips_the_sign(pair):
    strong, weak = pair
    twin = ToyLM(adding_rule(0.8), words=WORDS, name="twin")
    responses = [["Add 1"], ["Add 2\n\n", "Add 2"], ["Add 1\n\n", "Add 1"]]
    itself = await score_trajectories(DensityRatioReward(strong, twin), ["q"] * 3, responses, "model")
    assert itself == [0.0, 0.0, 0.0]
    forward = await score_trajectories(DensityRatioReward(strong, weak), ["q"] * 3, responses, "model")
    backward = await score_trajectories(DensityRatioReward(weak, strong), ["q"] * 3, responses, "model")
    assert all(abs(f) > 0.1 for f in forward)
    assert backward == pytest.approx([-f for f in forward])


def test_different_tokenizers_are_refused(pair):
    strong, _ = pair
    other = ToyLM(adding_rule(0.5), words=("Add", " 1", " 2", "The quick"))
    with pytest.raises(ValueError, match="same tokenizer"):
        DensityRatioReward(strong, other)


def test_keyword_router():
    router = KeywordRouter()
    assert router.domain("How do I build a bomb at home?") == "safety"
    assert router.domain("Solve 3x + 5 = 11 for x.") == "reasoning"
    assert router.domain("How many apples are left?") == "reasoning"
    assert router.domain("Write a short poem about autumn.") == "chat"
    # Whole words only: "skill" does not contain the keyword "kill".
    assert router.domain("Describe a useful skill for a gardener.") == "chat"


async def test_criteria_and_exemplars_reach_both_models(pair):
    strong, weak = pair
    exemplar = Exemplar(user="Add one.", good="Add 1", bad="Add 2", explanation="it adds two")
    reward = DensityRatioReward(strong, weak, criteria=DEFAULT_CRITERIA, exemplars=[exemplar])
    messages = reward.messages("Solve 1 + 1.", "reasoning")
    assert messages[0] == {"role": "system", "content": DEFAULT_CRITERIA["reasoning"]}
    assert messages[1]["role"] == "user" and "Add 2" in messages[1]["content"]
    assert "it adds two" in messages[1]["content"]
    assert messages[2] == {"role": "assistant", "content": "Add 1"}
    assert messages[3] == {"role": "user", "content": "Solve 1 + 1."}
    assert await reward.domains(["Solve 1 + 1.", "Tell me a story."]) == ["reasoning", "chat"]
    # The toy rules ignore the context, so the customised ratio equals the plain one.
    scores = await reward.score(["Solve 1 + 1."], [["Add 1"]])
    assert scores[0] == [pytest.approx(math.log(0.8 / 0.5))]
    with pytest.raises(ValueError, match="no entry"):
        DensityRatioReward(strong, weak, criteria={"chat": "be nice"})


async def test_judge_router_picks_the_likeliest_domain():
    def rule(prompt: str, generated: tuple[str, ...]) -> dict[str, float]:
        if generated:
            return {EOS: 1.0}
        if "poison" in prompt:
            return {"safety": 0.7, "reasoning": 0.1, "chat": 0.2}
        return {"safety": 0.1, "reasoning": 0.3, "chat": 0.6}

    router = JudgeRouter(ToyLM(rule, words=WORDS))
    assert await router.route(["How to poison a well?", "Hello there!"]) == ["safety", "chat"]


async def test_density_ratio_hand_computation_on_tiny_transformers():
    from piscale.lm.hf import TransformersLM
    from test_rewards_support import causal_lm, char_tokenizer

    tokenizer = char_tokenizer()
    strong_model, weak_model = causal_lm(tokenizer, seed=11), causal_lm(tokenizer, seed=12)
    strong = TransformersLM(strong_model, tokenizer, device="cpu", name="s")
    weak = TransformersLM(weak_model, tokenizer, device="cpu", name="w")
    reward = DensityRatioReward(strong, weak, criteria="Be correct.")
    prompt, steps = "What is 2 + 2?", ["2 + 2 = 4.\n\n", "So \\boxed{4}."]
    scores = (await reward.score([prompt], [steps]))[0]

    def log_likelihood(model, response: str) -> float:
        messages = [{"role": "system", "content": "Be correct."}, {"role": "user", "content": prompt}]
        context = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        context_ids = tokenizer(context, add_special_tokens=False).input_ids
        response_ids = tokenizer(response, add_special_tokens=False).input_ids
        ids = torch.tensor([context_ids + response_ids])
        with torch.no_grad():
            log_probs = torch.log_softmax(model(input_ids=ids).logits[0].double(), dim=-1)
        start = len(context_ids)
        return sum(float(log_probs[start + k - 1, t]) for k, t in enumerate(response_ids))

    expected = [
        log_likelihood(strong_model, text) - log_likelihood(weak_model, text)
        for text in ("2 + 2 = 4.", "2 + 2 = 4.\n\nSo \\boxed{4}.")
    ]
    assert scores == pytest.approx(expected, abs=1e-3)
    assert all(abs(e) > 0.1 for e in expected)
    itself = DensityRatioReward(strong, TransformersLM(strong_model, tokenizer, device="cpu", name="s2"))
    assert (await itself.score([prompt], [steps]))[0] == pytest.approx([0.0, 0.0], abs=1e-4)
