"""Finding the words that may refer to a character, before coreference.

Three kinds, found in this order (a token is one mention at most):

- **name**: spaCy's PERSON entities, then other proper nouns outside place,
  date and organisation-like entities, in a noun phrase's role (subject,
  object, possessor, apposition...), with their compound parts ("Jemima
  Puddle-duck"); a lone capitalised first word of a sentence that is
  neither a person entity nor an animate noun is not a name. The key is the
  name without determiners and titles; a title (Mrs., King) gives the
  gender.
- **nominal**: common nouns whose most frequent WordNet sense is a person
  (``noun.person``) or an animal (``animal.n.01`` among its hypernyms), keyed
  by the lemma with superlatives and ordinals kept ("youngest son") and
  ``+pl`` for plurals; a noun whose meaning carries a gender (queen) gives it.
- **pronoun**: the third-person pronouns, with their number and gender.

Relative pronouns and the speaker's "I" inside quotes are added later by
coreference (``piscale.narrative.coref``), since they need a resolved
antecedent.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from piscale.narrative import lexicon
from piscale.narrative.document import Document
from piscale.narrative.lexicon import FEMALE, MALE
from piscale.narrative.resources import wordnet

__all__ = ["RawMention", "find_mentions", "lexical_gender", "noun_animacy"]

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


@dataclass
class RawMention:
    """A mention as found in the parse; coreference fills in ``entity`` and
    ``ambiguous``."""

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
def noun_animacy(lemma: str) -> str | None:
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


def lexical_gender(word: str) -> str | None:
    """The gender a noun's meaning carries (queen, bull), or None."""
    word = word.lower()
    if word in lexicon.FEMALE_NOUNS:
        return FEMALE
    if word in lexicon.MALE_NOUNS:
        return MALE
    return None


def _name_key(tokens: Sequence[Any]) -> tuple[str, str | None]:
    """A name's key (lower case, without determiners and titles) and the
    gender its title gives, if any."""
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


def find_mentions(document: Document) -> list[RawMention]:
    """The story's name, nominal and pronoun mentions, in text order."""
    doc = document.doc
    mentions: list[RawMention] = []
    by_token: dict[int, RawMention] = {}

    def add(mention: RawMention) -> None:
        if mention.token in by_token:
            return
        by_token[mention.token] = mention
        mentions.append(mention)

    # Names: PERSON entities first, then other proper-noun heads.
    for ent in doc.ents:
        if ent.label_ != "PERSON":
            continue
        root = ent.root
        if root.pos_ != "PROPN" and noun_animacy(root.lemma_.lower()) is None:
            continue
        key, gender = _name_key(list(ent))
        if key:
            add(RawMention(root.i, "name", ent.start, ent.end, key=key, gender=gender))
    for token in doc:
        if token.i in by_token or token.pos_ != "PROPN" or token.dep_ in ("compound", "flat"):
            continue
        if token.ent_type_ in _NAME_REJECT or token.dep_ not in _NAME_ROLES or not token.text[:1].isupper():
            continue
        parts = [c for c in token.lefts if c.dep_ in ("compound", "flat") and c.pos_ == "PROPN"]
        start = min([token.i] + [c.i for c in parts])
        span = doc[start : token.i + 1]
        lemma = token.lemma_.lower()
        animacy = noun_animacy(lemma)
        if not parts and animacy is None and token.ent_type_ != "PERSON" and token.i == span.sent.start:
            continue  # a capitalised first word, not a name
        key, gender = _name_key(list(span))
        gender = gender or lexical_gender(lemma)
        if key:
            add(RawMention(token.i, "name", start, token.i + 1, key=key, gender=gender))
    # Nominal mentions: animate common nouns.
    for token in doc:
        if token.i in by_token or token.dep_ in ("compound",):
            continue
        # The small pipeline tags some lower-case nouns as proper ("the beggar").
        if token.pos_ != "NOUN" and not (token.pos_ == "PROPN" and token.text.islower()):
            continue
        lemma = token.lemma_.lower()
        animacy = noun_animacy(lemma)
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
        add(RawMention(token.i, "nominal", start, token.i + 1, key=key, number=number, gender=lexical_gender(lemma)))
    # Third-person pronouns.
    for token in doc:
        lower = token.text.lower()
        if lower in lexicon.THIRD_PERSON and token.pos_ == "PRON":
            number, gender, _ = lexicon.THIRD_PERSON[lower]
            add(RawMention(token.i, "pronoun", token.i, token.i + 1, number=number, gender=gender))
    mentions.sort(key=lambda m: m.token)
    return mentions
