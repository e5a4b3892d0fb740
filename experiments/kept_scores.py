"""Reward scores of stored answers, kept on disk so that a long reading resumes.

``experiments/reward_table.py`` reads some rewards slowly (self-certainty
through llama.cpp reads about as fast as the policy writes). It keeps each
reward term's scores of each answer, and of the answer's every prefix, in a
JSON-lines file of its own, and reads only the answers the file lacks.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np


def kept_scores(folder: Path, term: str) -> ScoreFile:
    """The file in ``folder`` that keeps one reward term's scores."""
    return ScoreFile(folder / f"{term.partition(':')[0]}-{hashlib.sha256(term.encode()).hexdigest()[:12]}.jsonl")


class ScoreFile:
    """One reward's scores of answers (the whole answer's and every
    prefix's), kept as JSON lines keyed by question and answer, so that a
    killed table resumes where it stopped and a larger set of the same
    answers reads only the new ones. ``ScoreFile(None)`` keeps them in memory."""

    def __init__(self, path: Path | None):
        self.path = path
        self.found: dict[str, tuple[float, list[float]]] = {}
        if path is not None and path.is_file():
            for line in path.read_text().splitlines():
                if line.strip():
                    record = json.loads(line)
                    self.found[record["key"]] = (record["final"], record["prefixes"])

    @staticmethod
    def key(question: str, text: str) -> str:
        return hashlib.sha256(json.dumps([question, text]).encode()).hexdigest()

    def get(self, question: str, text: str) -> tuple[float, list[float]] | None:
        return self.found.get(self.key(question, text))

    def put(self, problem_id: str, question: str, texts: list[str], finals: list[float],
            prefixes: list[np.ndarray]) -> None:
        lines = []
        for text, final, steps in zip(texts, finals, prefixes):
            key = self.key(question, text)
            self.found[key] = (float(final), [float(v) for v in steps])
            lines.append(json.dumps({"key": key, "problem_id": problem_id, "final": self.found[key][0],
                                     "prefixes": self.found[key][1]}))
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with self.path.open("a") as out:  # one problem at a time: a kill loses at most the one in flight
                out.write("".join(line + "\n" for line in lines))
