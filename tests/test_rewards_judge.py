"""The LLM judge: P(Yes) / (P(Yes) + P(No)) from a backend's scores."""

from __future__ import annotations

import math

import pytest
import torch

from piscale.lm.toy import EOS, ToyLM
from piscale.rewards import score_trajectories
from piscale.rewards.judge import DEFAULT_TEMPLATE, LLMJudge
from piscale.rewards.templates import fill


def verdict_rule(prompt: str, generated: tuple[str, ...]) -> dict[str, float]:
    """A judge whose first answer word depends on the solution it reads."""
    if generated:
        return {EOS: 1.0}
    if "3 + 4 = 8" in prompt:
        return {"Yes": 0.1, "No": 0.6, "Maybe": 0.3}
    if "3 + 4 = 7" in prompt:
        return {"Yes": 0.6, "No": 0.2, "Maybe": 0.2}
    return {"Yes": 0.3, "No": 0.3, "Maybe": 0.4}


def toy_judge_lm() -> ToyLM:
    return ToyLM(verdict_rule, words=("Yes", "No", "Maybe"))


async def test_judge_score_is_yes_over_yes_plus_no():
    judge = LLMJudge(toy_judge_lm())
    steps = ["Tom has 3 apples.", "3 + 4 = 7 apples.", "Then 3 + 4 = 8."]
    scores = await judge.score(["How many apples?"], [steps])
    # The judge reads the whole solution so far: the third prefix contains the error.
    assert scores == [[pytest.approx(0.5), pytest.approx(0.75), pytest.approx(0.1 / 0.7)]]


async def test_judge_remembers_prefixes_and_supports_model_aggregation():
    lm = toy_judge_lm()
    judge = LLMJudge(lm)
    await judge.score(["q"], [["3 + 4 = 7"]])
    calls = lm.usage.calls
    again = await score_trajectories(judge, ["q", "q"], [["3 + 4 = 7"], ["3 + 4 = 7"]], "model")
    assert again == [pytest.approx(0.75)] * 2
    assert lm.usage.calls == calls  # nothing new to judge


async def test_judge_template_is_editable():
    template = "Check {solution} for {problem}. \\boxed{} is fine here. Yes or No?"
    lm = toy_judge_lm()
    judge = LLMJudge(lm, template=template, system_prompt="Be strict.")
    ids = judge.prompt_ids("P", ["3 + 4 = 7"])
    text = lm.decode(ids)
    assert "Check 3 + 4 = 7 for P. \\boxed{} is fine here." in text
    assert "Be strict." in text
    # A problem that contains a field name is not filled in again.
    assert fill(DEFAULT_TEMPLATE, problem="a {solution}", solution="b").count("a {solution}") == 1
    with pytest.raises(ValueError, match="must contain \\{solution\\}"):
        LLMJudge(lm, template="Is {problem} solved?")


async def test_judge_over_transformers_backend_matches_logits():
    from piscale.lm.hf import TransformersLM
    from test_rewards_support import causal_lm, char_tokenizer

    tokenizer = char_tokenizer()
    model = causal_lm(tokenizer, seed=3)
    lm = TransformersLM(model, tokenizer, device="cpu")
    # One-character answers are one token each: the score is a next-token ratio.
    judge = LLMJudge(lm, yes="Y", no="N")
    steps = ["3 + 4 = 7"]
    (score,) = (await judge.score(["Add."], [steps]))[0]
    ids = judge.prompt_ids("Add.", steps)
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids])).logits[0, -1].double()
    log_probs = torch.log_softmax(logits, dim=-1)
    yes, no = tokenizer.convert_tokens_to_ids("Y"), tokenizer.convert_tokens_to_ids("N")
    expected = 1 / (1 + math.exp(float(log_probs[no] - log_probs[yes])))
    assert score == pytest.approx(expected, abs=1e-5)
    assert abs(expected - 0.5) > 1e-3


async def test_a_long_solution_loses_middle_steps_to_fit_the_judge_context():
    steps = ["Tom has 3 apples."] + [f"Filler step number {i} restates the count." for i in range(12)] + ["Then 3 + 4 = 8."]
    full = len(LLMJudge(toy_judge_lm())._render("How many apples?", steps))
    lm = ToyLM(verdict_rule, words=("Yes", "No", "Maybe"), context_length=full - 20)
    judge = LLMJudge(lm)
    ids = judge.prompt_ids("How many apples?", steps)
    assert len(ids) < lm.context_length
    text = lm.decode(ids)
    assert "Tom has 3 apples." in text and "Then 3 + 4 = 8." in text and "steps omitted]" in text
    assert "Filler step number 11" in text and "Filler step number 0 " not in text
    # the judge still reads the latest step, which holds the error
    [[*_, last]] = await judge.score(["How many apples?"], [steps])
    assert last == pytest.approx(0.1 / 0.7)
    tiny = LLMJudge(ToyLM(verdict_rule, words=("Yes", "No", "Maybe"), context_length=8))
    with pytest.raises(ValueError, match="even with only the latest step"):
        tiny.prompt_ids("How many apples?", steps)
