"""BRAIn distillation: the loss on hand cases (log n at the start, DPO's loss
for two responses, its gradient b - α), its fixed point b = α reached by
training a small model, reading annotation files, and the saved model."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from piscale.distill import (
    DistillError,
    Group,
    Recipe,
    _Encoded,
    brain_loss,
    distill,
    load_groups,
    sequence_logprobs,
)
from piscale.lm.hf import TransformersLM

from tiny_models import tiny_causal_lm


def test_the_loss_starts_at_log_n_whatever_the_rewards():
    policy = torch.tensor([[-3.0, -7.0, -1.5, 0.0], [-2.0, -4.0, 0.0, 0.0]])
    rewards = torch.tensor([[0.3, -2.0, 5.0, 1.0], [1.0, 4.0, -math.inf, -math.inf]])  # row 2 has 2 responses
    losses = brain_loss(policy, policy.clone(), rewards, beta=0.7)
    assert losses.tolist() == pytest.approx([math.log(4), math.log(2)])


def test_two_responses_and_a_hard_preference_give_dpo():
    policy = torch.tensor([[-3.0, -5.0]])
    reference = torch.tensor([[-3.5, -4.0]])
    rewards = torch.tensor([[1.0, 0.0]])
    loss = brain_loss(policy, reference, rewards, beta=1e-3)  # α = (1, 0) to float precision
    margin = (policy - reference)[0, 0] - (policy - reference)[0, 1]
    assert float(loss) == pytest.approx(float(-torch.nn.functional.logsigmoid(margin)))


def test_the_gradient_is_b_minus_alpha():
    policy = torch.tensor([[-3.0, -5.0, -2.0]], requires_grad=True)
    reference = torch.tensor([[-3.5, -4.0, -2.5]])
    rewards = torch.tensor([[0.0, 1.0, 2.0]])
    brain_loss(policy, reference, rewards, beta=2.0).sum().backward()
    alpha = torch.softmax(rewards / 2.0, dim=-1)
    b = torch.softmax(policy.detach() - reference, dim=-1)
    assert policy.grad[0].tolist() == pytest.approx((b - alpha)[0].tolist(), abs=1e-6)


@pytest.fixture()
def tiny_lm():
    model, tokenizer = tiny_causal_lm("qwen2", seed=1)
    return TransformersLM(model, tokenizer, device="cpu", name="tiny")


def ratios(lm: TransformersLM, group: Group, reference: torch.Tensor) -> torch.Tensor:
    context = lm.prompt_ids(group.prompt, group.system)
    eos = lm.tokenizer.eos_token_id
    responses = [lm.encode(t) + [eos] for t in group.responses]
    with torch.no_grad():
        return sequence_logprobs(lm.model, [context] * len(responses), responses, lm.pad_token_id) - reference


def test_training_reaches_the_fixed_point_b_equals_alpha(tiny_lm, tmp_path: Path):
    group = Group(
        "q", "Pick one.", None, ("red", "green", "blue"), finished=(True, True, True),
        token_ids=(None, None, None), log_rewards=(0.0, 1.0, 2.0),
    )
    start = ratios(tiny_lm, group, torch.zeros(3))
    recipe = Recipe(beta=1.0, learning_rate=3e-3, examples_per_step=1, micro_batch=1)
    metrics = distill(tiny_lm, [group] * 150, recipe, out=tmp_path / "model")
    assert metrics[0].loss == pytest.approx(math.log(3), abs=1e-4)  # θ = θ_sft at the first step
    assert metrics[-1].loss < metrics[0].loss - 0.05
    b = torch.softmax(ratios(tiny_lm, group, start), dim=-1)
    alpha = torch.softmax(torch.tensor(group.log_rewards), dim=-1)
    # L = H(α, b) is smallest at b = α (where it equals the entropy of α)
    assert b.tolist() == pytest.approx(alpha.tolist(), abs=0.02)
    entropy = float(-(alpha * alpha.log()).sum())
    assert metrics[-1].loss == pytest.approx(entropy, abs=0.01)
    assert metrics[0].target_ess == pytest.approx(float(1 / (alpha**2).sum()))

    # the saved folder is the trained model
    saved = json.loads((tmp_path / "model" / "metrics.jsonl").read_text().splitlines()[-1])
    assert saved["step"] == 150
    from transformers import AutoModelForCausalLM

    assert (tmp_path / "model" / "tokenizer_config.json").is_file()
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "model")
    # (the test's character tokenizer does not survive a reload as itself, so reuse it)
    reloaded = TransformersLM(model, tiny_lm.tokenizer, device="cpu", name="reloaded")
    assert ratios(reloaded, group, start).tolist() == pytest.approx(ratios(tiny_lm, group, start).tolist(), abs=1e-4)


def test_responses_are_scored_as_sampled(tiny_lm):
    eos = tiny_lm.tokenizer.eos_token_id
    sampled = (5, 6, 7, eos)  # any ids: what the sampler produced, not what the text re-encodes to
    group = Group("q", "Pick.", "Be brief.", ("ab", "cd"), (True, False), (sampled, None), (0.0, 1.0))
    encoded = _Encoded(tiny_lm, [group])
    assert encoded.responses == [list(sampled), tiny_lm.encode("cd")]
    assert encoded.contexts == [tiny_lm.prompt_ids("Pick.", "Be brief.")] * 2 and encoded.shape == [2]


def record(i: int, scores: list[float | None], **overrides) -> dict:
    base = {
        "id": f"p{i}", "prompt": f"question {i}", "reward": "r", "reward_scale": "probability", "policy": "tiny",
        "system": None, "sampling": {"temperature": 1.0, "top_p": 1.0, "max_tokens": 64},
        "responses": [
            {"text": f"answer {j}", "tokens": 3, "finish_reason": "eos" if s is not None else "length", "score": s,
             "token_ids": [10 + j, 11, 2]}
            for j, s in enumerate(scores)
        ],
    }
    return base | overrides


def write(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_load_groups_reads_pairs_and_ties(tmp_path: Path):
    pairs = write(tmp_path / "a.jsonl", [record(0, [0.5, 0.25, None]), record(1, [0.5, 0.0])])
    given = record(4, [0.9, 0.1], policy="given", sampling=None)
    write(tmp_path / "a.skipped.jsonl", [record(2, [0.5, 0.5]), record(3, [0.5, None]), given])
    groups, left_out = load_groups([pairs], policy="tiny")
    # p1's second response scored 0 (log r = -inf: ruled out), p3's was cut off:
    # each keeps one response, which carries no gradient
    assert [g.id for g in groups] == ["p0", "p2"]
    assert left_out == {"fewer than two scored responses": 2, "responses given, not sampled from the model": 1}
    assert groups[0].log_rewards == pytest.approx((math.log(0.5), math.log(0.25)))
    assert groups[0].responses == ("answer 0", "answer 1") and groups[0].finished == (True, True)
    assert groups[0].token_ids == ((10, 11, 2), (11, 11, 2))
    assert groups[1].log_rewards == pytest.approx((math.log(0.5), math.log(0.5)))  # a tie still counts


def test_load_groups_refusals(tmp_path: Path):
    path = tmp_path / "a.jsonl"

    def refused(records: list[dict], match: str, policy: str | None = "tiny") -> None:
        write(path, records)
        with pytest.raises(DistillError, match=match):
            load_groups([path], policy=policy)

    refused([record(0, [0.5, 0.2], sampling={"temperature": 0.8, "top_p": 1.0})], "temperature 0.8")
    refused([record(0, [0.5, 0.2])], "sampled from 'tiny', but the model trained is 'other'", policy="other")
    refused([record(0, [0.5, 0.2], reward_scale=None)], "scale")
    refused([record(0, [0.5, 0.2], sampling=None)], "not a piscale annotate record")
    refused([record(0, [0.5, 0.2]), record(0, [0.5, 0.1])], "appears twice")
    refused([record(0, [0.5, None])], "no prompt .* has two scored responses")
    with pytest.raises(DistillError, match="no annotation file"):
        load_groups([tmp_path / "missing.jsonl"])
    with pytest.raises(DistillError, match="learning_rate"):
        Recipe(learning_rate=0)


def test_cli_trains_and_saves(tmp_path: Path):
    import subprocess
    import sys

    model, tokenizer = tiny_causal_lm("qwen2", seed=2)
    folder = tmp_path / "sft"
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    annotations = write(tmp_path / "a.jsonl", [record(i, [0.9, 0.3, 0.6], policy=str(folder)) for i in range(3)])
    cli = [sys.executable, "-c", "from piscale.cli import app; app()", "distill", str(annotations),
           "--prompts-per-step", "2", "--micro-batch", "2", "--epochs", "2"]
    cli_sft = [*cli, "--model", str(folder)]
    done = subprocess.run([*cli_sft, "--out", str(tmp_path / "out")], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    steps = [json.loads(line) for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    assert [(s["epoch"], s["step"]) for s in steps] == [(1, 1), (1, 2), (2, 3), (2, 4)]
    assert steps[0]["loss"] == pytest.approx(math.log(3), abs=1e-4)
    assert (tmp_path / "out" / "model.safetensors").is_file() and "4 steps" in done.stderr
    again = subprocess.run([*cli_sft, "--out", str(tmp_path / "out")], capture_output=True, text=True, timeout=300)
    assert again.returncode == 2 and "not empty" in again.stderr
    other = subprocess.run([*cli, "--model", "smollm2-135m-instruct", "--out", str(tmp_path / "o2")],
                           capture_output=True, text=True, timeout=300)
    assert other.returncode == 2 and "the proposal must be the model before training" in other.stderr


def test_sequence_logprobs_equal_the_engines_scores(tiny_lm):
    import asyncio

    contexts = [tiny_lm.prompt_ids("Pick one."), tiny_lm.prompt_ids("A much longer question, really.")]
    responses = [tiny_lm.encode("red"), tiny_lm.encode("a longer answer") + [tiny_lm.tokenizer.eos_token_id]]
    with torch.no_grad():
        ours = sequence_logprobs(tiny_lm.model, contexts, responses, tiny_lm.pad_token_id)
    engine = asyncio.run(tiny_lm.score(contexts, responses))
    assert ours.tolist() == pytest.approx([s.total for s in engine], abs=1e-4)
