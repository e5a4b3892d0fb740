"""Self-consistency (Wang et al. 2023): the most frequent final answer.

    x^1..x^N ~ p(x | c)
    answer: the final answer given by the most samples (equivalent answers
            pooled by ``piscale.grading``; the earliest answer on ties),
            shown by the first sample that gives it

No reward is needed. When one is given, the samples are scored too, so that
their scores are reported with the candidates; the vote ignores them.
"""

from __future__ import annotations

import numpy as np

from piscale.grading import extract_answer
from piscale.search.driver import Driver
from piscale.search.layout import Samples
from piscale.search.result import Outcome
from piscale.search.samples import sample_answers
from piscale.search.select import group_answers_async, heaviest_group
from piscale.search.settings import Settings


def layout(budget: int, settings: Settings) -> Samples:
    return Samples(samples=budget)


async def search(driver: Driver, layout: Samples, settings: Settings, rng: np.random.Generator) -> Outcome:
    answers, log_weights = await sample_answers(driver, layout, rng)
    groups = await group_answers_async([extract_answer(node.response()) for node in answers])
    winner = heaviest_group(groups, [1.0] * len(answers))
    chosen = groups.index(winner) if winner is not None else 0
    return Outcome(answers, log_weights, chosen)
