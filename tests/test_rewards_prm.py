"""PRMs on tiny random-weight models: scores equal a hand computation from the
model's logits on the full text, and incremental scoring equals full
re-scoring while reading fewer tokens."""

from __future__ import annotations

import warnings

import pytest
import torch

from piscale.rewards.prm import QWEN_PRM_SYSTEM, ClassificationPRM, TagPRM
from test_rewards_support import causal_lm, char_tokenizer, token_classifier

PROMPT = "Tom has 3 apples and buys 4 more. How many?"
STEPS = ["Tom starts with 3 apples.\n\n", "He buys 4, so 3 + 4 = 7.\n\n", "The answer is \\boxed{7}."]


@pytest.fixture(scope="module")
def tokenizer():
    return char_tokenizer()


@pytest.fixture(scope="module")
def classifier(tokenizer):
    return token_classifier(tokenizer, seed=1)


@pytest.fixture(scope="module")
def tagger(tokenizer):
    return causal_lm(tokenizer, seed=2)


def qwen_prm_text(tokenizer, prompt, steps):
    """The Qwen2.5-Math-PRM input, written the way its model card does."""
    messages = [
        {"role": "system", "content": QWEN_PRM_SYSTEM},
        {"role": "user", "content": prompt},
        {"role": "assistant", "content": "<extra_0>".join(s.strip() for s in steps) + "<extra_0>"},
    ]
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=False)


def hand_classification_scores(model, tokenizer, prompt, steps):
    ids = tokenizer(qwen_prm_text(tokenizer, prompt, steps), add_special_tokens=False, return_tensors="pt")
    with torch.no_grad():
        logits = model(input_ids=ids.input_ids).logits[0]
    separator = tokenizer.convert_tokens_to_ids("<extra_0>")
    at_separators = logits[ids.input_ids[0] == separator]
    return torch.softmax(at_separators.double(), dim=-1)[:, 1].tolist()


def hand_tag_scores(model, tokenizer, prompt, steps):
    text = f"{prompt} " + "\n".join(s.strip() + " ки" for s in steps)
    ids = tokenizer(text, add_special_tokens=False, return_tensors="pt").input_ids
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0]
    tag = tokenizer.convert_tokens_to_ids("ки")
    plus, minus = tokenizer.convert_tokens_to_ids("+"), tokenizer.convert_tokens_to_ids("-")
    at_tags = logits[ids[0] == tag][:, [plus, minus]].double()
    return torch.softmax(at_tags, dim=-1)[:, 0].tolist()


async def test_classification_prm_matches_logits_at_separators(classifier, tokenizer):
    prm = ClassificationPRM(classifier, tokenizer, cache_tokens=0)
    scores = await prm.score([PROMPT], [STEPS])
    expected = hand_classification_scores(classifier, tokenizer, PROMPT, STEPS)
    assert len(expected) == 3
    assert scores[0] == pytest.approx(expected, abs=1e-5)
    # The random head is far from 1/2, so the comparison is not vacuous.
    assert max(abs(s - 0.5) for s in expected) > 0.05


async def test_classification_prm_batch_of_different_lengths(classifier, tokenizer):
    prm = ClassificationPRM(classifier, tokenizer, cache_tokens=0)
    prompts = [PROMPT, "What is 2 + 2?", PROMPT]
    trajectories = [STEPS, ["2 + 2 = 4.", "So \\boxed{4}."], STEPS[:1]]
    scores = await prm.score(prompts, trajectories)
    for prompt, steps, got in zip(prompts, trajectories, scores):
        assert got == pytest.approx(hand_classification_scores(classifier, tokenizer, prompt, steps), abs=1e-5)


async def test_tag_prm_matches_good_over_good_plus_bad(tagger, tokenizer):
    prm = TagPRM(tagger, tokenizer, cache_tokens=0)
    scores = await prm.score([PROMPT], [STEPS])
    expected = hand_tag_scores(tagger, tokenizer, PROMPT, STEPS)
    assert len(expected) == 3
    assert scores[0] == pytest.approx(expected, abs=1e-5)


