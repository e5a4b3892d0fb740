"""Particle filtering (Puri et al. 2025, Algorithm 1).

    particles x^1..x^N start at the prompt, all weights equal
    repeat
        each unfinished particle writes one step        x_t ~ p(. | c, x_<t)
        score every new partial answer                   r_t = r(c, x_<=t)
        reweight                                         (see below)
        stop when every particle is finished
        if resampling is due:                            (every step, or ESS/N < threshold)
            ancestors a^1..a^N ~ scheme(w)               finished particles are copied,
            x^i <- x^{a^i}                               never extended
    answer: the particle with the largest final weight (or a weighted vote)

Reweighting (``piscale.smc``): with the ``paper`` potential the weight is
logit(r_t) / τ, recomputed from the current score; with ``incremental`` the
log-weight grows by (log r_t - log r_{t-1}) / τ and is reset to equal weights
after resampling, so the final weighted particles target p(x | c) · r(x)^{1/τ},
and the sweep estimates that target's normalising constant E_p[r(x)^{1/τ}]
(``log_evidence``). A finished particle's score does not change, so it keeps
its last weight. The loop itself is the SMC kernel, ``piscale.search.kernel``.
"""

from __future__ import annotations

import numpy as np

from piscale.search.driver import Driver
from piscale.search.kernel import outcome, sweep
from piscale.search.layout import Particles
from piscale.search.result import Outcome
from piscale.search.settings import Settings


def layout(budget: int, settings: Settings) -> Particles:
    return Particles(particles=budget)


async def search(driver: Driver, layout: Particles, settings: Settings, rng: np.random.Generator) -> Outcome:
    final = await sweep(driver, layout.particles, rng, hook=driver.trace)
    return await outcome(final, settings.selection, final.log_z)
