"""Best-of-N: sample N complete answers, keep the one the reward likes best.

    x^1..x^N ~ p(x | c)               one batch, whole answers
    answer: argmax_i r(c, x^i)        r aggregated over the answer's steps

With budget 1 and no reward this is plain sampling.
"""

from __future__ import annotations

import numpy as np

from piscale.search.driver import Driver
from piscale.search.layout import Samples
from piscale.search.result import Outcome
from piscale.search.samples import sample_answers
from piscale.search.select import max_weight
from piscale.search.settings import Settings


def layout(budget: int, settings: Settings) -> Samples:
    return Samples(samples=budget)


def reward_optional(layout: Samples) -> bool:
    """One sample needs no reward to be chosen: it is plain sampling."""
    return layout.samples == 1


async def search(driver: Driver, layout: Samples, settings: Settings, rng: np.random.Generator) -> Outcome:
    answers, log_weights = await sample_answers(driver, layout, rng)
    scores = [-np.inf if node.score is None else node.score for node in answers]
    return Outcome(answers, log_weights, max_weight(scores))
