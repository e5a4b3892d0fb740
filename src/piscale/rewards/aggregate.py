"""From per-step scores to one number per trajectory.

A reward returns scores s_1..s_T for a trajectory of T steps, s_t judging the
partial answer x_{<=t}. Puri et al. (2025) compare four ways of turning them
into the likelihood r(c, x_{<=T}) that weights a particle:

* ``prod``: r = prod_t s_t (the partial answer is good if every step is good,
  steps judged independently);
* ``min``: r = min_t s_t (an answer is as good as its weakest step);
* ``last``: r = s_T;
* ``model``: the whole partial answer, its steps joined by a blank line, is
  given to the reward as *one* step, and r is that single score. The reward
  sees the whole reasoning at once; in the paper this scaled best.

On the log scale (``Reward.scale == "log"``) a score is a log-potential, so the
product of potentials is the *sum* of the scores; ``min`` and ``last`` are the
same on both scales because log is monotone.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from piscale.rewards.base import AGGREGATIONS, Aggregation, Reward, Scale

STEP_JOINER = "\n\n"
"""Steps of an answer are separated by a blank line (the paper's step delimiter)."""


def join_steps(steps: Sequence[str]) -> str:
    """The text of a partial answer: its steps, stripped of the surrounding
    whitespace a generator leaves (a step usually ends with its "\\n\\n" stop
    string), joined by a blank line."""
    return STEP_JOINER.join(step.strip() for step in steps)


def answer_steps(text: str) -> list[str]:
    """The steps of a written answer: its parts between blank lines, blank
    parts left out, so that ``join_steps`` gives the text back up to
    whitespace. An answer with nothing but blank parts is one step, as written."""
    return [part for part in text.split(STEP_JOINER) if part.strip()] or [text]


def check_aggregation(how: str) -> Aggregation:
    if how not in AGGREGATIONS:
        raise ValueError(f"unknown aggregation {how!r}; choose one of {', '.join(AGGREGATIONS)}")
    return how  # type: ignore[return-value]


def aggregate(step_scores: Sequence[float], how: Aggregation, scale: Scale = "probability") -> float:
    """One number from the step scores of one trajectory.

    For ``how == "model"`` ``step_scores`` must be the single score the reward
    gave to the whole partial answer (``score_trajectories`` makes that call).
    """
    check_aggregation(how)
    if scale not in ("probability", "log"):
        raise ValueError(f"unknown reward scale {scale!r}; expected 'probability' or 'log'")
    if len(step_scores) == 0:
        raise ValueError("cannot aggregate the scores of a trajectory with no steps")
    if how == "model":
        if len(step_scores) != 1:
            raise ValueError(
                f"'model' aggregation takes the one score of the whole partial answer scored as a "
                f"single step, got {len(step_scores)} scores; use score_trajectories(..., 'model')"
            )
        return float(step_scores[0])
    if how == "last":
        return float(step_scores[-1])
    if how == "min":
        return float(min(step_scores))
    if scale == "log":
        return float(math.fsum(step_scores))
    return float(math.prod(step_scores))


async def score_trajectories(
    reward: Reward,
    prompts: Sequence[str],
    trajectories: Sequence[Sequence[str]],
    aggregation: Aggregation = "model",
    logprobs: Sequence[Sequence[Sequence[float]]] | None = None,
) -> list[float]:
    """Aggregated score of each trajectory, in one batched call to ``reward``.

    ``model`` sends each partial answer as a single step (its steps joined by a
    blank line); the other aggregations send the steps and combine the
    per-step scores with ``aggregate``.

    ``logprobs[i][t]``, when given, are the policy's token log-probabilities
    of step ``trajectories[i][t]``; they reach rewards that declare
    ``needs_logprobs`` (``model`` joins them as it joins the steps, so the
    tokens and their log-probabilities stay together) and are ignored by
    the others.
    """
    check_aggregation(aggregation)
    if len(prompts) != len(trajectories):
        raise ValueError(
            f"got {len(prompts)} prompts but {len(trajectories)} trajectories; they must pair up"
        )
    for i, steps in enumerate(trajectories):
        if isinstance(steps, str):
            raise TypeError(f"trajectory {i} is a string; pass a list of step strings")
        if len(steps) == 0:
            raise ValueError(f"trajectory {i} has no steps; there is nothing to score")
    if logprobs is not None:
        if len(logprobs) != len(trajectories):
            raise ValueError(
                f"got log-probabilities for {len(logprobs)} trajectories but {len(trajectories)} trajectories"
            )
        for i, (steps, step_logprobs) in enumerate(zip(trajectories, logprobs)):
            if len(step_logprobs) != len(steps):
                raise ValueError(
                    f"trajectory {i} has {len(steps)} steps but log-probabilities for {len(step_logprobs)}; "
                    "pass one list of token log-probabilities per step"
                )
    if aggregation == "model":
        sent: list[list[str]] = [[join_steps(steps)] for steps in trajectories]
        sent_logprobs = (
            [[[float(v) for step in steps for v in step]] for steps in logprobs] if logprobs is not None else None
        )
    else:
        sent = [list(steps) for steps in trajectories]
        sent_logprobs = [[list(step) for step in steps] for steps in logprobs] if logprobs is not None else None
    if reward.needs_logprobs and sent_logprobs is not None:
        step_scores = await reward.score_with_logprobs(list(prompts), sent, sent_logprobs)
    else:
        # Without log-probabilities a reward that needs them raises from
        # ``score`` itself, with the reason.
        step_scores = await reward.score(list(prompts), sent)
    if len(step_scores) != len(sent):
        raise RuntimeError(
            f"reward {reward.name!r} returned {len(step_scores)} results for {len(sent)} trajectories"
        )
    return [aggregate(scores, aggregation, reward.scale) for scores in step_scores]
