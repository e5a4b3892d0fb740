"""Weighted best-of-N: the answer with the largest total reward.

    x^1..x^N ~ p(x | c)
    for each distinct final answer a:  R(a) = sum_{i: answer(x^i) = a} r(c, x^i)
    answer: argmax_a R(a), shown by its best-scoring sample

Answers are pooled when ``piscale.grading`` finds them equivalent. Rewards on
the log scale are pooled as exp(score - max score), i.e. as likelihoods.
"""

from __future__ import annotations

import numpy as np

from piscale.grading import extract_answer
from piscale.search.driver import Driver
from piscale.search.layout import Samples
from piscale.search.result import Outcome
from piscale.search.samples import sample_answers
from piscale.search.select import group_answers_async, heaviest_group, max_weight
from piscale.search.settings import Settings


def layout(budget: int, settings: Settings) -> Samples:
    return Samples(samples=budget)


async def search(driver: Driver, layout: Samples, settings: Settings, rng: np.random.Generator) -> Outcome:
    answers, log_weights = await sample_answers(driver, layout, rng)
    scores = np.array([-np.inf if node.score is None else node.score for node in answers])
    if driver.reward is not None and driver.reward.scale == "log" and np.isfinite(scores).any():
        mass = np.exp(scores - scores[np.isfinite(scores)].max())
    else:
        mass = np.where(np.isfinite(scores), scores, 0.0)
    groups = await group_answers_async([extract_answer(node.response()) for node in answers])
    winner = heaviest_group(groups, mass)
    members = [i for i, g in enumerate(groups) if g == winner] if winner is not None else list(range(len(answers)))
    chosen = members[max_weight(scores[members])]
    return Outcome(answers, log_weights, chosen)
