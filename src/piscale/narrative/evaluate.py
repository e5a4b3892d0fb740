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

import itertools
import json
import re
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from piscale.narrative.resources import NarrativeError
from piscale.narrative.schema import StoryResult

__all__ = ["OrderScore", "Score", "evaluate_gold", "order_accuracy_interval", "read_order_gold", "score_order", "score_story"]

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


# ---- temporal order -----------------------------------------------------------------
#
# An order gold file (``tests/data/narrative_order_heldout.json`` is one) holds
# passages, each with its text and a ``timeline``: steps in story-time order,
# each a list of events named by the verb as written (case-insensitive, a whole
# word; ``word@k`` is its k-th occurrence). Every two events in different steps
# form a gold pair. A method gets a pair right when it puts the earlier event's
# clause before the later one's, half right when it puts them in one clause.


@dataclass
class OrderScore:
    story: str
    pairs: int  # gold pairs
    correct: float  # pairs in the gold order (a tie counts one half)
    inverted: int  # gold pairs that the text tells in the other order
    inverted_correct: float

    @property
    def accuracy(self) -> float:
        return self.correct / self.pairs if self.pairs else 0.0


def read_order_gold(path: Path) -> list[dict[str, Any]]:
    """The passages of an order gold file, each with ``events``: (step, character offset) per named event."""
    try:
        gold = json.loads(path.read_text(encoding="utf-8"))
        passages = gold["stories"]
    except (OSError, json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as error:
        raise NarrativeError(f"{path} is not a readable order gold file ({error})") from None
    for passage in passages:
        events = []
        for step, names in enumerate(passage["timeline"]):
            for name in names:
                word, _, k = name.partition("@")
                found = [m.start() for m in re.finditer(rf"\b{re.escape(word)}\b", passage["text"], re.IGNORECASE)]
                if not found or (not k and len(found) > 1) or (k and not 1 <= int(k) <= len(found)):
                    raise NarrativeError(
                        f"{path}: passage {passage['id']!r}: event {name!r} does not name exactly one word "
                        f"({len(found)} occurrences; write word@k for the k-th)"
                    )
                events.append((step, found[int(k) - 1 if k else 0]))
        passage["events"] = events
    return passages


def score_order(passage: dict[str, Any], doc: Any, time: list[int]) -> OrderScore:
    """Pairwise agreement of ``time`` (per token of ``doc``) with the passage's gold timeline."""
    token_at = {}
    for token in doc:
        for offset in range(token.idx, token.idx + len(token.text)):
            token_at[offset] = token.i
    events = [(step, token_at[offset]) for step, offset in passage["events"]]
    pairs = inverted = 0
    correct = inverted_correct = 0.0
    for (step_a, a), (step_b, b) in itertools.combinations(events, 2):
        if step_a == step_b:
            continue
        if step_a > step_b:
            (step_a, a), (step_b, b) = (step_b, b), (step_a, a)
        right = 1.0 if time[a] < time[b] else 0.5 if time[a] == time[b] else 0.0
        pairs += 1
        correct += right
        if a > b:  # told in the other order
            inverted += 1
            inverted_correct += right
    return OrderScore(passage["id"], pairs, correct, inverted, inverted_correct)


def order_accuracy_interval(
    scores: dict[str, list[OrderScore]], *, bootstrap: int = 10000, confidence: float = 0.95, seed: int = 0
) -> dict[str, tuple[float, float, float]]:
    """Per method, and per difference of a method from the first one, the
    pooled pairwise accuracy and its percentile bootstrap interval over
    passages (a passage's pairs are drawn together)."""
    names = list(scores)
    correct = np.array([[s.correct for s in scores[m]] for m in names])
    pairs = np.array([s.pairs for s in scores[names[0]]], dtype=float)
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, len(pairs), size=(bootstrap, len(pairs)))
    sampled = correct[:, draws].sum(axis=2) / np.maximum(pairs[draws].sum(axis=1), 1)
    point = correct.sum(axis=1) / max(pairs.sum(), 1)
    tail = (1 - confidence) / 2 * 100
    out = {}
    for k, name in enumerate(names):
        low, high = np.percentile(sampled[k], [tail, 100 - tail])
        out[name] = (float(point[k]), float(low), float(high))
        if k:
            low, high = np.percentile(sampled[k] - sampled[0], [tail, 100 - tail])
            out[f"{name} - {names[0]}"] = (float(point[k] - point[0]), float(low), float(high))
    return out
