"""The learned step value on a tiny random-weight backbone: its scores equal
the head applied to hidden states of a plain full forward pass, scoring is
incremental, joined and separate steps give the same score, head files
round-trip, and the shipped head matches its recorded hash."""

from __future__ import annotations

import asyncio
import copy
import json

import numpy as np
import pytest
import torch

from piscale.rewards.aggregate import score_trajectories
from piscale.rewards.value import (
    HeadFile,
    HeadFileError,
    StepValueReward,
    ValueHead,
    file_sha256,
    shipped_head_path,
    shipped_heads,
)
from tiny_models import tiny_causal_lm

PROMPT = "Tom has 3 apples and buys 4 more. How many?"
STEPS = ["Tom starts with 3 apples.\n\n", "He buys 4, so 3 + 4 = 7.\n\n", "The answer is \\boxed{7}."]
SYSTEM = "Reason step by step."


@pytest.fixture(scope="module")
def backbone():
    return tiny_causal_lm("qwen2", seed=3)


def random_head(size: int, kind: str = "logistic", seed: int = 0) -> ValueHead:
    rng = np.random.default_rng(seed)
    mean = rng.normal(size=size).astype(np.float32)
    scale = rng.uniform(0.5, 2.0, size=size).astype(np.float32)
    if kind == "logistic":
        return ValueHead(mean, scale, [rng.normal(size=size).astype(np.float32)], [np.float32(0.3)], kind)
    hidden = 8
    return ValueHead(
        mean,
        scale,
        [rng.normal(size=(hidden, size)).astype(np.float32), rng.normal(size=hidden).astype(np.float32)],
        [rng.normal(size=hidden).astype(np.float32), np.float32(-0.2)],
        kind,
    )


def make_reward(backbone, head=None, layer=-1, **options) -> StepValueReward:
    model, tokenizer = backbone
    head = head or random_head(model.config.hidden_size)
    return StepValueReward(model, tokenizer, head, layer=layer, system_prompt=SYSTEM, **options)


def by_hand(backbone, head: ValueHead, layer: int, steps) -> list[float]:
    """V at the end of each step, from one plain forward pass over the text
    written out by hand: chat prompt, then each stripped part and a blank line."""
    model, tokenizer = backbone
    messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": PROMPT}]
    prefix = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    ids = tokenizer(prefix, add_special_tokens=False)["input_ids"]
    ends = []
    for step in steps:
        ids = ids + tokenizer(step.strip() + "\n\n", add_special_tokens=False)["input_ids"]
        ends.append(len(ids) - 1)
    with torch.no_grad():
        states = model(torch.tensor([ids]), output_hidden_states=True).hidden_states[layer][0]
    mean, scale, (w,), (b,) = head.mean, head.scale, head.weights, head.biases
    logits = ((states[ends].numpy() - mean) / scale) @ w + b
    return list(1 / (1 + np.exp(-logits)))


@pytest.mark.parametrize("layer", [-1, 1])
def test_scores_equal_the_head_on_hidden_states_of_a_full_forward(backbone, layer):
    reward = make_reward(backbone, layer=layer)
    [scores] = asyncio.run(reward.score([PROMPT], [STEPS]))
    assert scores == pytest.approx(by_hand(backbone, reward.head, layer, STEPS), abs=1e-5)


def test_mlp_head_matches_its_formula(backbone):
    model, _ = backbone
    head = random_head(model.config.hidden_size, "mlp", seed=4)
    x = np.random.default_rng(5).normal(size=(3, model.config.hidden_size)).astype(np.float32)
    z = (x - head.mean) / head.scale
    expected = 1 / (1 + np.exp(-(np.maximum(z @ head.weights[0].T + head.biases[0], 0) @ head.weights[1] + head.biases[1])))
    assert head.probabilities(x) == pytest.approx(expected, abs=1e-5)


