"""From a stored search result to graded rows.

Grading goes through ``piscale.grading`` (math-verify): the predicted final
answer is compared with the reference symbolically or numerically, so
``\\frac{1}{2}``, ``1/2`` and ``0.5`` all match a reference of ``0.5``. A
result with no final answer is wrong.

For best-of-N, weighted best-of-N and self-consistency, one search at budget
N yields a row for every requested budget b <= N (see
``piscale.eval.subsample``): the b = N row is the search itself, the others
are flagged ``subsampled`` and carry search-and-learn's first-b estimate as
their answer and the all-subsets mean as ``expected_accuracy``. Every other
algorithm yields one row whose ``expected_accuracy`` is its 0/1 grade.

Particle filtering, particle Gibbs and parallel tempering pick their answer
from the final population only after the last step (``selection``: the
heaviest particle, or a weighted vote). The stored population therefore
gives, through ``answer_by_selection``, exactly the answer the same search
would have returned with the other rule.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence

import numpy as np

from piscale.eval.store import ResultRow
from piscale.eval.subsample import SELECTIONS, Samples, expected_accuracy, first_subset_choice
from piscale.grading import answers_equal
from piscale.search.select import choose, group_answers

SUBSAMPLED_ALGORITHMS = frozenset(SELECTIONS)
"""Algorithms whose smaller budgets are computed from the samples of the largest."""

USAGE_FIELDS = ("generated_tokens", "prompt_tokens", "reward_calls", "wall_time")


def grade(answer: str | None, reference: str) -> bool:
    """Whether a final answer matches the reference (None never does)."""
    return answers_equal(answer, reference)


def rows_from_result(
    result: Mapping,
    problem_id: str,
    reference: str,
    budgets: Sequence[int],
    reward_scale: str = "probability",
    variant: str = "",
    selection: str | None = None,
) -> list[ResultRow]:
    """Graded rows for ``budgets`` from one search result (a
    ``SearchResult.to_dict()``). Budgets other than the search's own are only
    allowed for the subsampled algorithms, and must not exceed it.
    ``reward_scale`` is the reward's ``scale``, which weighted best-of-N needs
    to pool rewards the way the search did; ``variant`` labels the options
    the search ran with. ``selection`` gives the rows of another of the
    subsampled algorithms, chosen from this search's samples (they all draw N
    independent samples and differ only in the pick)."""
    searched, run_budget, seed = str(result["algorithm"]), int(result["budget"]), int(result["seed"])
    algorithm = selection or searched
    if algorithm != searched and not {algorithm, searched} <= SUBSAMPLED_ALGORITHMS:
        raise ValueError(f"the samples of {searched} cannot give rows for {algorithm}")
    usage = _usage(result)
    answer = result.get("answer")
    if algorithm not in SUBSAMPLED_ALGORITHMS:
        if list(budgets) != [run_budget]:
            raise ValueError(f"{algorithm} at budget {run_budget} cannot give rows for budgets {list(budgets)}")
        correct = grade(answer, reference)
        return [
            ResultRow(
                problem_id=problem_id,
                algorithm=algorithm,
                budget=run_budget,
                seed=seed,
                reference=reference,
                answer=answer,
                correct=correct,
                expected_accuracy=float(correct),
                subsampled=False,
                samples_from=run_budget,
                subsets=1,
                variant=variant,
                **usage,
            )
        ]
    candidates = list(result.get("candidates") or [])
    if len(candidates) != run_budget:
        raise ValueError(
            f"{algorithm} at budget {run_budget} returned {len(candidates)} samples; "
            "subsampling needs exactly one per unit of budget"
        )
    samples = samples_of(candidates, reference, reward_scale)
    rows = []
    for budget in sorted(set(budgets)):
        if not 1 <= budget <= run_budget:
            raise ValueError(f"budget {budget} is outside 1..{run_budget}, the samples of this search")
        estimate = expected_accuracy(algorithm, samples, budget, seed=subset_seed(problem_id, seed, budget))
        if budget == run_budget and algorithm == searched:
            chosen = answer
        else:
            chosen = candidates[first_subset_choice(algorithm, samples, budget)].get("answer")
        scale = budget / run_budget
        rows.append(
            ResultRow(
                problem_id=problem_id,
                algorithm=algorithm,
                budget=budget,
                seed=seed,
                reference=reference,
                answer=chosen,
                correct=grade(chosen, reference),
                expected_accuracy=estimate.accuracy,
                subsampled=budget != run_budget,
                samples_from=run_budget,
                subsets=estimate.subsets,
                variant=variant,
                **{name: value * scale for name, value in usage.items()},
            )
        )
    return rows


def answer_by_selection(result: Mapping, selection: str) -> str | None:
    """The final answer that the search behind ``result`` (a stored
    ``SearchResult.to_dict()`` of an algorithm with a ``selection`` option)
    returns under ``selection``, recomputed from its final candidates. A
    candidate stored without a log-weight had weight zero."""
    if not result.get("candidates"):
        raise ValueError(f"this {result.get('algorithm')} result stores no final candidates to choose from")
    answers, log_weights = final_population(result)
    return answers[choose(selection, answers, log_weights)]


def final_population(result: Mapping) -> tuple[list[str | None], list[float]]:
    """The final answers and log-weights of a stored search result's
    candidates. A candidate stored without a log-weight had weight zero."""
    candidates = result.get("candidates") or []
    answers = [c.get("answer") for c in candidates]
    log_weights = [-np.inf if c.get("log_weight") is None else float(c["log_weight"]) for c in candidates]
    return answers, log_weights


def samples_of(candidates: Sequence[Mapping], reference: str, reward_scale: str = "probability") -> Samples:
    """The samples of a best-of-N style search, with answers grouped as the
    search groups them (``piscale.search.select.group_answers``), each group
    graded once, and vote masses as weighted best-of-N computes them."""
    answers = [candidate.get("answer") for candidate in candidates]
    groups = group_answers(answers)
    group_correct: dict[int, bool] = {}
    for answer, group in zip(answers, groups):
        if group is not None and group not in group_correct:
            group_correct[group] = grade(answer, reference)
    scores = np.array([-np.inf if c.get("score") is None else float(c["score"]) for c in candidates], dtype=float)
    finite = np.isfinite(scores)
    if reward_scale == "log" and finite.any():
        # Log-scale rewards are pooled as likelihoods, exp(score - max), as wbon does.
        masses = np.where(finite, np.exp(scores - scores[finite].max()), 0.0)
    else:
        masses = np.where(finite, scores, 0.0)
    return Samples.build(groups, group_correct, [None if not f else s for s, f in zip(scores, finite)], masses)


def subset_seed(problem_id: str, seed: int, budget: int) -> int:
    """A seed for the random subsets of one cell, stable across runs and
    machines (Python's ``hash`` of a string is not)."""
    digest = hashlib.sha256(f"{problem_id}\0{seed}\0{budget}".encode()).digest()
    return int.from_bytes(digest[:8], "little")


def _usage(result: Mapping) -> dict[str, float]:
    usage = result.get("usage") or {}
    missing = [name for name in USAGE_FIELDS if name not in usage]
    if missing:
        raise ValueError(f"search result usage lacks {', '.join(missing)}; got {sorted(usage)}")
    return {name: float(usage[name]) for name in USAGE_FIELDS}