@pytest.mark.parametrize("kind", ["classification", "tag"])
async def test_incremental_equals_full_and_reads_fewer_tokens(kind, classifier, tagger, tokenizer):
    def build(cache_tokens):
        if kind == "classification":
            return ClassificationPRM(classifier, tokenizer, cache_tokens=cache_tokens)
        return TagPRM(tagger, tokenizer, cache_tokens=cache_tokens)

    full, incremental = build(0), build(100_000)
    other_prompt = "Compute 6 * 7."
    other = ["6 * 7 = 42.", "So the answer is \\boxed{42}."]
    for t in range(1, len(STEPS) + 1):
        # Two trajectories of different prompts grow together, in one batch.
        batch = ([PROMPT, other_prompt], [STEPS[:t], other[: min(t, 2)]])
        expected = await full.score(*batch)
        got = await incremental.score(*batch)
        for row_expected, row_got in zip(expected, got):
            assert row_got == pytest.approx(row_expected, abs=1e-5)
    # Incremental reads each token once: exactly the tokens of the longest
    # version of each trajectory.
    longest = len(incremental.layout(PROMPT, STEPS)[0]) + len(incremental.layout(other_prompt, other)[0])
    assert incremental.usage.scored_tokens == longest
    assert full.usage.scored_tokens > 2 * longest
    assert incremental.tokens_reused > 0


async def test_resampled_copies_and_repeats_read_nothing_new(classifier, tokenizer):
    prm = ClassificationPRM(classifier, tokenizer)
    await prm.score([PROMPT], [STEPS[:2]])
    read = prm.usage.scored_tokens
    # Resampling copied the particle; scoring the copies again reads nothing.
    again = await prm.score([PROMPT, PROMPT], [STEPS[:2], STEPS[:2]])
    assert prm.usage.scored_tokens == read
    assert again[0] == again[1]
    # Two children of one parent each read only their own new step.
    children = [STEPS[:2] + ["So 7."], STEPS[:2] + ["It is 8."]]
    scores = await prm.score([PROMPT, PROMPT], children)
    new_tokens = sum(len(tokenizer(s, add_special_tokens=False).input_ids) + 1 for s in ("So 7.", "It is 8."))
    assert prm.usage.scored_tokens - read == new_tokens
    for steps, got in zip(children, scores):
        assert got == pytest.approx(hand_classification_scores(classifier, tokenizer, PROMPT, steps), abs=1e-5)


async def test_model_aggregation_reuses_the_common_token_prefix(classifier, tokenizer):
    """'model' aggregation joins the steps into one: the old separator is gone,
    but the tokens before it are a common prefix and are not read again."""
    prm = ClassificationPRM(classifier, tokenizer)
    prm.scan_recent = 0  # found by layout of the text before the last blank line, not by a scan
    first = "Tom starts with 3 apples."
    await prm.score([PROMPT, PROMPT], [[first], ["Tom has apples."]])
    before = prm.usage.scored_tokens
    grown = first + "\n\nHe buys 4, so 3 + 4 = 7."
    scores = await prm.score([PROMPT], [[grown]])
    assert prm.usage.scored_tokens - before == len(tokenizer("\n\nHe buys 4, so 3 + 4 = 7.").input_ids) + 1
    assert scores[0] == pytest.approx(hand_classification_scores(classifier, tokenizer, PROMPT, [grown]), abs=1e-5)


async def test_a_scan_finds_a_shared_prefix_without_a_step_boundary(classifier, tokenizer):
    prm = ClassificationPRM(classifier, tokenizer)
    await prm.score([PROMPT], [["Tom starts"]])
    before = prm.usage.scored_tokens
    scores = await prm.score([PROMPT], [["Tom starts with 3 apples."]])
    assert prm.usage.scored_tokens - before == len(" with 3 apples.") + 1
    assert scores[0] == pytest.approx(
        hand_classification_scores(classifier, tokenizer, PROMPT, ["Tom starts with 3 apples."]), abs=1e-5
    )
    prm.scan_recent = 0
    prm.clear_cache()
    await prm.score([PROMPT], [["Tom starts"]])
    before = prm.usage.scored_tokens
    await prm.score([PROMPT], [["Tom starts with 3 apples."]])
    assert prm.usage.scored_tokens - before == len(prm.layout(PROMPT, ["Tom starts with 3 apples."])[0])