def test_incremental_scoring_reads_each_new_step_once(backbone):
    reward = make_reward(backbone)
    full_tokens, _ = reward.layout(PROMPT, STEPS)
    for t in range(1, len(STEPS) + 1):
        asyncio.run(score_trajectories(reward, [PROMPT], [STEPS[:t]], "model"))
    # Every token of the final sequence read exactly once over the three calls.
    assert reward.usage.scored_tokens == len(full_tokens)
    fresh = make_reward(backbone, head=reward.head)
    [last] = asyncio.run(score_trajectories(fresh, [PROMPT], [STEPS], "model"))
    [again] = asyncio.run(score_trajectories(reward, [PROMPT], [STEPS], "model"))
    assert again == pytest.approx(last, abs=1e-5)


def test_joined_and_separate_steps_get_the_same_tokens_and_scores(backbone):
    reward = make_reward(backbone, cache_tokens=0)
    joined = ["\n\n".join(s.strip() for s in STEPS)]
    assert reward.layout(PROMPT, joined)[0] == reward.layout(PROMPT, STEPS)[0]
    [separate] = asyncio.run(reward.score([PROMPT], [STEPS]))
    [[together]] = asyncio.run(reward.score([PROMPT], [joined]))
    assert together == pytest.approx(separate[-1], abs=1e-5)


def test_read_features_are_the_features_scoring_uses(backbone):
    reward = make_reward(backbone, layer=-1)
    trajectories = [STEPS, STEPS[:2], ["Just guess.\n\n", "\\boxed{5}"]]
    features = reward.read_features([PROMPT] * 3, trajectories, layers=(1, -1))
    assert [f.shape for f in features] == [(2, 3, 64), (2, 2, 64), (2, 2, 64)]
    scores = asyncio.run(reward.score([PROMPT] * 3, trajectories))
    for f, s in zip(features, scores):
        assert reward.head.probabilities(f[1]) == pytest.approx(s, abs=1e-5)


def test_batched_scores_do_not_depend_on_the_batch(backbone):
    reward = make_reward(backbone)
    others = [["Another try.\n\n", "It is 8.\n\n", "So \\boxed{8}, I think, after a long way round."], STEPS[:1]]
    together = asyncio.run(reward.score([PROMPT] * 3, [STEPS, *others]))
    alone = asyncio.run(make_reward(backbone, head=reward.head).score([PROMPT], [STEPS]))
    assert together[0] == pytest.approx(alone[0], abs=1e-5)


@pytest.mark.parametrize("architecture", ["qwen2", "llama"])
@pytest.mark.parametrize(("layer", "blocks_kept"), [(1, 1), (2, 2), (-3, 2), (4, 4), (-1, 4), (0, 4)])
def test_a_backbone_cut_above_the_read_layer_gives_the_same_scores(architecture, layer, blocks_kept):
    from piscale.rewards.value import keep_blocks_below

    whole = tiny_causal_lm(architecture, seed=7, layers=4)
    model, tokenizer = whole
    head = random_head(model.config.hidden_size, seed=2)
    cut = copy.deepcopy(model)
    index = keep_blocks_below(cut, layer)
    assert index == layer % 5 and len(cut.get_decoder().layers) == blocks_kept == cut.config.num_hidden_layers
    reward = StepValueReward(cut, tokenizer, head, layer=index, system_prompt=SYSTEM)
    others = [["Another try.\n\n", "It is 8."], STEPS[:1]]
    # Scored step by step, so that the cut model's shorter caches are read back.
    for t in range(1, len(STEPS) + 1):
        got = asyncio.run(score_trajectories(reward, [PROMPT] * 3, [STEPS[:t], *others], "model"))
    expected = asyncio.run(make_reward(whole, head=head, layer=layer).score([PROMPT] * 3, [STEPS, *others]))
    assert got == pytest.approx([scores[-1] for scores in expected], abs=1e-5)
    assert got[0] == pytest.approx(by_hand(whole, head, layer, STEPS)[-1], abs=1e-5)


def test_head_file_round_trip(tmp_path, backbone):
    model, _ = backbone
    for kind in ("logistic", "mlp"):
        head = random_head(model.config.hidden_size, kind)
        path = tmp_path / f"{kind}.safetensors"
        digest = HeadFile(head, {"backbone": "tiny", "layer": -1, "layout": {"kind": "parts"}}).save(path)
        assert digest == file_sha256(path)
        read = HeadFile.read(path)
        assert read.head.kind == kind and read.metadata["backbone"] == "tiny"
        x = np.random.default_rng(1).normal(size=(4, model.config.hidden_size)).astype(np.float32)
        assert read.head.probabilities(x) == pytest.approx(head.probabilities(x), abs=1e-6)


