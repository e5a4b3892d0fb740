"""Characters, coreference, gender, events, salience and order for one story.

The pipeline, over a spaCy parse (``resources.load_spacy``):

1. **Mentions.** Names are proper-noun phrases (spaCy's PERSON entities and
   other proper nouns outside place, date and organisation-like entities);
   nominal mentions are common nouns that WordNet files under ``noun.person``
   or ``noun.animal`` in one of their two most frequent senses ("the king",
   "the fox", "the youngest son"); pronouns are the third-person ones, plus
   relative pronouns (who, that) and first-person ones inside quotes.
2. **Coreference** (rule-based, a baseline). Names and nominal phrases with
   the same key (the head word with titles and determiners removed, keeping
   superlatives and ordinals: "youngest son") are one character. Each
   third-person pronoun goes to the best-scoring compatible character
   mentioned in its sentence or the three before it: compatible in number
   and in gender once a gender is established, never the other argument of
   its own verb (a reflexive goes to exactly that subject); scored by
   recency, the grammatical role of the last mention (subject above object)
   and how often the character was mentioned so far. A relative pronoun is
   the noun its clause modifies. "I", "me" and "my" in a quote are its speaker:
   the subject of a verb of speaking outside the quotes in the same
   sentences ("... ," said the Snow Man), carried over to the next quote of
   the paragraph when that one has no verb of speaking.
3. **Gender** comes from evidence: a noun or title that carries a gender
   (queen, Mr.) and every pronoun resolved *without ambiguity* (exactly one
   compatible character in reach, or one whose gender is already that
   pronoun's). A pronoun with two or more candidates of unknown gender still
   joins a chain but gives no evidence, so "Alex met Sam. He smiled." leaves
   both unknown. The label is the majority gender when it holds at least
   ``GENDER_SHARE`` of the evidence, else ``group-or-unknown``; plural
   characters are always ``group-or-unknown``. ``gender_certainty`` is that
   majority's share.
4. **Importance** by mention count relative to the most mentioned
   character: primary from half of it, secondary from ``SECONDARY_SHARE``,
   else tertiary.
5. **Events.** Every verb (not auxiliaries) whose subject or object is a
   character: ``nsubj`` and the ``agent`` of a passive are subjects,
   ``dobj``, ``dative`` and the subject of a passive are objects. Conjuncts
   share arguments ("Hansel and Gretel ran"); a verb without a subject takes
   it from the verb it is conjoined to, a participial clause from its main
   clause, and an ``xcomp`` from its controller (the object if the main verb
   has one: "told him to go").
6. **Category**: the WordNet supersense (lexicographer file) of the verb's
   most frequent sense, tried as a phrasal verb first ("run_away").
7. **Temporal rank**: the order of the event verbs in story time, by text
   order (``temporal="text"``) or by tense, aspect and temporal connectives
   (``"rules"``, the default; see ``piscale.narrative.temporal``); events of
   one verb share a rank.
8. **Salience**: tf-idf of the verb lemma with the story's sentences as the
   documents, ``tf * (ln((1 + S) / (1 + df)) + 1)``; each sentence's event
   with the highest salience is marked ``salient``.

What it gets wrong is listed in docs/narrative.md; the main limits are a
one-referent-per-noun rule ("a man" ... "the man" and two different men are
one character), no cataphora, plural pronouns that reach only plural
characters, no "it" (animals referred to as "it" lose those mentions), and
spaCy's own lemma and parse errors.
"""

from __future__ import annotations

import math
from collections import Counter, defaultdict
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

from piscale.narrative import lexicon
from piscale.narrative import temporal as temporal_order
from piscale.narrative.lexicon import FEMALE, MALE
from piscale.narrative.resources import NarrativeError, load_spacy, wordnet
from piscale.narrative.schema import Character, Event, Mention, Sentence, StoryResult

__all__ = ["GENDER_SHARE", "SECONDARY_SHARE", "TEMPORAL", "Extractor", "extract"]