async def test_cache_budget_is_respected(classifier, tokenizer):
    prm = ClassificationPRM(classifier, tokenizer, cache_tokens=300)
    for t in range(1, 4):
        await prm.score([PROMPT], [STEPS[:t]])
        assert prm.cached_tokens <= 300


class _WithoutCache(torch.nn.Module):
    """A classifier whose forward takes no key/value cache (as some custom
    checkpoints' code does)."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner
        self.config = inner.config

    def forward(self, input_ids, attention_mask=None, position_ids=None):
        return self.inner(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids)


class _IgnoresCache(_WithoutCache):
    """Takes a cache argument but never fills it."""

    def forward(self, input_ids, attention_mask=None, position_ids=None, cache=None, use_cache=None):
        # Read the whole row as if nothing were cached: the cache stays empty.
        return self.inner(input_ids=input_ids, attention_mask=None, position_ids=None)


async def test_a_model_without_a_cache_is_scored_whole_and_says_so(classifier, tokenizer):
    with pytest.warns(RuntimeWarning, match="takes no key/value cache"):
        prm = ClassificationPRM(_WithoutCache(classifier), tokenizer)
    assert not prm.caching
    first = prm.layout(PROMPT, STEPS[:1])[0]
    both = prm.layout(PROMPT, STEPS[:2])[0]
    await prm.score([PROMPT], [STEPS[:1]])
    scores = await prm.score([PROMPT], [STEPS[:2]])
    # Both trajectories were read whole: the counters show the re-read.
    assert prm.usage.scored_tokens == len(first) + len(both)
    assert prm.tokens_reused == 0
    assert scores[0] == pytest.approx(hand_classification_scores(classifier, tokenizer, PROMPT, STEPS[:2]), abs=1e-5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert not ClassificationPRM(_WithoutCache(classifier), tokenizer, cache_tokens=0).caching


async def test_a_model_that_ignores_its_cache_is_an_error(classifier, tokenizer):
    prm = ClassificationPRM(_IgnoresCache(classifier), tokenizer)
    assert prm.caching
    with pytest.raises(RuntimeError, match="did not use the cache it was given"):
        await prm.score([PROMPT], [STEPS[:1]])


def test_prm_input_errors(classifier, tokenizer):
    with pytest.raises(ValueError, match="must be one token"):
        ClassificationPRM(classifier, tokenizer, separator="<sep>")
    with pytest.raises(ValueError, match="positive_label"):
        ClassificationPRM(classifier, tokenizer, positive_label=2)
    with pytest.raises(ValueError, match="encodes to 2 tokens"):
        TagPRM(classifier, tokenizer, good_token="++")


async def test_load_prm_from_a_folder(classifier, tagger, tokenizer, tmp_path):
    from piscale.rewards import from_spec
    from piscale.rewards.prm import load_prm

    classifier.save_pretrained(tmp_path / "cls")
    tokenizer.save_pretrained(tmp_path / "cls")
    tagger.save_pretrained(tmp_path / "tag")
    tokenizer.save_pretrained(tmp_path / "tag")
    loaded = from_spec(f"prm:{tmp_path / 'cls'}")
    assert isinstance(loaded, ClassificationPRM)
    # The tokenizer comes back as the config's tokenizer class, which may
    # split text differently from the one saved; the weights are the same.
    expected = hand_classification_scores(classifier, loaded.tokenizer, PROMPT, STEPS)
    assert (await loaded.score([PROMPT], [STEPS]))[0] == pytest.approx(expected, abs=1e-5)
    tag = load_prm(str(tmp_path / "tag"))
    assert isinstance(tag, TagPRM)
    assert (await tag.score([PROMPT], [STEPS]))[0] == pytest.approx(
        hand_tag_scores(tagger, tag.tokenizer, PROMPT, STEPS), abs=1e-5
    )


def test_load_prm_refuses_custom_code_unless_trusted(classifier, tokenizer, tmp_path):
    import json

    from piscale.rewards.prm import load_prm

    classifier.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["architectures"] = ["Qwen2ForProcessRewardModel"]
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="trust_remote_code=True"):
        load_prm(str(tmp_path))
