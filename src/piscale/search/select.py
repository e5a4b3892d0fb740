"""Choosing the answer from a final population.

* ``max_weight``: the particle with the largest final weight (Puri et al.);
* ``weighted_vote``: total weight per final answer, equivalent answers
  pooled; the heaviest answer wins, represented by its heaviest particle;
* ``choose``: one of the two by the ``selection`` setting's name
  (``choose_async`` inside a search, grading in the grading pool);
* ``tied_answers``: whether the largest weight is shared by particles with
  different answers, so that ``max_weight``'s pick among them is arbitrary;
* ``group_answers``: which responses give the same answer, in the sense of
  ``piscale.grading`` (symbolic or numeric equivalence), shared by
  self-consistency, weighted best-of-N and the weighted vote;
  ``group_answers_async`` grades in the installed grading pool, so that a
  server's event loop never runs math-verify.
"""

from __future__ import annotations

from collections.abc import Generator, Sequence

import numpy as np

from piscale.grading import answers_equal, answers_equal_async, normalize_answer, normalize_answer_async

Grading = tuple[str, ...]
"""A grading the grouping needs: ("key", answer) for ``normalize_answer``,
("equal", answer, representative) for ``answers_equal``."""


def _grouping(answers: Sequence[str | None]) -> Generator[Grading, object, list[int | None]]:
    """The grouping of ``group_answers`` as a generator that yields each
    grading it needs and is sent its result, so that the same grouping runs
    with the gradings done here or in a grading pool."""
    key_group: dict[object, int] = {}
    representatives: list[str] = []
    groups: list[int | None] = []
    for answer in answers:
        if answer is None:
            groups.append(None)
            continue
        key = yield ("key", answer)
        if key not in key_group:
            match = None
            for group, representative in enumerate(representatives):
                if (yield ("equal", answer, representative)):
                    match = group
                    break
            if match is None:
                match = len(representatives)
                representatives.append(answer)
            key_group[key] = match
        groups.append(key_group[key])
    return groups


def group_answers(answers: Sequence[str | None]) -> list[int | None]:
    """A group index per answer (None for no answer). Answers are first keyed
    by ``normalize_answer``; keys whose first answers are equivalent by
    ``answers_equal`` share a group. Groups are numbered by first appearance."""
    grading = _grouping(answers)
    result: object = None
    try:
        while True:
            request = grading.send(result)
            result = normalize_answer(request[1]) if request[0] == "key" else answers_equal(request[1], request[2])
    except StopIteration as done:
        return done.value


async def group_answers_async(answers: Sequence[str | None]) -> list[int | None]:
    """``group_answers`` for a search on an event loop: each grading runs in
    the installed grading pool (``piscale.grading.install_pool``), under its
    time limit, or here when none is installed. An answer whose grading runs
    out of time keys by its text and equals no other answer."""
    slow: set[str] = set()
    grading = _grouping(answers)
    result: object = None
    try:
        while True:
            request = grading.send(result)
            if request[0] == "key":
                result = await normalize_answer_async(request[1], slow)
            else:
                result = await answers_equal_async(request[1], request[2], slow)
    except StopIteration as done:
        return done.value


def max_weight(log_weights: Sequence[float]) -> int:
    """Index of the largest log-weight (the first one on ties)."""
    values = np.asarray(log_weights, dtype=float)
    if values.size == 0:
        raise ValueError("cannot choose from an empty population")
    return int(np.argmax(np.where(np.isnan(values), -np.inf, values)))


def heaviest_group(groups: Sequence[int | None], masses: Sequence[float]) -> int | None:
    """The group with the largest total mass (the earliest group on ties), or
    None when no item has a group."""
    totals: dict[int, float] = {}
    for group, mass in zip(groups, masses):
        if group is not None:
            totals[group] = totals.get(group, 0.0) + float(mass)
    if not totals:
        return None
    return max(totals, key=lambda g: (totals[g], -g))


def weighted_vote(
    answers: Sequence[str | None], log_weights: Sequence[float], groups: Sequence[int | None] | None = None
) -> int:
    """Index of the heaviest particle of the answer with the most total
    normalised weight; plain ``max_weight`` when no particle has an answer.
    ``groups`` are the answers' ``group_answers``, when already known."""
    values = np.asarray(log_weights, dtype=float)
    finite = np.isfinite(values)
    weights = np.zeros_like(values)
    if finite.any():
        weights[finite] = np.exp(values[finite] - values[finite].max())
    if groups is None:
        groups = group_answers(answers)
    winner = heaviest_group(groups, weights)
    if winner is None:
        return max_weight(log_weights)
    members = [i for i, g in enumerate(groups) if g == winner]
    return members[int(np.argmax(weights[members]))]


def choose(
    selection: str,
    answers: Sequence[str | None],
    log_weights: Sequence[float],
    groups: Sequence[int | None] | None = None,
) -> int:
    """Index of the particle that ``selection`` (``max-weight`` or
    ``weighted-vote``) picks from a final population. It reads only the
    final answers and weights, so a stored population can be re-chosen.
    ``groups`` are the answers' ``group_answers``, when already known."""
    if selection == "weighted-vote":
        return weighted_vote(answers, log_weights, groups)
    if selection == "max-weight":
        return max_weight(log_weights)
    raise ValueError(f"unknown selection {selection!r}; choose max-weight or weighted-vote")


async def choose_async(selection: str, answers: Sequence[str | None], log_weights: Sequence[float]) -> int:
    """``choose`` for a search on an event loop: a weighted vote groups the
    answers with ``group_answers_async`` (in the grading pool, if any)."""
    groups = await group_answers_async(answers) if selection == "weighted-vote" else None
    return choose(selection, answers, log_weights, groups)


def tied_answers(answers: Sequence[str | None], log_weights: Sequence[float]) -> bool:
    """Whether particles with different final answers (no answer counting as
    one) share the largest log-weight. ``max_weight`` then returns the first
    of them: the answer is decided by slot order, not by the reward. Coarse
    rewards (a verifier, the arithmetic checker) make this common."""
    values = np.asarray(log_weights, dtype=float)
    values = np.where(np.isnan(values), -np.inf, values)
    if values.size == 0 or np.isneginf(top := values.max()):
        return False
    return len(set(group_answers([answers[i] for i in np.flatnonzero(values == top)]))) > 1