GENDER_SHARE = 0.75
PRIMARY_SHARE = 0.5
SECONDARY_SHARE = 0.15
WINDOW = 3  # sentences before the pronoun's that a pronoun may reach
MIN_MENTIONS = 2  # characters mentioned fewer times are dropped
TEMPORAL = "rules"  # the default temporal order (``temporal.METHODS``); "text" is the baseline
UNKNOWN_GENDER = "group-or-unknown"

_QUOTES_OPEN = {"\u201c", "``"}
_QUOTES_CLOSE = {"\u201d", "''"}
_QUOTES_TOGGLE = {'"'}
_NAME_REJECT = {"GPE", "LOC", "FAC", "DATE", "TIME", "NORP", "LANGUAGE", "EVENT", "MONEY", "QUANTITY", "PERCENT"}
_NAME_ROLES = {
    "nsubj",
    "nsubjpass",
    "dobj",
    "dative",
    "pobj",
    "poss",
    "appos",
    "conj",
    "attr",
    "npadvmod",
    "ROOT",
    "agent",
    "oprd",
}
_ORDINALS = {
    "first",
    "second",
    "third",
    "fourth",
    "fifth",
    "sixth",
    "seventh",
    "eighth",
    "ninth",
    "tenth",
    "eleventh",
    "twelfth",
    "last",
}
_ROLE_WEIGHT = {"nsubj": 80, "nsubjpass": 70, "dobj": 50, "dative": 40, "pobj": 40, "poss": 30}
_SUBJECT_DEPS = {"nsubj", "nsubjpass"}
_ARTICLES = {"the", "a", "an"}


@dataclass
class _Entity:
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


@dataclass
class _Mention:
    token: int  # the head token's index in the doc
    kind: str
    start: int  # token span [start, end)
    end: int
    key: str = ""
    number: str = "singular"
    gender: str | None = None
    entity: int | None = None
    ambiguous: bool = False


@lru_cache(maxsize=65536)
def _noun_animacy(lemma: str) -> str | None:
    """ "person", "animal" or None, from the noun's most frequent WordNet sense:
    a person if it is filed under noun.person, an animal if ``animal.n.01``
    is among its hypernyms (WordNet files animals' body parts, paw and wing,
    under noun.animal too, which that test leaves out)."""
    if lemma in lexicon.NOT_CHARACTERS or not lemma.isalpha():
        return None
    if lemma in lexicon.FEMALE_NOUNS or lemma in lexicon.MALE_NOUNS:
        return "person"
    synsets = wordnet().synsets(lemma, pos="n")
    if not synsets:
        return None
    first = synsets[0]
    if first.lexname() == "noun.person":
        return "person"
    if first.lexname() in ("noun.animal", "noun.Tops"):
        animal = wordnet().synset("animal.n.01")
        if first == animal or animal in first.closure(lambda s: s.hypernyms()):
            return "animal"
    return None


@lru_cache(maxsize=65536)
def verb_category(lemma: str) -> str | None:
    """The WordNet supersense of the most frequent sense of ``lemma`` as a verb."""
    synsets = wordnet().synsets(lemma.replace(" ", "_"), pos="v")
    return synsets[0].lexname() if synsets else None


def _lexical_gender(word: str) -> str | None:
    word = word.lower()
    if word in lexicon.FEMALE_NOUNS:
        return FEMALE
    if word in lexicon.MALE_NOUNS:
        return MALE
    return None


