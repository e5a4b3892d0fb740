"""Extraction quality against hand annotation.

The gold file (``tests/data/narrative_gold.json`` is one) holds stories,
each with its text, its characters (``name``, ``gender`` and ``aliases``:
the lower-case words the text names it with, the first being the key that
events use) and its events (``verb`` lemma, ``character`` key, ``role``).

A predicted character *matches* a gold one when one of its names (its name
or aliases, lower case, with a leading title such as "mr." dropped) is among
the gold character's aliases. Character precision is the share of predicted
characters that match a gold one; recall the share of gold characters
matched by at least one predicted character (a gold character split in two,
"widow" and "mother", counts once for recall and twice for precision).
Gender accuracy is over matched predicted characters. An event is correct
when (verb, gold character, role) is in the gold multiset; a phrasal verb
is compared by its first word ("put_on" as "put").
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from piscale.narrative.resources import NarrativeError
from piscale.narrative.schema import StoryResult

__all__ = ["Score", "evaluate_gold", "score_story"]

_TITLES = ("mr. ", "mrs. ", "mr ", "mrs ", "miss ", "the ")


@dataclass
class Score:
    story: str
    gold_characters: int
    predicted_characters: int
    matched_predicted: int
    matched_gold: int
    gender_correct: int
    gold_events: int
    predicted_events: int
    correct_events: int

    @staticmethod
    def ratio(part: int, whole: int) -> float:
        return part / whole if whole else 0.0

    def summary(self) -> dict[str, float]:
        char_p = self.ratio(self.matched_predicted, self.predicted_characters)
        char_r = self.ratio(self.matched_gold, self.gold_characters)
        event_p = self.ratio(self.correct_events, self.predicted_events)
        event_r = self.ratio(self.correct_events, self.gold_events)
        return {
            "character_precision": char_p,
            "character_recall": char_r,
            "gender_accuracy": self.ratio(self.gender_correct, self.matched_predicted),
            "event_precision": event_p,
            "event_recall": event_r,
            "event_f1": 2 * event_p * event_r / (event_p + event_r) if event_p + event_r else 0.0,
        }

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), **self.summary()}


def _names(character: Any) -> set[str]:
    names = set()
    for name in [character.name, *character.aliases]:
        name = name.lower().strip()
        for title in _TITLES:
            name = name.removeprefix(title)
        names.add(name)
        names.add(name.replace("-", " "))
    return names


def score_story(result: StoryResult, gold: dict[str, Any]) -> Score:
    """Score one extracted story against its gold annotation."""
    gold_characters = gold["characters"]
    key_of: dict[int, str] = {}
    gender_correct = 0
    for character in result.characters:
        names = _names(character)
        for entry in gold_characters:
            if names & {a.lower() for a in entry["aliases"]}:
                key_of[character.id] = entry["aliases"][0].lower()
                gender_correct += int(character.gender == entry["gender"])
                break
    matched_gold = len(set(key_of.values()))
    predicted = Counter(
        (e.verb.split("_")[0], key_of.get(e.character, f"?{e.character}"), e.role) for e in result.events
    )
    expected = Counter((e["verb"], e["character"].lower(), e["role"]) for e in gold["events"])
    return Score(
        story=result.id,
        gold_characters=len(gold_characters),
        predicted_characters=len(result.characters),
        matched_predicted=len(key_of),
        matched_gold=matched_gold,
        gender_correct=gender_correct,
        gold_events=sum(expected.values()),
        predicted_events=sum(predicted.values()),
        correct_events=sum((predicted & expected).values()),
    )


def evaluate_gold(path: Path, extract: Callable[[str, str], StoryResult]) -> tuple[list[Score], Score]:
    """Per-story scores and their sum (micro-averaged) for the gold file at
    ``path``; ``extract(text, story_id)`` runs the extraction."""
    try:
        gold = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as error:
        raise NarrativeError(f"{path} is not a readable gold file ({error})") from None
    scores = [score_story(extract(story["text"], story["id"]), story) for story in gold["stories"]]
    fields = [f for f in Score.__dataclass_fields__ if f != "story"]
    total = Score("all", **{f: sum(getattr(s, f) for s in scores) for f in fields})
    return scores, total
