"""Beam search guided by a process reward (Snell et al. 2024; Puri et al. 2025 baseline).

    N = budget, M = beam_width
    keep the N/M best partial answers by reward; expand each M times; repeat
    answer: the best-scoring finished beam

See ``piscale.search.tree`` for the loop it shares with DVTS.
"""

from __future__ import annotations

import numpy as np

from piscale.search.driver import Driver
from piscale.search.layout import Beams, per_expansion
from piscale.search.result import Outcome
from piscale.search.settings import Settings
from piscale.search.tree import tree_search


def layout(budget: int, settings: Settings) -> Beams:
    return Beams(beams=per_expansion(budget, settings.beam_width, "beams"), beam_width=settings.beam_width)


async def search(driver: Driver, layout: Beams, settings: Settings, rng: np.random.Generator) -> Outcome:
    return await tree_search(driver, rng, groups=1, keep=layout.beams, width=layout.beam_width)
