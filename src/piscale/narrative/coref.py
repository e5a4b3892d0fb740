"""Rule-based coreference: which mentions are one character, and the
gender evidence each character gathers on the way.

- **Names and nominal phrases** with the same key are one character; a
  first name joins the full name it starts when only one fits ("Jemima" and
  "Jemima Puddle-duck"); an apposition ("the queen, his mother") or a naming
  participle ("a son named Halvor") joins the noun it renames.
- **Third-person pronouns** go to a compatible character (in number, and in
  gender once one is established) mentioned in the pronoun's sentence or the
  ``WINDOW`` sentences before it, never to a co-argument of the pronoun's own
  verb; a reflexive goes to exactly its subject. A compatible subject earlier
  in the pronoun's own sentence wins outright; otherwise the best score of
  recency, the role of the last mention (subject above object), parallel
  roles, how often the character was mentioned, and how its earlier pronouns
  agree.
- **Relative pronouns** (who, that) are the noun their clause modifies.
- **"I", "me" and "my" in a quote** are its speaker: the subject of a verb of
  speaking outside the quotes in the same sentences, carried over to the
  next quote of the paragraph when that one has no verb of speaking.

**Gender** comes from evidence: a noun or title that carries a gender
(queen, Mr.) and every pronoun resolved *without ambiguity* (exactly one
compatible character in reach, or one whose gender is already that
pronoun's). A pronoun with two or more candidates of unknown gender still
joins a chain but gives no evidence, so "Alex met Sam. He smiled." leaves
both unknown. ``decide_gender`` labels a character with the majority gender
when it holds at least ``GENDER_SHARE`` of the evidence, else
``group-or-unknown``; plural characters are always ``group-or-unknown``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from piscale.narrative import lexicon
from piscale.narrative.document import Document
from piscale.narrative.lexicon import FEMALE, MALE
from piscale.narrative.mentions import RawMention, noun_animacy

__all__ = ["GENDER_SHARE", "UNKNOWN_GENDER", "WINDOW", "Entity", "decide_gender", "resolve"]

GENDER_SHARE = 0.75
WINDOW = 3  # sentences before the pronoun's that a pronoun may reach
UNKNOWN_GENDER = "group-or-unknown"

_ROLE_WEIGHT = {"nsubj": 80, "nsubjpass": 70, "dobj": 50, "dative": 40, "pobj": 40, "poss": 30}
_SUBJECT_DEPS = {"nsubj", "nsubjpass"}


@dataclass
class Entity:
    """A character while its chain is built: its mentions' head tokens and
    the gender evidence so far."""

    id: int
    key: str
    number: str
    animacy: str
    lexical_gender: str | None = None
    female: int = 0
    male: int = 0
    mentions: list[int] = field(default_factory=list)
    linked_female: int = 0  # gendered mentions linked, ambiguous ones included
    linked_male: int = 0

    def opposite_share(self, gender: str | None) -> float:
        """The share of this entity's gendered links that disagree with ``gender``."""
        total = self.linked_female + self.linked_male
        if not total or gender not in (FEMALE, MALE):
            return 0.0
        return (self.linked_male if gender == FEMALE else self.linked_female) / total

    def established(self) -> str | None:
        """The gender pronouns must agree with: a lexical one, or a
        pronoun-based one with at least two pieces of evidence."""
        if self.lexical_gender:
            return self.lexical_gender
        total = self.female + self.male
        if total >= 2:
            if self.female / total >= 0.8:
                return FEMALE
            if self.male / total >= 0.8:
                return MALE
        return None


def decide_gender(entity: Entity) -> tuple[str, float]:
    """The entity's gender label and its certainty: the share of the
    gendered evidence that agrees with the label."""
    if entity.number == "plural":
        return UNKNOWN_GENDER, 1.0
    total = entity.female + entity.male
    if total == 0:
        return UNKNOWN_GENDER, 0.0
    female_share = entity.female / total
    if female_share >= GENDER_SHARE:
        return FEMALE, female_share
    if 1 - female_share >= GENDER_SHARE:
        return MALE, 1 - female_share
    return UNKNOWN_GENDER, max(female_share, 1 - female_share)


def resolve(document: Document, mentions: list[RawMention]) -> tuple[list[RawMention], list[Entity]]:
    """Link ``mentions`` (from ``find_mentions``) into characters. Returns all
    mentions in text order, the relative pronouns and quote speakers' "I"
    found here included, each with its ``entity`` (None when unresolved),
    and the entities, numbered by creation."""
    resolver = _Resolver(document, mentions)
    resolver.resolve()
    return resolver.mentions, resolver.entities


