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

    @abc.abstractmethod
    async def score(
        self, prompts: Sequence[str], trajectories: Sequence[Sequence[str]]
    ) -> list[list[float]]:
        """Per-step scores: ``result[i][t]`` judges ``trajectories[i][:t+1]``
        as an answer to ``prompts[i]``. ``len(result[i]) == len(trajectories[i])``."""

    async def close(self) -> None:
        """Free models and caches."""
