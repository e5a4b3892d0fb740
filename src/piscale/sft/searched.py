"""Search outputs to SFT data: rejection-sampling fine-tuning (expert
iteration) as one pipeline, collect -> sft -> evaluate.

A search on a training problem (particle filtering or best-of-N from
``piscale eval``, or the rollouts of ``piscale prm collect``, each of which
is a best-of-N candidate under the verifier) yields answers; the verifier
grades each against the problem's reference. The answers kept are

* verified correct: the chosen answer of a PF/BoN search whose graded row is
  correct, or a rollout graded correct (rejection sampling);
* finished: ended by the model's end-of-turn, not cut at a token cap, so the
  model learns where to stop;
* distinct within their problem (after trimming whitespace), at most
  ``per_problem`` of them, first found first.

Each kept answer becomes a ``prompt``/``completion`` record carrying the
exact system message and user message the search used, so the fine-tuned
model is trained on the prompt it is later asked with, and the provenance:
problem id, algorithm, budget, seed and source.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class SearchedAnswer:
    problem_id: str
    system: str | None
    question: str
    """the user message as the search sent it (the prompt template applied)."""
    text: str
    correct: bool
    finished: bool
    algorithm: str
    budget: int
    seed: int
    source: str
    """where it came from (database and configuration)."""


def sft_records(answers: Iterable[SearchedAnswer], per_problem: int | None = None) -> tuple[list[dict], dict[str, int]]:
    """The SFT records of the kept answers, and how many answers were left
    out for each reason."""
    if per_problem is not None and per_problem < 1:
        raise ValueError(f"per_problem must be >= 1, got {per_problem}")
    records: list[dict] = []
    kept: dict[str, set[str]] = {}
    left_out: dict[str, int] = {}

    def leave(reason: str) -> None:
        left_out[reason] = left_out.get(reason, 0) + 1

    for answer in answers:
        if not answer.correct:
            leave("not verified correct")
            continue
        if not answer.finished:
            leave("cut off before its end")
            continue
        seen = kept.setdefault(answer.problem_id, set())
        key = answer.text.strip()
        if key in seen:
            leave("a duplicate of a kept answer to the same problem")
            continue
        if per_problem is not None and len(seen) >= per_problem:
            leave(f"beyond {per_problem} per problem")
            continue
        seen.add(key)
        prompt = ([{"role": "system", "content": answer.system}] if answer.system else []) + [
            {"role": "user", "content": answer.question}
        ]
        records.append(
            {
                "prompt": prompt,
                "completion": [{"role": "assistant", "content": answer.text}],
                "problem_id": answer.problem_id,
                "algorithm": answer.algorithm,
                "budget": answer.budget,
                "seed": answer.seed,
                "source": answer.source,
            }
        )
    return records, left_out


def split_by_problem(records: list[dict], fraction: float, seed: int = 0) -> tuple[list[dict], list[dict]]:
    """(training, held-out) records: a seeded ``fraction`` of the problems,
    with all their answers, is held out, so no held-out problem is trained on."""
    if not 0 < fraction < 1:
        raise ValueError(f"the held-out fraction must be in (0, 1), got {fraction}")
    problems = sorted({r["problem_id"] for r in records})
    held = max(1, round(fraction * len(problems)))
    if held >= len(problems):
        raise ValueError(f"{len(problems)} problems are too few to hold out {fraction:.0%} of them and train on the rest")
    rng = np.random.default_rng(seed)
    out = {problems[i] for i in rng.permutation(len(problems))[:held]}
    return [r for r in records if r["problem_id"] not in out], [r for r in records if r["problem_id"] in out]
