"""Draw the passages of the hand-annotated temporal-order sets.

The draw was made, and printed, before the rule-based orderer existed; the
passages were then annotated by hand (tests/data/narrative_order_*.json).
A passage is a run of whole sentences of one section of a FairytaleQA
story: from the first sentence that starts on a drawn line (the texts are
hard-wrapped) to the first sentence end 350 characters later; passages
longer than 800 characters are skipped. Half of
each set is drawn among passages with a temporal cue (a past perfect
"had <verb>ed/en", or after / before / when / until / as soon as), half
among all passages, so that both in-order and out-of-order event pairs are
there. The held-out set comes from stories not in the development set.

    python experiments/narrative_order_passages.py            # prints both sets as JSON
"""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

CORPUS = Path(__file__).resolve().parents[2] / "shared" / "data" / "fairytales.jsonl"
CUE = re.compile(r"\bhad (?:been |not )?\w+(?:ed|en|ne|wn|ght|ft)\b|\b(?:after|before|when|until|till|as soon as)\b", re.I)


SENTENCE_END = re.compile(r"[.!?][\'\"\u2019\u201d]*(?=\s|$)")


def windows(corpus: Path) -> list[tuple[str, int, int, str]]:
    out = []
    for line in corpus.read_text(encoding="utf-8").splitlines():
        story = json.loads(line)
        for s, section in enumerate(story["sections"]):
            lines = section.split("\n")
            offset = 0
            for start, line_text in enumerate(lines):
                begin = offset
                offset += len(line_text) + 1
                if not line_text.strip():
                    continue
                if start:
                    # Begin at the first sentence that starts on or after this line.
                    found = SENTENCE_END.search(section, begin - 1)
                    if found is None:
                        continue
                    begin = found.end()
                while begin < len(section) and section[begin].isspace():
                    begin += 1
                end = SENTENCE_END.search(section, begin + 350)
                if end is None or end.end() - begin > 800:
                    continue
                out.append((story["id"], s, start, section[begin : end.end()]))
    return out


def draw(pool: list[tuple[str, int, int, str]], rng: random.Random, cue: int, any_: int, avoid: set[str]) -> list:
    chosen: list[tuple[str, int, int, str]] = []
    used = set(avoid)
    for count, needs_cue in ((cue, True), (any_, False)):
        candidates = [w for w in pool if not needs_cue or CUE.search(w[3])]
        while count:
            window = rng.choice(candidates)
            if window[0] in used:
                continue
            used.add(window[0])
            chosen.append(window)
            count -= 1
    return chosen


def main() -> None:
    pool = windows(CORPUS)
    development = draw(pool, random.Random(2401), 3, 3, set())
    held_out = draw(pool, random.Random(2402), 7, 7, {w[0] for w in development})
    for name, passages in (("development", development), ("held_out", held_out)):
        print(json.dumps({name: [{"id": f"{w[0]}:{w[1]}:{w[2]}", "text": w[3]} for w in passages]}, indent=1))


if __name__ == "__main__":
    main()
