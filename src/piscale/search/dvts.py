"""Diverse verifier tree search (Beeching, Tunstall & Rush 2024; Puri et al. 2025 baseline).

    N = budget, M = beam_width
    N/M independent subtrees; each keeps only its best partial answer and
    expands it M times per step (greedy in its own subtree)
    answer: the best-scoring finished answer over the subtrees

Splitting the budget into independent subtrees keeps the search diverse where
one beam search would collapse onto a few prefixes. See ``piscale.search.tree``.
"""

from __future__ import annotations

import numpy as np

from piscale.search.driver import Driver
from piscale.search.layout import Subtrees, per_expansion
from piscale.search.result import Outcome
from piscale.search.settings import Settings
from piscale.search.tree import tree_search


def layout(budget: int, settings: Settings) -> Subtrees:
    return Subtrees(subtrees=per_expansion(budget, settings.beam_width, "subtrees"), beam_width=settings.beam_width)


async def search(driver: Driver, layout: Subtrees, settings: Settings, rng: np.random.Generator) -> Outcome:
    return await tree_search(driver, rng, groups=layout.subtrees, keep=1, width=layout.beam_width)
