"""The spaCy parse of one story, indexed the way the extraction steps read it.

``Document`` wraps a parsed ``Doc`` with the sentence each token is in, the
quote each token is inside (a quote ends at its closing mark or at a
paragraph break, whichever comes first; straight double quotes open and
close by turns, or as spaCy tags them), the paragraph a token starts, and
the verbs of speaking outside a quote that report it ("... ," said the Snow
Man). Coreference uses the quotes to find who says "I"; the temporal order
uses the reporting verbs to place what a quote tells.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterator
from typing import Any

from piscale.narrative import lexicon

__all__ = ["Document"]

_QUOTES_OPEN = {"\u201c", "``"}
_QUOTES_CLOSE = {"\u201d", "''"}
_QUOTES_TOGGLE = {'"'}


class Document:
    """A parsed story: ``doc`` (spaCy), ``sentences`` (spans), and per token
    ``sentence_of`` (its sentence's index) and ``quote_region`` (its quote's
    id, or -1 outside quotes)."""

    def __init__(self, doc: Any) -> None:
        self.doc = doc
        self.sentences = list(doc.sents) if len(doc) else []
        self.sentence_of = [0] * len(doc)
        for index, sentence in enumerate(self.sentences):
            for token in sentence:
                self.sentence_of[token.i] = index
        self.quote_region = self._quote_regions()

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

    def quotes(self) -> dict[int, list[int]]:
        """Quote id -> the indices of its tokens."""
        regions: dict[int, list[int]] = defaultdict(list)
        for index, region in enumerate(self.quote_region):
            if region >= 0:
                regions[region].append(index)
        return regions

    def speech_verbs(self, tokens: list[int]) -> Iterator[Any]:
        """The verbs of speaking outside quotes in the sentences that the
        quote made of ``tokens`` spans, in text order: its reporting clause
        ("... ," said the Snow Man)."""
        for s in range(self.sentence_of[tokens[0]], self.sentence_of[tokens[-1]] + 1):
            for token in self.sentences[s]:
                if self.quote_region[token.i] < 0 and token.pos_ == "VERB":
                    if token.lemma_.lower() in lexicon.SPEECH_VERBS:
                        yield token

    def reporting_verbs(self) -> dict[int, int]:
        """Quote id -> the token index of the first verb of speaking that
        reports it, for the quotes that have one."""
        reporting = {}
        for region, tokens in self.quotes().items():
            verb = next(self.speech_verbs(tokens), None)
            if verb is not None:
                reporting[region] = verb.i
        return reporting

    def paragraph_start(self, index: int) -> int:
        """The index of the first token of the paragraph token ``index`` is in."""
        while index > 0 and "\n" not in self.doc[index - 1].text:
            index -= 1
        return index