class _Resolver:
    def __init__(self, document: Document, mentions: list[RawMention]) -> None:
        self.document = document
        self.doc = document.doc
        self.mentions = list(mentions)
        self.by_token = {m.token: m for m in self.mentions}
        self.entities: list[Entity] = []
        self.by_key: dict[str, int] = {}

    def resolve(self) -> None:
        for mention in list(self.mentions):
            if mention.kind in ("name", "nominal"):
                renamed = None if mention.key in self.by_key else self._renaming(mention)
                if renamed is not None:
                    self.by_key[mention.key] = renamed.id
                entity = self._entity_for(mention)
                self._link(mention, entity)
                if mention.gender is not None:
                    self._evidence(entity, mention, ambiguous=False)
            else:
                self._resolve_pronoun(mention)
        for token in self.doc:
            if token.text.lower() in ("who", "whom", "that", "which") and token.tag_ in ("WP", "WDT"):
                if token.dep_ in ("nsubj", "nsubjpass", "dobj", "dative") and token.i not in self.by_token:
                    self._resolve_relative(token)
        self._resolve_speakers()
        self.mentions.sort(key=lambda m: m.token)

    # ---- names and nominal phrases -------------------------------------------

    def _entity_for(self, mention: RawMention) -> Entity:
        key = mention.key
        index = self.by_key.get(key)
        if index is None and mention.kind == "name":
            # A first name and the full name it starts are one character
            # ("Jemima" and "Jemima Puddle-duck"), when only one name fits.
            words = key.split(" ")
            fits = {
                other_index
                for other, other_index in self.by_key.items()
                if self.entities[other_index].animacy == "named"
                and other != key
                and (other.split(" ")[: len(words)] == words or words[: len(other.split(" "))] == other.split(" "))
            }
            if len(fits) == 1:
                index = fits.pop()
                self.by_key[key] = index
        if index is None:
            token = self.doc[mention.token]
            animacy = noun_animacy(token.lemma_.lower()) or ("named" if mention.kind == "name" else "person")
            entity = Entity(len(self.entities), key, mention.number, animacy, lexical_gender=mention.gender)
            self.entities.append(entity)
            self.by_key[key] = entity.id
            return entity
        entity = self.entities[index]
        if entity.lexical_gender is None and mention.gender is not None:
            entity.lexical_gender = mention.gender
        return entity

    def _renaming(self, mention: RawMention) -> Entity | None:
        """The entity of the noun this mention renames: an apposition ("the
        queen, his mother") or a naming participle ("a son named Halvor")."""
        token = self.doc[mention.token]
        head = None
        if token.dep_ == "appos":
            head = token.head
        elif token.dep_ in ("oprd", "attr", "dobj", "npadvmod") and token.head.lemma_.lower() in ("name", "call"):
            if token.head.dep_ == "acl":
                head = token.head.head
        if head is None or head.i not in self.by_token:
            return None
        other = self.by_token[head.i]
        if other.entity is None or other.kind not in ("name", "nominal") or other.number != mention.number:
            return None
        entity = self.entities[other.entity]
        if mention.gender and entity.lexical_gender and mention.gender != entity.lexical_gender:
            return None
        return entity

    def _link(self, mention: RawMention, entity: Entity) -> None:
        mention.entity = entity.id
        entity.mentions.append(mention.token)

    def _evidence(self, entity: Entity, mention: RawMention, *, ambiguous: bool) -> None:
        if mention.gender == FEMALE:
            entity.linked_female += 1
        elif mention.gender == MALE:
            entity.linked_male += 1
        if ambiguous or mention.gender not in (FEMALE, MALE) or entity.number == "plural":
            return
        if mention.gender == FEMALE:
            entity.female += 1
        else:
            entity.male += 1

    # ---- pronouns -------------------------------------------------------------

    def _clause_arguments(self, token: Any) -> set[int]:
        """Tokens that are co-arguments of ``token``'s verb (for binding)."""
        verb = token.head
        while verb.dep_ in ("conj", "prep", "pobj") and verb.head.i != verb.i and verb.pos_ not in ("VERB", "AUX"):
            verb = verb.head
        arguments = {c.i for c in verb.children if c.dep_ in ("nsubj", "nsubjpass", "dobj", "dative")}
        arguments.discard(token.i)
        return arguments

    def _subject_of(self, token: Any) -> Any | None:
        verb = token.head
        for _ in range(4):
            for child in verb.children:
                if child.dep_ in _SUBJECT_DEPS:
                    return child
            if verb.dep_ in ("conj", "xcomp", "advcl") and verb.head.i != verb.i:
                verb = verb.head
            else:
                break
        return None

    def _score(self, pronoun: Any, entity: Entity, distance: int, last: Any, gender: str | None) -> float:
        """Recency, the role of the last mention, parallel roles, how often
        the character was mentioned, and how its pronouns so far agree."""
        score = 100.0 * 0.5**distance
        score += _ROLE_WEIGHT.get(last.dep_, 20)
        if last.dep_ == pronoun.dep_:
            score += 35
        score += 20.0 * math.log1p(len(entity.mentions))
        if gender in (FEMALE, MALE) and entity.linked_female + entity.linked_male:
            score += 30.0 * (1.0 - entity.opposite_share(gender)) - 100.0 * entity.opposite_share(gender)
        return score

    def _resolve_pronoun(self, mention: RawMention) -> None:
        token = self.doc[mention.token]
        lower = token.text.lower()
        form = lexicon.THIRD_PERSON[lower][2]
        sentence_of = self.document.sentence_of
        if form == "reflexive":
            subject = self._subject_of(token)
            if subject is not None and subject.i in self.by_token:
                target = self.by_token[subject.i]
                if target.entity is not None:
                    entity = self.entities[target.entity]
                    self._link(mention, entity)
                    self._evidence(entity, mention, ambiguous=target.ambiguous)
                    return
        here = sentence_of[token.i]
        excluded = self._clause_arguments(token) if form in ("subject", "object") else set()
        excluded_entities = {self.by_token[i].entity for i in excluded if i in self.by_token}
        if form == "possessive":
            excluded_entities.add(None)
        # The most recent earlier mention of each entity within the window.
        last: dict[int, RawMention] = {}
        for other in self.mentions:
            if other.token >= token.i:
                break
            if other.entity is None or here - sentence_of[other.token] > WINDOW:
                continue
            if form == "possessive" and self.doc[other.token].head.i == token.head.i and other.kind != "pronoun":
                continue
            last[other.entity] = other
        candidates = []
        for entity_id, other in last.items():
            entity = self.entities[entity_id]
            if entity_id in excluded_entities:
                continue
            if not self._compatible(entity, mention):
                continue
            distance = here - sentence_of[other.token]
            score = self._score(token, entity, distance, self.doc[other.token], mention.gender)
            candidates.append((score, entity_id))
        if not candidates:
            return
        candidates.sort(key=lambda pair: (-pair[0], pair[1]))
        # A compatible subject earlier in the pronoun's own sentence wins
        # outright ("The shepherd wandered until he met a witch").
        local = self._sentence_subject(token, {entity_id for _, entity_id in candidates})
        if local is not None:
            best, ambiguous = self.entities[local], False
        else:
            best = self.entities[candidates[0][1]]
            if mention.number == "plural" or best.established() == mention.gender:
                ambiguous = False
            else:
                ambiguous = len(candidates) > 1
        mention.ambiguous = ambiguous
        self._link(mention, best)
        self._evidence(best, mention, ambiguous=ambiguous)

    def _sentence_subject(self, pronoun: Any, allowed: set[int]) -> int | None:
        """The entity of the nearest subject mention before ``pronoun`` in its
        sentence, when it is among ``allowed``."""
        sentence = self.document.sentences[self.document.sentence_of[pronoun.i]]
        quote_region = self.document.quote_region
        found = None
        for token in sentence:
            if token.i >= pronoun.i:
                break
            mention = self.by_token.get(token.i)
            if mention is None or mention.entity is None or token.dep_ not in _SUBJECT_DEPS:
                continue
            if quote_region[token.i] != quote_region[pronoun.i]:
                continue
            found = mention.entity if mention.entity in allowed else found
        return found

    def _compatible(self, entity: Entity, mention: RawMention) -> bool:
        if mention.number == "plural":
            return entity.number == "plural"
        if entity.number == "plural":
            return False
        established = entity.established()
        return established is None or established == mention.gender

    # ---- relative pronouns and quote speakers ------------------------------------

    def _resolve_relative(self, token: Any) -> None:
        clause = token.head
        while clause.dep_ != "relcl" and clause.head.i != clause.i and clause.dep_ in ("conj", "xcomp"):
            clause = clause.head
        if clause.dep_ != "relcl":
            return
        noun = self.by_token.get(clause.head.i)
        if noun is None or noun.entity is None:
            return
        mention = RawMention(token.i, "pronoun", token.i, token.i + 1, number=noun.number)
        self.by_token[token.i] = mention
        self.mentions.append(mention)
        self._link(mention, self.entities[noun.entity])

    def _resolve_speakers(self) -> None:
        regions = self.document.quotes()
        previous_speaker: tuple[int, int] | None = None  # (paragraph start token, entity)
        for region in sorted(regions):
            tokens = regions[region]
            first = tokens[0]
            speaker = None
            for verb in self.document.speech_verbs(tokens):
                for child in verb.children:
                    if child.dep_ == "nsubj" and child.i in self.by_token:
                        speaker = self.by_token[child.i].entity
                if speaker is not None:
                    break
            paragraph = self.document.paragraph_start(first)
            if speaker is None and previous_speaker is not None and previous_speaker[0] == paragraph:
                speaker = previous_speaker[1]
            if speaker is None:
                continue
            previous_speaker = (paragraph, speaker)
            entity = self.entities[speaker]
            for index in tokens:
                token = self.doc[index]
                if token.text.lower() in lexicon.FIRST_PERSON_SINGULAR and token.pos_ == "PRON":
                    if index in self.by_token:
                        continue
                    mention = RawMention(index, "speaker", index, index + 1, number="singular")
                    self.by_token[index] = mention
                    self.mentions.append(mention)
                    self._link(mention, entity)
