"""The order in which a story's events happen, from its spaCy parse.

Two methods give every clause a position in story time:

``text``
    The order of the text, the baseline: a story mostly tells its events in
    the order they happen.

``rules``
    Text order, except where tense, aspect or a temporal connective says
    otherwise. The clauses are the nodes of a graph (a clause is headed by
    a verb, or by an auxiliary that is not attached to a verb: "he was
    angry"); each rule below adds an edge "a happens before b", and the
    order is the topological sort of the graph that, among the clauses free
    to come next, always takes the earliest in the text. Clauses that no
    rule moves are chained in text order, so where no rule fires the result
    *is* text order.

    1. *Temporal subordinate clauses.* A clause introduced by after, as soon
       as, once or when happens before the clause it modifies: "He slept
       after he ate" puts eating first. One introduced by before, until or
       till happens after it: "Before she left, she kissed him". "When" is
       left in text order where the main clause is the background the
       when-clause breaks into ("he was sleeping when", "she was about to
       ... when", "hardly had she ... when", "when suddenly").
    2. *Flashbacks.* A clause in the past perfect ("he had been brought up
       by his grandmother") happened before its reference time: before the
       simple-tense clause that governs it in the same sentence ("she found
       that the thief had taken the ring"), else before the last clause of
       the narration before it. Consecutive flashback clauses keep their
       own text order, so a flashback paragraph moves as one block. A past
       perfect inside a temporal clause follows rule 1 instead ("when he had
       eaten, he slept").
    3. *Speech about the future.* A clause in a quote with will, shall or
       'll happens after the verb of speaking that reports the quote ("'I
       will help you,' said the witch": the help comes after the saying); a
       quoted past or perfect clause happens before it.

    Clauses inside a moved clause (its conjuncts, its relative clauses)
    move with it. When rules contradict each other, the earliest clause in
    the text breaks the cycle. How much better this is than text order,
    measured on hand-annotated passages, is in docs/narrative.md.
"""

from __future__ import annotations

import heapq
from collections.abc import Mapping, Sequence
from typing import Any

__all__ = ["METHODS", "clause_heads", "story_time"]

METHODS = ("text", "rules")

_BEFORE_MAIN = {"after", "once", "when", "whenever"}  # the subordinate clause happens first
_AFTER_MAIN = {"before", "until", "till"}  # the subordinate clause happens later
_FUTURE = {"will", "shall", "'ll", "wo", "sha"}
_PERFECT = {"had", "'d"}
_FINITE = {"VBD", "VBZ", "VBP"}
_HARDLY = {"hardly", "scarcely", "barely"}
_INTERRUPTING = {"suddenly", "presently"}  # "..., when suddenly X": X is the new event


def clause_heads(doc: Any) -> list[Any]:
    """The tokens that head a clause, in text order."""
    return [t for t in doc if t.pos_ == "VERB" or (t.pos_ == "AUX" and t.dep_ not in ("aux", "auxpass"))]


def story_time(
    doc: Any,
    method: str,
    quote_region: Sequence[int] | None = None,
    reporting: Mapping[int, int] | None = None,
) -> list[int]:
    """Per token of ``doc``, the position in story time of the clause it
    belongs to (its nearest clause-heading ancestor; tokens outside any
    clause take their sentence root's). ``quote_region`` gives, per token,
    the id of the quote it is in or -1; ``reporting`` maps a quote id to
    the token index of the verb of speaking that reports it."""
    if method not in METHODS:
        raise ValueError(f"unknown temporal method {method!r}; choose one of {', '.join(METHODS)}")
    heads = clause_heads(doc)
    if method == "text":
        order = [h.i for h in heads]
    else:
        quotes = quote_region if quote_region is not None else [-1] * len(doc)
        order = _rule_order(doc, heads, quotes, reporting or {})
    position = {index: p for p, index in enumerate(order)}
    times = []
    for token in doc:
        clause = _clause_of(token, position)
        times.append(position.get(clause.i, len(order) + token.i) if clause is not None else len(order) + token.i)
    return times


def _clause_of(token: Any, position: Mapping[int, int]) -> Any | None:
    while token.i not in position:
        if token.head.i == token.i:
            return None
        token = token.head
    return token


# ---- the rules ---------------------------------------------------------------------


def _marker(clause: Any) -> str | None:
    """The temporal connective that introduces ``clause``, if any."""
    if clause.dep_ == "pcomp" and clause.head.lower_ in ("after", "before", "until", "till"):
        return clause.head.lower_  # "after eating"
    if clause.dep_ != "advcl":
        return None
    if clause.head.lower_ == "soon" and any(c.dep_ == "mark" and c.lower_ == "as" for c in clause.children):
        return "after"  # "left as soon as the sun rose": the clause hangs from "soon"
    for child in clause.children:
        if child.dep_ == "mark" and child.lower_ in _BEFORE_MAIN | _AFTER_MAIN:
            return child.lower_
        if child.dep_ == "advmod" and child.lower_ in ("when", "whenever"):
            return child.lower_
        if child.dep_ == "advmod" and child.lower_ == "soon" and any(c.lower_ == "as" for c in child.children):
            return "after"  # as soon as
    return None