class Extractor:
    """Runs the pipeline; one instance can process many stories."""

    def __init__(
        self, model: str | None = None, *, min_mentions: int = MIN_MENTIONS, temporal: str = TEMPORAL
    ) -> None:
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
        return _Story(doc, story_id, origin, self.min_mentions, self.temporal).result()

    def story_time(self, text: str, method: str | None = None) -> tuple[Any, list[int]]:
        """The parse of ``text`` and, per token, the position in story time of
        its clause by ``method`` (default: this extractor's; see ``temporal``)."""
        if len(text) > self.nlp.max_length:
            self.nlp.max_length = len(text) + 1
        doc = self.nlp(text)
        return doc, _Story(doc, "", "", self.min_mentions, method or self.temporal).story_time()

    def pipe(self, stories: Iterable[tuple[str, str, str]], batch_size: int = 8) -> Iterable[StoryResult]:
        """(id, origin, text) triples -> results, parsed in spaCy batches."""
        items = list(stories)
        for item in items:
            if len(item[2]) > self.nlp.max_length:
                self.nlp.max_length = len(item[2]) + 1
        docs = self.nlp.pipe((text for _, _, text in items), batch_size=batch_size)
        for (story_id, origin, _), doc in zip(items, docs):
            yield _Story(doc, story_id, origin, self.min_mentions, self.temporal).result()


def extract(
    text: str, story_id: str = "story", origin: str = "", *, model: str | None = None, temporal: str = TEMPORAL
) -> StoryResult:
    """Extract one story's characters and events (see the module docstring)."""
    return _extractor(model, temporal).process(text, story_id, origin)


@lru_cache(maxsize=2)
def _extractor(model: str | None, temporal: str) -> Extractor:
    return Extractor(model, temporal=temporal)


