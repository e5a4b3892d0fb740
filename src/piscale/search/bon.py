"""Best-of-N: sample N complete answers, keep the one the reward likes best.

    x^1..x^N ~ p(x | c)               one batch, whole answers
    answer: argmax_i r(c, x^i)        r aggregated over the answer's steps

With budget 1 and no reward this is plain sampling.
"""

from __future__ import annotations

import numpy as np

from piscale.search.driver import Driver
from piscale.search.node import Node
from piscale.search.result import Outcome
from piscale.search.settings import Settings
from piscale.search.select import max_weight


def layout(budget: int, settings: Settings) -> dict[str, int]:
    return {"samples": budget}


def record(driver: Driver, answers: list[Node], log_weights: list[float | None]) -> None:
    """Complete samples form one column of the trace."""
    if driver.trace is not None:
        driver.trace.step(answers, log_weights, step=1, origins=[None] * len(answers))


def outcome_weights(driver: Driver, answers: list[Node]) -> list[float | None]:
    """The logit-scale potential of each sample's score (None if unscored)."""
    potentials = driver.potentials(answers, "paper") * driver.settings.softmax_temperature
    return [None if node.score is None else float(p) for node, p in zip(answers, potentials)]


async def search(driver: Driver, shape: dict[str, int], settings: Settings, rng: np.random.Generator) -> Outcome:
    answers = await driver.sample(shape["samples"], rng)
    log_weights = outcome_weights(driver, answers)
    record(driver, answers, log_weights)
    scores = [-np.inf if node.score is None else node.score for node in answers]
    return Outcome(answers, log_weights, max_weight(scores))
