"""Events: the verbs a character does or undergoes, with their category,
temporal rank and salience.

- **Arguments.** Every verb (not *be*, not auxiliaries) whose subject or
  object is a character's mention: ``nsubj`` and the ``agent`` of a passive
  are subjects, ``dobj``, ``dative`` and the subject of a passive are
  objects; existential "there lived a king" makes the king the subject.
  Conjuncts share arguments ("Hansel and Gretel ran"); a verb without a
  subject takes it from the verb it is conjoined to, a participial clause
  from its main clause, and an ``xcomp`` from its controller (the object if
  the main verb has one: "told him to go").
- **Category**: the WordNet supersense (lexicographer file) of the verb's
  most frequent sense, tried as a phrasal verb first ("run_away").
- **Temporal rank**: the event verbs sorted by their clause's position in
  story time (``piscale.narrative.temporal``), then by text; events of one
  verb share a rank.
- **Salience**: tf-idf of the verb lemma with the story's sentences as the
  documents, ``tf * (ln((1 + S) / (1 + df)) + 1)``; each sentence's event
  with the highest salience is marked ``salient``.
"""

from __future__ import annotations

import math
from collections import Counter
from functools import lru_cache
from typing import Any

from piscale.narrative.document import Document
from piscale.narrative.resources import wordnet
from piscale.narrative.schema import Event, Mention

__all__ = ["find_events", "verb_arguments", "verb_category"]


@lru_cache(maxsize=65536)
def verb_category(lemma: str) -> str | None:
    """The WordNet supersense of the most frequent sense of ``lemma`` as a verb."""
    synsets = wordnet().synsets(lemma.replace(" ", "_"), pos="v")
    return synsets[0].lexname() if synsets else None


def _with_conjuncts(token: Any) -> list[Any]:
    out = [token]
    for child in token.children:
        if child.dep_ == "conj":
            out.extend(_with_conjuncts(child))
    return out


def verb_arguments(verb: Any, depth: int = 0) -> list[tuple[Any, str]]:
    """(argument token, role) pairs of ``verb``; role is "subject" or "object"."""
    pairs: list[tuple[Any, str]] = []
    has_subject = False
    existential = any(c.dep_ == "expl" for c in verb.children)
    for child in verb.children:
        if existential and child.dep_ in ("dobj", "attr"):
            # "There lived a king": the king is the one who lived.
            has_subject = True
            pairs.extend((t, "subject") for t in _with_conjuncts(child))
            continue
        if child.dep_ == "nsubj":
            has_subject = True
            pairs.extend((t, "subject") for t in _with_conjuncts(child))
        elif child.dep_ == "nsubjpass":
            has_subject = True
            pairs.extend((t, "object") for t in _with_conjuncts(child))
        elif child.dep_ in ("dobj", "dative"):
            pairs.extend((t, "object") for t in _with_conjuncts(child))
        elif child.dep_ == "agent":
            for pobj in child.children:
                if pobj.dep_ == "pobj":
                    pairs.extend((t, "subject") for t in _with_conjuncts(pobj))
    if not has_subject and depth < 4 and verb.head.i != verb.i:
        head = verb.head
        inherited: list[tuple[Any, str]] = []
        if verb.dep_ == "conj" and head.pos_ in ("VERB", "AUX"):
            inherited = [(t, r) for t, r in verb_arguments(head, depth + 1) if r == "subject" or t.dep_ == "nsubjpass"]
            if verb.tag_ != "VBN":
                inherited = [(t, "subject") for t, _ in inherited]
        elif verb.dep_ == "xcomp" and head.pos_ in ("VERB", "AUX"):
            objects = [c for c in head.children if c.dep_ in ("dobj", "dative")]
            if objects:
                inherited = [(t, "subject") for o in objects for t in _with_conjuncts(o)]
            else:
                inherited = [(t, "subject") for t, r in verb_arguments(head, depth + 1) if r == "subject"]
            if any(c.dep_ == "auxpass" for c in verb.children):
                # "apprenticed him to be taught": he is taught.
                inherited = [(t, "object") for t, _ in inherited]
        elif verb.dep_ == "advcl" and verb.tag_ in ("VBG", "VBN") and head.pos_ in ("VERB", "AUX"):
            role = "object" if verb.tag_ == "VBN" else "subject"
            inherited = [(t, role) for t, r in verb_arguments(head, depth + 1) if r == "subject"]
        pairs.extend(inherited)
    return pairs


def _verb_lemma(verb: Any) -> str:
    """The lemma, as a phrasal verb ("run_away") when WordNet knows it."""
    lemma = verb.lemma_.lower()
    particles = [c.text.lower() for c in verb.children if c.dep_ == "prt"]
    if particles:
        phrasal = lemma + "_" + "_".join(particles)
        if verb_category(phrasal) is not None:
            return phrasal
    return lemma


def _idf(document: Document) -> dict[str, float]:
    """Verb lemma -> its inverse document frequency over the sentences."""
    df: Counter[str] = Counter()
    for sentence in document.sentences:
        df.update({t.lemma_.lower() for t in sentence if t.pos_ == "VERB"})
    total = len(document.sentences)
    return {lemma: math.log((1 + total) / (1 + count)) + 1.0 for lemma, count in df.items()}


def find_events(document: Document, mention_at: dict[int, Mention], time: list[int]) -> list[Event]:
    """The story's events. ``mention_at`` maps a token index to the mention
    whose head it is; ``time`` gives per token its position in story time."""
    character_verbs = []  # (verb token, mention, role), one per character and role of a verb
    for verb in document.doc:
        if verb.pos_ != "VERB" or verb.lemma_.lower() == "be":
            continue
        seen = set()
        for argument, role in verb_arguments(verb):
            mention = mention_at.get(argument.i)
            if mention is None or mention.character is None or (mention.character, role) in seen:
                continue
            seen.add((mention.character, role))
            character_verbs.append((verb, mention, role))
    lemmas = {verb.i: _verb_lemma(verb) for verb, _, _ in character_verbs}
    idf = _idf(document)
    positions = sorted({verb.i for verb, _, _ in character_verbs}, key=lambda i: (time[i], i))
    rank = {position: r for r, position in enumerate(positions)}
    events: list[Event] = []
    for verb, mention, role in character_verbs:
        lemma = lemmas[verb.i]
        sentence = document.sentence_of[verb.i]
        tf = sum(
            1 for t in document.sentences[sentence] if t.pos_ == "VERB" and t.lemma_.lower() == verb.lemma_.lower()
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
                in_quote=document.quote_region[verb.i] >= 0,
            )
        )
    _mark_salient(events)
    return events


def _mark_salient(events: list[Event]) -> None:
    """Mark each sentence's most salient event (all events of its verb)."""
    best: dict[int, Event] = {}
    for event in events:
        current = best.get(event.sentence)
        if current is None or event.salience > current.salience:
            best[event.sentence] = event
    for event in best.values():
        for other in events:
            if other.sentence == event.sentence and other.start == event.start:
                other.salient = True