def test_bad_heads_and_files_say_what_is_wrong(tmp_path, backbone):
    model, _ = backbone
    size = model.config.hidden_size
    with pytest.raises(HeadFileError, match="reads 3 features"):
        ValueHead(np.zeros(size), np.ones(size), [np.zeros(3)], [np.float32(0)])
    with pytest.raises(HeadFileError, match="scales must be positive"):
        ValueHead(np.zeros(size), np.zeros(size), [np.zeros(size)], [np.float32(0)])
    with pytest.raises(ValueError, match="hidden size is 64"):
        make_reward(backbone, head=random_head(10))
    with pytest.raises(ValueError, match="layer 9"):
        make_reward(backbone, layer=9)
    with pytest.raises(HeadFileError, match="no value head file"):
        HeadFile.read(tmp_path / "missing.safetensors")
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a safetensors file")
    with pytest.raises(HeadFileError, match="not a safetensors file"):
        HeadFile.read(junk)
    from safetensors.numpy import save_file

    plain = tmp_path / "plain.safetensors"
    save_file({"x": np.zeros(2, dtype=np.float32)}, str(plain))
    with pytest.raises(HeadFileError, match="not a piscale value head"):
        HeadFile.read(plain)
    with pytest.raises(HeadFileError, match="needs 'layout'"):
        HeadFile(random_head(size), {"backbone": "tiny", "layer": -1}).save(tmp_path / "x.safetensors")


def test_shipped_head_matches_its_recorded_hash_and_loads():
    manifest = shipped_heads()
    assert "default" in manifest
    for name, entry in manifest.items():
        path = shipped_head_path(name)
        assert file_sha256(path) == entry["sha256"]
        head_file = HeadFile.read(path)
        assert head_file.metadata["backbone"] == entry["backbone"]
        for key in ("command", "data_sha256", "seed"):
            assert entry["training"][key] not in (None, ""), key
        assert head_file.head.features == head_file.metadata["features"]
        json.dumps(head_file.metadata)  # plain JSON


def test_spec_value_path_loads_the_head_and_its_backbone(tmp_path, backbone, monkeypatch):
    from piscale import models
    from piscale.rewards.spec import from_spec

    model, tokenizer = backbone
    requested = []

    def load(spec, **options):
        requested.append((spec, options.get("dtype")))
        return copy.deepcopy(model), tokenizer  # a fresh model, as a real load gives

    monkeypatch.setattr(models, "load_transformers", load)
    head = random_head(model.config.hidden_size)
    path = tmp_path / "head.safetensors"
    layout = {"kind": "parts", "marker": "\n\n", "system_prompt": SYSTEM, "prompt_format": None}
    HeadFile(head, {"backbone": "some-backbone", "dtype": "float32", "layer": 1, "layout": layout}).save(path)
    reward = from_spec(f"value:{path}")
    assert isinstance(reward, StepValueReward) and reward.layer == 1
    assert requested == [("some-backbone", "float32")]
    [scores] = asyncio.run(reward.score([PROMPT], [STEPS]))
    assert scores == pytest.approx(by_hand(backbone, head, 1, STEPS), abs=1e-5)
    with pytest.raises(HeadFileError, match="no value head file"):
        from_spec(f"value:{tmp_path / 'missing.safetensors'}")


@pytest.mark.parametrize("native, asked, served", [(False, None, "float32"), (True, None, "bfloat16"),
                                                   (False, "bfloat16", "bfloat16")])
