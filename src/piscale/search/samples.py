"""Complete answers sampled in one batch: the part that best-of-N, weighted
best-of-N and self-consistency share.

    x^1..x^N ~ p(x | c)          one backend call, whole answers
    r^i = r(c, x^i)              one reward call (unless there is no reward)

Each sample's log-weight is the logit-scale potential of its score (the
paper's potential, without the softmax temperature), so that candidates of
every algorithm carry comparable numbers; the samples form one column of the
trace. The algorithms differ only in how they choose among them.
"""

from __future__ import annotations

import numpy as np

from piscale.search.driver import Driver
from piscale.search.layout import Samples
from piscale.search.node import Node


async def sample_answers(driver: Driver, layout: Samples, rng: np.random.Generator) -> tuple[list[Node], list[float | None]]:
    """``layout.samples`` complete answers, scored, with their log-weights."""
    answers = await driver.sample(layout.samples, rng)
    log_weights = outcome_weights(driver, answers)
    if driver.trace is not None:
        driver.trace.step(answers, log_weights, step=1, origins=[None] * len(answers))
    return answers, log_weights


def outcome_weights(driver: Driver, answers: list[Node]) -> list[float | None]:
    """The logit-scale potential of each sample's score (None if unscored)."""
    potentials = driver.potentials(answers, "paper") * driver.settings.softmax_temperature
    return [None if node.score is None else float(p) for node, p in zip(answers, potentials)]
