"""The reward protocol.

A reward scores a batch of (prompt, steps) pairs: for each trajectory, one
score per step, the score of step t judging the partial answer steps[:t+1].
How per-step scores become one number for the search is a separate choice
(``aggregate``), as in Puri et al. (2025): ``prod``, ``min``, ``last``, or
``model`` (the whole partial answer fed to the reward as one step).

Scores live on one of two scales, declared by ``Reward.scale``:

* ``"probability"``: in [0, 1], the probability that the partial answer is
  good (PRMs, judges, verifiers);
* ``"log"``: an unbounded log-potential (density ratios, log-likelihoods);
  exp(score) is proportional to the likelihood of "good".

``piscale.smc.potentials`` turns either into log-potentials for the search.

Most rewards read text only. A reward that reads the policy's own token
log-probabilities (self-certainty, ``piscale.rewards.certainty``) declares
``needs_logprobs = True`` and is scored through ``score_with_logprobs``: the
search already holds those numbers from generation, so passing them costs
nothing, and a caller that has texts only gets a clear error from ``score``.
"""

from __future__ import annotations

import abc
from collections.abc import Sequence
from typing import Literal

Scale = Literal["probability", "log"]
Aggregation = Literal["model", "prod", "min", "last"]
AGGREGATIONS: tuple[str, ...] = ("model", "prod", "min", "last")


class Reward(abc.ABC):
    name: str = "reward"
    scale: Scale = "probability"
    outcome_only: bool = False
    """True for rewards that judge only a finished answer (verifiers); the
    search then uses them on finished particles only."""
    needs_logprobs: bool = False
    """True for rewards that read the policy's token log-probabilities; the
    search scores them with ``score_with_logprobs``."""

    @abc.abstractmethod
    async def score(
        self, prompts: Sequence[str], trajectories: Sequence[Sequence[str]]
    ) -> list[list[float]]:
        """Per-step scores: ``result[i][t]`` judges ``trajectories[i][:t+1]``
        as an answer to ``prompts[i]``. ``len(result[i]) == len(trajectories[i])``."""

    async def score_with_logprobs(
        self,
        prompts: Sequence[str],
        trajectories: Sequence[Sequence[str]],
        logprobs: Sequence[Sequence[Sequence[float]]],
    ) -> list[list[float]]:
        """``score`` with the policy's token log-probabilities: ``logprobs[i][t]``
        holds log p(token | everything before it), at temperature 1, for each
        token of step ``trajectories[i][t]``. A reward that does not read them
        ignores them."""
        return await self.score(prompts, trajectories)

    async def close(self) -> None:
        """Free models and caches."""