def test_a_bfloat16_head_is_served_in_float32_where_bfloat16_is_emulated(
    tmp_path, backbone, monkeypatch, caplog, native, asked, served
):
    from piscale import models
    from piscale.rewards.value import load_value_reward

    model, tokenizer = backbone
    requested = []
    monkeypatch.setattr(models, "load_transformers", lambda spec, **o: (requested.append(o["dtype"]), (copy.deepcopy(model), tokenizer))[1])
    monkeypatch.setattr(models.loading, "bfloat16_is_native", lambda device: native)
    path = tmp_path / "head.safetensors"
    layout = {"kind": "parts", "marker": "\n\n", "system_prompt": SYSTEM, "prompt_format": None}
    HeadFile(random_head(model.config.hidden_size), {"backbone": "b", "dtype": "bfloat16", "layer": 1,
                                                     "layout": layout}).save(path)
    with caplog.at_level("WARNING", logger="piscale.rewards.value"):
        load_value_reward(path, dtype=asked)
    assert requested == [served]
    assert ("serving it in float32" in caplog.text) == (served == "float32")


def test_a_product_spec_multiplies_the_value_by_the_arithmetic_check(tmp_path, backbone, monkeypatch):
    from piscale import models
    from piscale.eval.identity import reward_identity
    from piscale.rewards import ArithmeticReward, WeightedSum
    from piscale.rewards.spec import from_spec, product_terms

    model, tokenizer = backbone
    monkeypatch.setattr(models, "load_transformers", lambda spec, **options: (copy.deepcopy(model), tokenizer))
    head = random_head(model.config.hidden_size, seed=5)
    path = tmp_path / "head.safetensors"
    layout = {"kind": "parts", "marker": "\n\n", "system_prompt": SYSTEM, "prompt_format": None}
    HeadFile(head, {"backbone": "some-backbone", "dtype": "float32", "layer": 1, "layout": layout}).save(path)

    reward = from_spec(f"value:{path} * arith")
    assert isinstance(reward, WeightedSum) and reward.scale == "log"
    wrong = [*STEPS[:1], "He buys 4, so 3 + 4 = 8.\n\n", "The answer is \\boxed{8}."]
    values = [by_hand(backbone, head, 1, steps) for steps in (STEPS, wrong)]
    checks = asyncio.run(ArithmeticReward().score([PROMPT] * 2, [STEPS, wrong]))
    assert checks[0][1] == 1.0 and checks[1][1] == 0.0  # the checker sees the wrong sum
    scores = asyncio.run(reward.score([PROMPT] * 2, [STEPS, wrong]))
    for got, value, check in zip(scores, values, checks):
        expected = [np.log(v) + (np.log(c) if c > 0 else -np.inf) for v, c in zip(value, check)]
        assert got == pytest.approx(expected, abs=1e-5)
    assert scores[1][1] == -np.inf  # a rejected step keeps its zero likelihood

    # A '*' inside one reward's argument does not split it.
    assert product_terms("verify:2*3") == ["verify:2*3"]
    assert product_terms("value * arith") == ["value", "arith"]
    with pytest.raises(ValueError, match="unknown reward kind"):
        from_spec("value*")
    # The product's configuration holds the head file's hash.
    identity = reward_identity(f"value:{path}*arith", "policy")
    assert identity["models"][0]["identity"] == f"sha256:{file_sha256(path)}"


def test_the_server_loads_a_value_head_once_and_treats_products_by_their_terms(tmp_path, backbone, monkeypatch):
    from piscale import models
    from piscale.lm.toy import ToyLM
    from piscale.serve.config import ServerConfig
    from piscale.serve.rewards import RewardPool

    model, tokenizer = backbone
    loads = []
    monkeypatch.setattr(models, "load_transformers", lambda spec, **options: loads.append(spec) or (copy.deepcopy(model), tokenizer))
    path = tmp_path / "head.safetensors"
    layout = {"kind": "parts", "marker": "\n\n", "system_prompt": SYSTEM, "prompt_format": None}
    HeadFile(random_head(model.config.hidden_size), {"backbone": "b", "dtype": "float32", "layer": 1,
                                                     "layout": layout}).save(path)
    pool = RewardPool(ServerConfig(model="toy", rewards=(f"value:{path}*arith",)), ToyLM())
    first, second = (pool.build(pool.check(f"value:{path}*arith")) for _ in range(2))
    assert first.reward is second.reward and loads == ["b"]  # one backbone for every request
    assert pool.check("arith*verify:7") == "arith*verify:7"  # cheap terms: offered without --allow-reward
    with pytest.raises(Exception, match="not enabled"):
        pool.check(f"value:{path}*judge")
