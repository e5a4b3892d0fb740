"""Preference annotation: the pair rule on hand cases, exact density ratios on
toy models, resuming after a crash or a torn line, and clear refusals."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from piscale.annotate import AnnotationError, PromptRecord, annotate, choose_pair, load_prompts, skipped_path
from piscale.grading import extract_boxed
from piscale.lm.toy import ToyLM
from piscale.rewards.base import Reward
from piscale.rewards.cdr import DensityRatioReward

from test_rewards_cdr import WORDS, adding_rule  # two-step toy models with known ratios

class BoxedValue(Reward):
    """Scores a response by the number in its last \\boxed{} (0 without one),
    and can be made to fail on a given call."""

    name = "boxed-value"

    def __init__(self, fail_on_call: int | None = None):
        self.calls = 0
        self.fail_on_call = fail_on_call

    async def score(self, prompts, trajectories):
        self.calls += 1
        if self.calls == self.fail_on_call:
            raise RuntimeError("reward server went away")
        return [[float(extract_boxed("".join(steps)) or 0)] * len(steps) for steps in trajectories]


def text(path: Path) -> str:
    return path.read_text() if path.exists() else ""


def lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


# -- the pair rule ----------------------------------------------------------


def test_lowest_and_ties():
    texts = ["a", "b", "c", "d"]
    assert choose_pair(texts, [0.2, 0.9, 0.1, 0.5]) == (1, 2)
    # the first of tied best responses is chosen; the first of tied worst rejected
    assert choose_pair(texts, [0.9, 0.9, 0.1, 0.1]) == (0, 2)
    assert choose_pair(texts, [0.5, 0.5, 0.5, 0.5]).startswith("tie")
    # unscored and impossible responses are not candidates
    assert choose_pair(texts, [None, 0.3, -math.inf, 0.3]).startswith("tie")
    assert choose_pair(texts, [None, 0.3, None, 0.1]) == (1, 3)
    assert "1 usable" in choose_pair(texts, [None, 0.3, None, None])
    # a response with the chosen text is never its rejected partner
    assert choose_pair(["x", "x", "y"], [0.9, 0.8, 0.1]) == (0, 2)
    assert choose_pair(["x", "x"], [0.9, 0.8]).startswith("tie")


def test_margin():
    texts = ["a", "b", "c"]
    assert choose_pair(texts, [1.0, 0.8, 0.5], margin=0.3) == (0, 2)
    assert "by more than 0.6" in choose_pair(texts, [1.0, 0.8, 0.5], margin=0.6)
    with pytest.raises(ValueError, match="margin"):
        choose_pair(texts, [1.0, 0.8, 0.5], margin=-1)
    with pytest.raises(ValueError, match="lowest"):
        choose_pair(texts, [1.0, 0.8, 0.5], rejected="worst")


def test_random_rejected_is_uniform_over_the_worse_responses():
    texts = list("abcdef")
    scores = [0.3, 1.0, 0.2, 1.0, 0.9, 0.6]  # 1 chosen; 3 ties it; 0, 2, 4, 5 are worse
    rng = np.random.default_rng(7)
    draws = Counter(choose_pair(texts, scores, rejected="random", rng=rng)[1] for _ in range(4000))
    assert set(draws) == {0, 2, 4, 5}
    for count in draws.values():
        assert abs(count / 4000 - 0.25) < 0.03


# -- end to end -------------------------------------------------------------


async def test_given_responses_scored_by_an_exact_density_ratio(tmp_path: Path):
    strong = ToyLM(adding_rule(0.8), words=WORDS, name="strong")
    weak = ToyLM(adding_rule(0.5), words=WORDS, name="weak")
    responses = ("Add 1\n\nAdd 2", "Add 2\n\nAdd 2", "Add 1\n\nAdd 1")
    out = tmp_path / "pairs.jsonl"
    summary = await annotate([PromptRecord("q1", "q", responses)], None, DensityRatioReward(strong, weak), out)
    [pair] = lines(out)
    up, down = math.log(0.8 / 0.5), math.log(0.2 / 0.5)
    assert (pair["chosen"], pair["rejected"]) == ("Add 1\n\nAdd 1", "Add 2\n\nAdd 2")
    assert pair["chosen_score"] == pytest.approx(2 * up)
    assert pair["rejected_score"] == pytest.approx(2 * down)
    assert [r["score"] for r in pair["responses"]] == pytest.approx([up + down, 2 * down, 2 * up])
    assert (pair["id"], pair["prompt"], pair["policy"]) == ("q1", "q", "given")
    assert summary.pairs == 1 and summary.generated_tokens == 0


async def test_sampled_pairs_follow_the_reward(tmp_path: Path):
    prompts = [PromptRecord(f"p{i}", f"Count from {i}") for i in range(6)]
    out = tmp_path / "pairs.jsonl"
    summary = await annotate(prompts, ToyLM(), BoxedValue(), out, k=6, batch_size=4)
    pairs, skipped = lines(out), lines(skipped_path(out))
    assert summary.pairs == len(pairs) and sum(summary.skipped.values()) == len(skipped)
    assert sorted(r["id"] for r in pairs + skipped) == [p.id for p in prompts]
    assert pairs, "six samples per prompt should rarely all box the same number"
    for pair in pairs:
        values = [float(extract_boxed(r["text"]) or 0) for r in pair["responses"]]
        assert pair["chosen_score"] == max(values) == float(extract_boxed(pair["chosen"]))
        assert pair["rejected_score"] == min(values) < max(values)
        assert len(pair["responses"]) == 6 and all(r["finish_reason"] == "eos" for r in pair["responses"])
        assert all(r["tokens"] == len(r["token_ids"]) and r["token_ids"][-1] == ToyLM().eos_token_id
                   for r in pair["responses"])
    for skip in skipped:
        assert len({r["score"] for r in skip["responses"]}) == 1


async def test_a_crash_then_a_resume_writes_what_one_run_writes(tmp_path: Path):
    prompts = [PromptRecord(f"p{i}", f"Count from {i}") for i in range(8)]
    prompts.insert(3, PromptRecord("tied", "q", ("\\boxed{5}", "It is \\boxed{5}")))
    whole = tmp_path / "whole.jsonl"
    await annotate(prompts, ToyLM(), BoxedValue(), whole, k=4, batch_size=2, rejected="random")

    resumed = tmp_path / "resumed.jsonl"
    with pytest.raises(RuntimeError, match="went away"):
        await annotate(prompts, ToyLM(), BoxedValue(fail_on_call=3), resumed, k=4, batch_size=2, rejected="random")
    written = lines(resumed) + lines(skipped_path(resumed))
    assert len(written) == 4  # two batches stored, the third lost
    # a crash in the middle of a write leaves a torn last line
    with resumed.open("a") as handle:
        handle.write('{"id": "p8", "prompt": "Count fr')
    summary = await annotate(prompts, ToyLM(), BoxedValue(), resumed, k=4, batch_size=2, rejected="random")
    assert summary.already_done == 4
    assert text(resumed) == text(whole) and len(lines(whole)) == 8
    [tied] = lines(skipped_path(whole))
    assert (tied["id"], tied["policy"], tied["sampling"]) == ("tied", "given", None)
    assert all(r["policy"] == "toy" and r["sampling"]["temperature"] == 0.8 for r in lines(whole))
    assert text(skipped_path(resumed)) == text(skipped_path(whole))
    # and a third run has nothing left to do
    again = await annotate(prompts, ToyLM(), BoxedValue(), resumed, k=4, batch_size=2, rejected="random")
    assert (again.already_done, again.pairs, again.generated_tokens) == (9, 0, 0)


async def test_an_output_of_another_reward_is_refused(tmp_path: Path):
    out = tmp_path / "pairs.jsonl"
    await annotate([PromptRecord("p", "q", ("\\boxed{1}", "\\boxed{2}"))], None, BoxedValue(), out)
    other = BoxedValue()
    other.name = "another"
    with pytest.raises(AnnotationError, match="written with reward 'boxed-value'"):
        await annotate([PromptRecord("p", "q", ("\\boxed{1}", "\\boxed{2}"))], None, other, out)


async def test_truncated_and_empty_responses_are_not_candidates(tmp_path: Path):
    # max_tokens=3 cuts every counting answer ("Add 1\n\n..." is longer)
    out = tmp_path / "pairs.jsonl"
    await annotate([PromptRecord("p", "Count")], ToyLM(), BoxedValue(), out, k=3, max_tokens=3)
    [skip] = lines(skipped_path(out))
    assert skip["skipped"].startswith("0 usable")
    assert {r["excluded"] for r in skip["responses"]} == {"hit the token cap"}
    kept = tmp_path / "kept.jsonl"
    await annotate([PromptRecord("p", "Count")], ToyLM(), BoxedValue(), kept, k=3, max_tokens=3, keep_truncated=True)
    [skip] = lines(skipped_path(kept))  # all score 0 (nothing boxed yet): a tie, but scored
    assert skip["skipped"].startswith("tie") and all(r["score"] == 0.0 for r in skip["responses"])
    given = tmp_path / "given.jsonl"
    await annotate([PromptRecord("p", "q", ("  ", "\\boxed{3}", "\\boxed{1}"))], None, BoxedValue(), given)
    [pair] = lines(given)
    assert pair["responses"][0]["excluded"] == "empty" and pair["rejected"] == "\\boxed{1}"


def test_load_prompts(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    path = tmp_path / "prompts.jsonl"
    path.write_text(
        '{"prompt": "first"}\n\n{"instruction": "second", "id": 7}\n'
        '{"question": "third", "responses": ["a", "b"]}\n'
    )
    records = load_prompts(str(path))
    assert [(r.id, r.prompt, r.responses) for r in records] == [
        ("line-1", "first", None), ("7", "second", None), ("line-4", "third", ("a", "b"))
    ]
    assert len(load_prompts(str(path), limit=2)) == 2
    data = tmp_path / "data"
    data.mkdir()
    (data / "gsm8k_test.jsonl").write_text(
        "".join(json.dumps({"question": f"Q{i}?", "answer": f"so #### {i}"}) + "\n" for i in range(3))
    )
    monkeypatch.setenv("PISCALE_DATA", str(data))
    questions = load_prompts("gsm8k", limit=2)
    assert [(r.id, r.prompt) for r in questions] == [("gsm8k-0", "Q0?"), ("gsm8k-1", "Q1?")]

    def refused(text: str, match: str, **kwargs) -> None:
        path.write_text(text)
        with pytest.raises(AnnotationError, match=match):
            load_prompts(str(path), **kwargs)

    refused('{"prompt": "a"}\n{"prompt": ', r"prompts.jsonl:2: not valid JSON")
    refused('{"text": "a"}\n', r"prompts.jsonl:1: no prompt; expected a non-empty string in prompt or question")
    refused('{"text": "a"}\n', r"no prompt; expected a non-empty string in body", field="body")
    refused('{"prompt": "a", "id": 1}\n{"prompt": "b", "id": 1}\n', r"prompts.jsonl:2: id '1' already used at .*prompts.jsonl:1$")
    refused('{"prompt": "a", "responses": ["only one"]}\n', r"1 response\(s\) given")
    refused('["a"]', r"expected a JSON object")
    with pytest.raises(AnnotationError, match="not a file and not a built-in task"):
        load_prompts(str(tmp_path / "missing.jsonl"))


def test_cli_writes_pairs_and_skips(tmp_path: Path):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"id": f"p{i}", "prompt": f"Count from {i}"}) + "\n" for i in range(4)))
    out = tmp_path / "pairs.jsonl"
    command = [sys.executable, "-c", "from piscale.cli import app; app()", "annotate", str(prompts), "--out", str(out), "--model", "toy",
               "--reward", "verify:2", "--k", "8", "--seed", "3"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    pairs, skipped = lines(out), lines(skipped_path(out))
    assert sorted(r["id"] for r in pairs + skipped) == ["p0", "p1", "p2", "p3"]
    assert pairs and skipped  # with this seed: two prompts with a boxed 2 among 8 answers, two without
    for pair in pairs:  # the verifier scores a boxed 2 as 1 and anything else as 0
        assert extract_boxed(pair["chosen"]) == "2" and extract_boxed(pair["rejected"]) != "2"
    assert f"{len(pairs)} new pairs" in done.stderr
    bad = subprocess.run([*command[:4], str(tmp_path / "none.jsonl"), *command[5:]], capture_output=True, text=True)
    assert bad.returncode == 2 and "not a file" in bad.stderr