class _Story:
    def __init__(self, doc: Any, story_id: str, origin: str, min_mentions: int, temporal: str) -> None:
        self.doc = doc
        self.id = story_id
        self.origin = origin
        self.min_mentions = min_mentions
        self.temporal = temporal
        self.sentences = list(doc.sents) if len(doc) else []
        self.sentence_of = [0] * len(doc)
        for index, sentence in enumerate(self.sentences):
            for token in sentence:
                self.sentence_of[token.i] = index
        self.quote_region = self._quote_regions()
        self.mentions: list[_Mention] = []
        self.by_token: dict[int, _Mention] = {}
        self.entities: list[_Entity] = []
        self.by_key: dict[str, int] = {}

    # ---- quotes -------------------------------------------------------------

    def _quote_regions(self) -> list[int]:
        """Per token, the id of the quote it is inside, or -1. A quote ends at
        its closing mark or at a paragraph break, whichever comes first."""
        regions = [-1] * len(self.doc)
        current = -1
        count = 0
        for token in self.doc:
            text = token.text
            if "\n" in text:
                current = -1
                continue
            opening = text in _QUOTES_OPEN or (text in _QUOTES_TOGGLE and current < 0)
            closing = text in _QUOTES_CLOSE or (text in _QUOTES_TOGGLE and current >= 0)
            if text in _QUOTES_TOGGLE and token.tag_ == "``":
                opening, closing = current < 0, False
            elif text in _QUOTES_TOGGLE and token.tag_ == "''":
                opening, closing = False, current >= 0
            if opening and current < 0:
                current = count
                count += 1
                continue
            if closing:
                current = -1
                continue
            regions[token.i] = current
        return regions

    # ---- mentions -------------------------------------------------------------

    def _add(self, mention: _Mention) -> None:
        if mention.token in self.by_token:
            return
        self.by_token[mention.token] = mention
        self.mentions.append(mention)

    def _name_key(self, tokens: Sequence[Any]) -> tuple[str, str | None]:
        words = [t for t in tokens if t.dep_ not in ("det", "poss", "case", "punct") and t.is_alpha]
        gender = None
        for token in words:
            lower = token.text.lower()
            if lower in lexicon.FEMALE_TITLES:
                gender = FEMALE
            elif lower in lexicon.MALE_TITLES:
                gender = MALE
        titles = lexicon.FEMALE_TITLES | lexicon.MALE_TITLES
        core = [t for t in words if t.text.lower().rstrip(".") not in titles and t.text.lower() not in titles]
        if not core:
            core = words
        return " ".join(t.text.lower() for t in core), gender

    def _find_mentions(self) -> None:
        doc = self.doc
        # Names: PERSON entities first, then other proper-noun heads.
        for ent in doc.ents:
            if ent.label_ != "PERSON":
                continue
            root = ent.root
            if root.pos_ != "PROPN" and _noun_animacy(root.lemma_.lower()) is None:
                continue
            key, gender = self._name_key(list(ent))
            if key:
                self._add(_Mention(root.i, "name", ent.start, ent.end, key=key, gender=gender))
        for token in doc:
            if token.i in self.by_token or token.pos_ != "PROPN" or token.dep_ in ("compound", "flat"):
                continue
            if token.ent_type_ in _NAME_REJECT or token.dep_ not in _NAME_ROLES or not token.text[:1].isupper():
                continue
            parts = [c for c in token.lefts if c.dep_ in ("compound", "flat") and c.pos_ == "PROPN"]
            start = min([token.i] + [c.i for c in parts])
            span = doc[start : token.i + 1]
            lemma = token.lemma_.lower()
            animacy = _noun_animacy(lemma)
            if not parts and animacy is None and token.ent_type_ != "PERSON" and token.i == span.sent.start:
                continue  # a capitalised first word, not a name
            key, gender = self._name_key(list(span))
            gender = gender or _lexical_gender(lemma)
            if key:
                self._add(_Mention(token.i, "name", start, token.i + 1, key=key, gender=gender))
        # Nominal mentions: animate common nouns.
        for token in doc:
            if token.i in self.by_token or token.dep_ in ("compound",):
                continue
            # The small pipeline tags some lower-case nouns as proper ("the beggar").
            if token.pos_ != "NOUN" and not (token.pos_ == "PROPN" and token.text.islower()):
                continue
            lemma = token.lemma_.lower()
            animacy = _noun_animacy(lemma)
            if animacy is None:
                continue
            modifiers = [
                c.lemma_.lower()
                for c in token.lefts
                if c.dep_ == "amod" and (c.tag_ in ("JJS", "JJR") or c.lemma_.lower() in _ORDINALS)
            ]
            number = "plural" if token.tag_ in ("NNS", "NNPS") else "singular"
            key = " ".join([*modifiers, lemma]) + (" +pl" if number == "plural" else "")
            left = [c for c in token.lefts if c.dep_ in ("det", "amod", "compound", "poss", "nummod", "nmod")]
            start = min([token.i] + [c.left_edge.i for c in left])
            self._add(
                _Mention(token.i, "nominal", start, token.i + 1, key=key, number=number, gender=_lexical_gender(lemma))
            )
        # Third-person pronouns.
        for token in doc:
            lower = token.text.lower()
            if lower in lexicon.THIRD_PERSON and token.pos_ == "PRON":
                number, gender, _ = lexicon.THIRD_PERSON[lower]
                self._add(_Mention(token.i, "pronoun", token.i, token.i + 1, number=number, gender=gender))
        self.mentions.sort(key=lambda m: m.token)

    # ---- coreference ---------------------------------------------------------

    def _entity_for(self, mention: _Mention) -> _Entity:
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
            animacy = _noun_animacy(token.lemma_.lower()) or ("named" if mention.kind == "name" else "person")
            entity = _Entity(len(self.entities), key, mention.number, animacy, lexical_gender=mention.gender)
            self.entities.append(entity)
            self.by_key[key] = entity.id
            return entity
        entity = self.entities[index]
        if entity.lexical_gender is None and mention.gender is not None:
            entity.lexical_gender = mention.gender
        return entity

    def _link(self, mention: _Mention, entity: _Entity) -> None:
        mention.entity = entity.id
        entity.mentions.append(mention.token)

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

    def _score(self, pronoun: Any, entity: _Entity, distance: int, last: Any, gender: str | None) -> float:
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

    def _resolve_pronoun(self, mention: _Mention) -> None:
        token = self.doc[mention.token]
        lower = token.text.lower()
        form = lexicon.THIRD_PERSON[lower][2]
        if form == "reflexive":
            subject = self._subject_of(token)
            if subject is not None and subject.i in self.by_token:
                target = self.by_token[subject.i]
                if target.entity is not None:
                    entity = self.entities[target.entity]
                    self._link(mention, entity)
                    self._evidence(entity, mention, ambiguous=target.ambiguous)
                    return
        here = self.sentence_of[token.i]
        excluded = self._clause_arguments(token) if form in ("subject", "object") else set()
        excluded_entities = {self.by_token[i].entity for i in excluded if i in self.by_token}
        if form == "possessive":
            excluded_entities.add(None)
        # The most recent earlier mention of each entity within the window.
        last: dict[int, _Mention] = {}
        for other in self.mentions:
            if other.token >= token.i:
                break
            if other.entity is None or here - self.sentence_of[other.token] > WINDOW:
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
            distance = here - self.sentence_of[other.token]
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
        sentence = self.sentences[self.sentence_of[pronoun.i]]
        found = None
        for token in sentence:
            if token.i >= pronoun.i:
                break
            mention = self.by_token.get(token.i)
            if mention is None or mention.entity is None or token.dep_ not in _SUBJECT_DEPS:
                continue
            if self.quote_region[token.i] != self.quote_region[pronoun.i]:
                continue
            found = mention.entity if mention.entity in allowed else found
        return found

    def _compatible(self, entity: _Entity, mention: _Mention) -> bool:
        if mention.number == "plural":
            return entity.number == "plural"
        if entity.number == "plural":
            return False
        established = entity.established()
        return established is None or established == mention.gender

    def _evidence(self, entity: _Entity, mention: _Mention, *, ambiguous: bool) -> None:
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

    def _resolve_relative(self, token: Any) -> None:
        clause = token.head
        while clause.dep_ != "relcl" and clause.head.i != clause.i and clause.dep_ in ("conj", "xcomp"):
            clause = clause.head
        if clause.dep_ != "relcl":
            return
        noun = self.by_token.get(clause.head.i)
        if noun is None or noun.entity is None:
            return
        mention = _Mention(token.i, "pronoun", token.i, token.i + 1, number=noun.number)
        self.by_token[token.i] = mention
        self.mentions.append(mention)
        self._link(mention, self.entities[noun.entity])

    def _renaming(self, mention: _Mention) -> _Entity | None:
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

    def _resolve(self) -> None:
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

    def _quotes(self) -> dict[int, list[int]]:
        """Quote id -> the indices of its tokens."""
        regions: dict[int, list[int]] = defaultdict(list)
        for index, region in enumerate(self.quote_region):
            if region >= 0:
                regions[region].append(index)
        return regions

    def _speech_verbs(self, tokens: list[int]) -> Iterator[Any]:
        """The verbs of speaking outside quotes in the sentences that the
        quote made of ``tokens`` spans, in text order: its reporting clause
        ("... ," said the Snow Man)."""
        for s in range(self.sentence_of[tokens[0]], self.sentence_of[tokens[-1]] + 1):
            for token in self.sentences[s]:
                if self.quote_region[token.i] < 0 and token.pos_ == "VERB":
                    if token.lemma_.lower() in lexicon.SPEECH_VERBS:
                        yield token

    def _resolve_speakers(self) -> None:
        regions = self._quotes()
        previous_speaker: tuple[int, int] | None = None  # (paragraph start token, entity)
        for region in sorted(regions):
            tokens = regions[region]
            first = tokens[0]
            speaker = None
            for verb in self._speech_verbs(tokens):
                for child in verb.children:
                    if child.dep_ == "nsubj" and child.i in self.by_token:
                        speaker = self.by_token[child.i].entity
                if speaker is not None:
                    break
            paragraph = self._paragraph_start(first)
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
                    mention = _Mention(index, "speaker", index, index + 1, number="singular")
                    self.by_token[index] = mention
                    self.mentions.append(mention)
                    self._link(mention, entity)

    def story_time(self) -> list[int]:
        """Per token, the position of its clause in story time."""
        reporting = {}
        for region, tokens in self._quotes().items():
            verb = next(self._speech_verbs(tokens), None)
            if verb is not None:
                reporting[region] = verb.i
        return temporal_order.story_time(self.doc, self.temporal, self.quote_region, reporting)

    def _paragraph_start(self, index: int) -> int:
        while index > 0 and "\n" not in self.doc[index - 1].text:
            index -= 1
        return index

    # ---- events ---------------------------------------------------------------

    @staticmethod
    def _with_conjuncts(token: Any) -> list[Any]:
        out = [token]
        for child in token.children:
            if child.dep_ == "conj":
                out.extend(_Story._with_conjuncts(child))
        return out

    def _arguments(self, verb: Any, depth: int = 0) -> list[tuple[Any, str]]:
        """(argument token, role) pairs of ``verb``."""
        pairs: list[tuple[Any, str]] = []
        has_subject = False
        existential = any(c.dep_ == "expl" for c in verb.children)
        for child in verb.children:
            if existential and child.dep_ in ("dobj", "attr"):
                # "There lived a king": the king is the one who lived.
                has_subject = True
                pairs.extend((t, "subject") for t in self._with_conjuncts(child))
                continue
            if child.dep_ == "nsubj":
                has_subject = True
                pairs.extend((t, "subject") for t in self._with_conjuncts(child))
            elif child.dep_ == "nsubjpass":
                has_subject = True
                pairs.extend((t, "object") for t in self._with_conjuncts(child))
            elif child.dep_ in ("dobj", "dative"):
                pairs.extend((t, "object") for t in self._with_conjuncts(child))
            elif child.dep_ == "agent":
                for pobj in child.children:
                    if pobj.dep_ == "pobj":
                        pairs.extend((t, "subject") for t in self._with_conjuncts(pobj))
        if not has_subject and depth < 4 and verb.head.i != verb.i:
            head = verb.head
            inherited: list[tuple[Any, str]] = []
            if verb.dep_ == "conj" and head.pos_ in ("VERB", "AUX"):
                inherited = [
                    (t, r) for t, r in self._arguments(head, depth + 1) if r == "subject" or t.dep_ == "nsubjpass"
                ]
                if verb.tag_ != "VBN":
                    inherited = [(t, "subject") for t, _ in inherited]
            elif verb.dep_ == "xcomp" and head.pos_ in ("VERB", "AUX"):
                objects = [c for c in head.children if c.dep_ in ("dobj", "dative")]
                if objects:
                    inherited = [(t, "subject") for o in objects for t in self._with_conjuncts(o)]
                else:
                    inherited = [(t, "subject") for t, r in self._arguments(head, depth + 1) if r == "subject"]
                if any(c.dep_ == "auxpass" for c in verb.children):
                    # "apprenticed him to be taught": he is taught.
                    inherited = [(t, "object") for t, _ in inherited]
            elif verb.dep_ == "advcl" and verb.tag_ in ("VBG", "VBN") and head.pos_ in ("VERB", "AUX"):
                role = "object" if verb.tag_ == "VBN" else "subject"
                inherited = [(t, role) for t, r in self._arguments(head, depth + 1) if r == "subject"]
            pairs.extend(inherited)
        return pairs

    def _verb_lemma(self, verb: Any) -> str:
        lemma = verb.lemma_.lower()
        particles = [c.text.lower() for c in verb.children if c.dep_ == "prt"]
        if particles:
            phrasal = lemma + "_" + "_".join(particles)
            if verb_category(phrasal) is not None:
                return phrasal
        return lemma

    # ---- assembly -------------------------------------------------------------

    def result(self) -> StoryResult:
        doc = self.doc
        text = doc.text
        sentences = [Sentence(i, s.start_char, s.end_char, s.text) for i, s in enumerate(self.sentences)]
        if not len(doc):
            return StoryResult(self.id, self.origin, text, sentences, notes=["empty text"])
        self._find_mentions()
        self._resolve()

        # Keep characters with enough mentions; renumber them by first mention.
        counts = Counter(m.entity for m in self.mentions if m.entity is not None)
        kept = [e for e in self.entities if counts[e.id] >= self.min_mentions]
        kept.sort(key=lambda e: min(e.mentions))
        new_id = {e.id: i for i, e in enumerate(kept)}
        top = max((counts[e.id] for e in kept), default=0)
        characters = []
        for entity in kept:
            names: Counter[str] = Counter()
            for m in self.mentions:
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
            gender, certainty = _decide_gender(entity)
            share = counts[entity.id] / top if top else 0.0
            importance = (
                "primary" if share >= PRIMARY_SHARE else "secondary" if share >= SECONDARY_SHARE else "tertiary"
            )
            characters.append(
                Character(
                    id=new_id[entity.id],
                    name=name,
                    aliases=sorted(names),
                    mentions=counts[entity.id],
                    gender=gender,
                    gender_certainty=round(certainty, 4),
                    female_evidence=entity.female,
                    male_evidence=entity.male,
                    number=entity.number,
                    importance=importance,
                    animacy=entity.animacy,
                    first_mention=doc[min(entity.mentions)].idx,
                )
            )

        mentions: list[Mention] = []
        mention_id: dict[int, int] = {}
        for m in self.mentions:
            character = new_id.get(m.entity) if m.entity is not None else None
            if m.entity is not None and character is None:
                continue  # a dropped character's mention
            span = doc[m.start : m.end]
            mention_id[m.token] = len(mentions)
            mentions.append(
                Mention(
                    id=len(mentions),
                    character=character,
                    kind=m.kind,
                    text=span.text,
                    sentence=self.sentence_of[m.token],
                    start=span.start_char,
                    end=span.end_char,
                    role=doc[m.token].dep_,
                    ambiguous=m.ambiguous,
                )
            )

        raw_events = []
        for verb in doc:
            if verb.pos_ != "VERB" or verb.lemma_.lower() == "be":
                continue
            seen = set()
            for argument, role in self._arguments(verb):
                if argument.i not in mention_id:
                    continue
                mention = mentions[mention_id[argument.i]]
                if mention.character is None or (mention.character, role) in seen:
                    continue
                seen.add((mention.character, role))
                raw_events.append((verb, mention, role))
        lemmas = {verb.i: self._verb_lemma(verb) for verb, _, _ in raw_events}
        idf = self._idf()
        time = self.story_time()
        positions = sorted({verb.i for verb, _, _ in raw_events}, key=lambda i: (time[i], i))
        rank = {position: r for r, position in enumerate(positions)}
        events: list[Event] = []
        for verb, mention, role in raw_events:
            lemma = lemmas[verb.i]
            sentence = self.sentence_of[verb.i]
            tf = sum(
                1 for t in self.sentences[sentence] if t.pos_ == "VERB" and t.lemma_.lower() == verb.lemma_.lower()
            )
            events.append(
                Event(
                    id=len(events),
                    character=mention.character,  # type: ignore[arg-type]
                    role=role,
                    verb=lemma,
                    text=verb.text,
                    category=verb_category(lemma),
                    sentence=sentence,
                    start=verb.idx,
                    end=verb.idx + len(verb.text),
                    mention=mention.id,
                    temporal_rank=rank[verb.i],
                    salience=round(tf * idf.get(verb.lemma_.lower(), 0.0), 6),
                    salient=False,
                    in_quote=self.quote_region[verb.i] >= 0,
                )
            )
        best: dict[int, Event] = {}
        for event in events:
            current = best.get(event.sentence)
            if current is None or event.salience > current.salience:
                best[event.sentence] = event
        for event in best.values():
            for other in events:
                if other.sentence == event.sentence and other.start == event.start:
                    other.salient = True
        notes = [] if characters else ["no characters found"]
        return StoryResult(self.id, self.origin, text, sentences, characters, mentions, events, notes)

    def _idf(self) -> dict[str, float]:
        df: Counter[str] = Counter()
        for sentence in self.sentences:
            df.update({t.lemma_.lower() for t in sentence if t.pos_ == "VERB"})
        total = len(self.sentences)
        return {lemma: math.log((1 + total) / (1 + count)) + 1.0 for lemma, count in df.items()}


def _decide_gender(entity: _Entity) -> tuple[str, float]:
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
