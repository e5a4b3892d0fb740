"""The extraction pipeline: characters, coreference, gender, events,
salience and order for one story.

Over a spaCy parse (``resources.load_spacy``), each step in its own module:

1. **The parse, indexed** (``document``): the sentence of every token, the
   quotes and the verbs of speaking that report them.
2. **Mentions** (``mentions``): names, nominal mentions (common nouns that
   WordNet files as persons or animals: "the king", "the fox", "the youngest
   son") and third-person pronouns.
3. **Coreference and gender evidence** (``coref``, rule-based, a baseline):
   one character per name or noun key, each pronoun to the best compatible
   character in its sentence or the three before, relative pronouns to
   their noun, "I" in a quote to its speaker; a character's gender from
   gendered nouns, titles and unambiguously resolved pronouns
   (``GENDER_SHARE`` of the evidence, else ``group-or-unknown``).
4. **Characters** (here): those with at least ``min_mentions`` mentions,
   numbered by first mention, named by their most frequent name or noun
   phrase; **importance** by mention count relative to the most mentioned
   character: primary from ``PRIMARY_SHARE`` of it, secondary from
   ``SECONDARY_SHARE``, else tertiary.
5. **Events** (``events``): verbs with a character as subject or object,
   their WordNet supersense, their **temporal rank** (by text order,
   ``temporal="text"``, or by tense, aspect and temporal connectives,
   ``"rules"``, the default; see ``temporal``) and their tf-idf
   **salience**.

What it gets wrong is listed in docs/narrative.md; the main limits are a
one-referent-per-noun rule ("a man" ... "the man" and two different men are
one character), no cataphora, plural pronouns that reach only plural
characters, no "it" (animals referred to as "it" lose those mentions), and
spaCy's own lemma and parse errors.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from functools import lru_cache
from typing import Any

from piscale.narrative import temporal as temporal_order
from piscale.narrative.coref import GENDER_SHARE, Entity, decide_gender, resolve
from piscale.narrative.document import Document
from piscale.narrative.events import find_events
from piscale.narrative.mentions import RawMention, find_mentions
from piscale.narrative.resources import NarrativeError, load_spacy, wordnet
from piscale.narrative.schema import Character, Mention, Sentence, StoryResult

__all__ = ["GENDER_SHARE", "SECONDARY_SHARE", "TEMPORAL", "Extractor", "extract"]

PRIMARY_SHARE = 0.5
SECONDARY_SHARE = 0.15
MIN_MENTIONS = 2  # characters mentioned fewer times are dropped
TEMPORAL = "rules"  # the default temporal order (``temporal.METHODS``); "text" is the baseline

_ARTICLES = {"the", "a", "an"}


class Extractor:
    """Runs the pipeline; one instance can process many stories."""

    def __init__(self, model: str | None = None, *, min_mentions: int = MIN_MENTIONS, temporal: str = TEMPORAL) -> None:
        if temporal not in temporal_order.METHODS:
            raise NarrativeError(
                f"unknown temporal method {temporal!r}; choose one of {', '.join(temporal_order.METHODS)}"
            )
        self.nlp = load_spacy(model)
        wordnet()  # fetched and loaded up front, not inside the first story
        self.min_mentions = min_mentions
        self.temporal = temporal

    def __call__(self, text: str, story_id: str = "story", origin: str = "") -> StoryResult:
        return self.process(text, story_id, origin)

    def process(self, text: str, story_id: str = "story", origin: str = "") -> StoryResult:
        if not isinstance(text, str):
            raise NarrativeError(f"story {story_id!r}: the text must be a string, got {type(text).__name__}")
        if len(text) > self.nlp.max_length:
            self.nlp.max_length = len(text) + 1
        doc = self.nlp(text)
        return _story_result(Document(doc), story_id, origin, self.min_mentions, self.temporal)

    def story_time(self, text: str, method: str | None = None) -> tuple[Any, list[int]]:
        """The parse of ``text`` and, per token, the position in story time of
        its clause by ``method`` (default: this extractor's; see ``temporal``)."""
        if len(text) > self.nlp.max_length:
            self.nlp.max_length = len(text) + 1
        doc = self.nlp(text)
        return doc, _story_time(Document(doc), method or self.temporal)

    def pipe(self, stories: Iterable[tuple[str, str, str]], batch_size: int = 8) -> Iterable[StoryResult]:
        """(id, origin, text) triples -> results, parsed in spaCy batches."""
        items = list(stories)
        for item in items:
            if len(item[2]) > self.nlp.max_length:
                self.nlp.max_length = len(item[2]) + 1
        docs = self.nlp.pipe((text for _, _, text in items), batch_size=batch_size)
        for (story_id, origin, _), doc in zip(items, docs):
            yield _story_result(Document(doc), story_id, origin, self.min_mentions, self.temporal)


def extract(
    text: str, story_id: str = "story", origin: str = "", *, model: str | None = None, temporal: str = TEMPORAL
) -> StoryResult:
    """Extract one story's characters and events (see the module docstring)."""
    return _extractor(model, temporal).process(text, story_id, origin)


@lru_cache(maxsize=2)
def _extractor(model: str | None, temporal: str) -> Extractor:
    return Extractor(model, temporal=temporal)


def _story_time(document: Document, method: str) -> list[int]:
    """Per token, the position of its clause in story time."""
    return temporal_order.story_time(document.doc, method, document.quote_region, document.reporting_verbs())


def _story_result(document: Document, story_id: str, origin: str, min_mentions: int, temporal: str) -> StoryResult:
    doc = document.doc
    sentences = [Sentence(i, s.start_char, s.end_char, s.text) for i, s in enumerate(document.sentences)]
    if not len(doc):
        return StoryResult(story_id, origin, doc.text, sentences, notes=["empty text"])
    raw_mentions, entities = resolve(document, find_mentions(document))

    # Keep characters with enough mentions; renumber them by first mention.
    counts = Counter(m.entity for m in raw_mentions if m.entity is not None)
    kept = [e for e in entities if counts[e.id] >= min_mentions]
    kept.sort(key=lambda e: min(e.mentions))
    new_id = {e.id: i for i, e in enumerate(kept)}
    top = max((counts[e.id] for e in kept), default=0)
    characters = [_character(doc, entity, raw_mentions, new_id[entity.id], counts[entity.id], top) for entity in kept]

    mentions: list[Mention] = []
    mention_at: dict[int, Mention] = {}  # head token -> mention
    for m in raw_mentions:
        character = new_id.get(m.entity) if m.entity is not None else None
        if m.entity is not None and character is None:
            continue  # a dropped character's mention
        span = doc[m.start : m.end]
        mention = Mention(
            id=len(mentions),
            character=character,
            kind=m.kind,
            text=span.text,
            sentence=document.sentence_of[m.token],
            start=span.start_char,
            end=span.end_char,
            role=doc[m.token].dep_,
            ambiguous=m.ambiguous,
        )
        mentions.append(mention)
        mention_at[m.token] = mention

    events = find_events(document, mention_at, _story_time(document, temporal))
    notes = [] if characters else ["no characters found"]
    return StoryResult(story_id, origin, doc.text, sentences, characters, mentions, events, notes)


def _character(doc: Any, entity: Entity, mentions: list[RawMention], new_id: int, count: int, top: int) -> Character:
    """The kept ``entity`` as a character: named by its most frequent name or
    noun phrase (without determiners), with its gender and importance."""
    text = doc.text
    names: Counter[str] = Counter()
    for m in mentions:
        if m.entity == entity.id and m.kind in ("name", "nominal"):
            span = doc[m.start : m.end]
            words = [
                t
                for t in span
                if t.dep_ not in ("det", "poss", "case")
                and t.pos_ not in ("PRON", "PART", "PUNCT")
                and t.lower_ not in _ARTICLES
            ]
            label = text[words[0].idx : words[-1].idx + len(words[-1].text)] if words else span.text
            names[" ".join(label.split())] += 1
    name = names.most_common(1)[0][0] if names else entity.key
    gender, certainty = decide_gender(entity)
    share = count / top if top else 0.0
    importance = "primary" if share >= PRIMARY_SHARE else "secondary" if share >= SECONDARY_SHARE else "tertiary"
    return Character(
        id=new_id,
        name=name,
        aliases=sorted(names),
        mentions=count,
        gender=gender,
        gender_certainty=round(certainty, 4),
        female_evidence=entity.female,
        male_evidence=entity.male,
        number=entity.number,
        importance=importance,
        animacy=entity.animacy,
        first_mention=doc[min(entity.mentions)].idx,
    )