def _is_past_perfect(clause: Any) -> bool:
    if clause.tag_ != "VBN":
        return False  # "had eaten", "had been brought", "had been happy" (been heads the clause)
    return any(c.dep_ == "aux" and c.lower_ in _PERFECT for c in clause.children)


def _is_flashback(clause: Any) -> bool:
    """A past perfect that steps back in time: not "hardly had she ... when"."""
    return _is_past_perfect(clause) and not any(c.lower_ in _HARDLY for c in clause.children)


def _is_future(clause: Any) -> bool:
    return any(c.dep_ == "aux" and c.lower_ in _FUTURE for c in clause.children)


def _is_past(clause: Any) -> bool:
    """Simple past, present perfect or past perfect (for quoted clauses)."""
    return clause.tag_ == "VBD" or (clause.tag_ == "VBN" and any(c.dep_ == "aux" for c in clause.children))


def _background(main: Any, subordinate: Any) -> bool:
    """Is ``main`` the background that a following when-clause breaks into?"""
    words = {c.lower_ for c in main.children}
    if main.tag_ == "VBG" and any(c.dep_ == "aux" for c in main.children):
        return True  # was sleeping
    if "about" in words or "about" in (main.lower_, main.head.lower_):
        return True  # was about to
    if words & _HARDLY:
        return True  # hardly had she ... when
    return any(c.lower_ in _INTERRUPTING for c in subordinate.children)


def _rule_order(doc: Any, heads: Sequence[Any], quotes: Sequence[int], reporting: Mapping[int, int]) -> list[int]:
    is_head = {h.i for h in heads}

    def governor(clause: Any) -> Any | None:
        """The nearest clause above ``clause`` in its sentence."""
        token = clause
        while token.head.i != token.i:
            token = token.head
            if token.i in is_head:
                return token
        return None

    # Each moved clause: (anchor, "before" | "after").
    moves: dict[int, tuple[int, str]] = {}
    for clause in heads:
        main = governor(clause)
        marker = _marker(clause)
        quote = quotes[clause.i]
        if marker is not None and main is not None:
            if marker in _BEFORE_MAIN and clause.i > main.i:
                if not (marker in ("when", "whenever") and _background(main, clause)):
                    moves[clause.i] = (main.i, "before")
            elif marker in _AFTER_MAIN and clause.i < main.i:
                moves[clause.i] = (main.i, "after")
        elif quote >= 0 and quote in reporting and (main is None or quotes[main.i] != quote):
            speech = reporting[quote]
            if _is_future(clause) and clause.i < speech:
                moves[clause.i] = (speech, "after")
            elif _is_past(clause) and clause.i > speech:
                moves[clause.i] = (speech, "before")
        elif quote < 0 and _is_flashback(clause):
            # The reference time: the nearest finite clause above it that is not itself a flashback.
            reference = main
            while reference is not None and (_is_past_perfect(reference) or reference.tag_ not in _FINITE):
                reference = governor(reference)
            if reference is not None and quotes[reference.i] < 0:
                moves[clause.i] = (reference.i, "before")
            else:
                moves[clause.i] = (-1, "before")  # before the narration so far: resolved below

    # A clause inside a moved clause moves with it.
    group: dict[int, int] = {}
    for clause in heads:
        token = clause
        while token.i not in moves and token.head.i != token.i:
            token = token.head
        if token.i in moves:
            group[clause.i] = token.i

    edges: dict[int, set[int]] = {h.i: set() for h in heads}
    waiting: dict[int, int] = {h.i: 0 for h in heads}

    def edge(a: int, b: int) -> None:
        if a != b and b not in edges[a]:
            edges[a].add(b)
            waiting[b] += 1

    narration = [h.i for h in heads if h.i not in group]
    for a, b in zip(narration, narration[1:]):
        edge(a, b)
    for clause in heads:
        if clause.i not in group:
            continue
        anchor, side = moves[group[clause.i]]
        if anchor < 0:
            earlier = [i for i in narration if i < clause.i and doc[i].sent.start < clause.sent.start]
            if not earlier:
                continue
            anchor = earlier[-1]
        if side == "before":
            edge(clause.i, anchor)
        else:
            edge(anchor, clause.i)

    # Topological sort, taking the earliest clause in the text among those free.
    free = [i for i, n in waiting.items() if n == 0]
    heapq.heapify(free)
    done: list[int] = []
    remaining = set(waiting)
    while remaining:
        if not free:  # contradictory rules: the earliest clause left goes first
            stuck = min(remaining)
            waiting[stuck] = 0
            free.append(stuck)
        index = heapq.heappop(free)
        if index not in remaining:
            continue
        remaining.discard(index)
        done.append(index)
        for after in edges[index]:
            waiting[after] -= 1
            if waiting[after] == 0 and after in remaining:
                heapq.heappush(free, after)
    return done
