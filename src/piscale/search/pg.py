"""Particle Gibbs (Puri et al. 2025, Algorithm 2; Andrieu, Doucet & Holenstein 2010).

    budget = N particles x T iterations
    run particle filtering with N particles
    repeat T - 1 times
        draw a reference trajectory x* from the final weights
        run conditional SMC: N - 1 fresh particles plus x* in slot 0;
            at step t slot 0 holds x*'s step t with its stored reward,
            conditional resampling never removes it (other slots may copy it)
    answer: chosen from the last iteration's particles

Resampling is conditional multinomial (``piscale.smc.conditional_multinomial``),
the scheme for which conditional SMC is exact, so ``resampler`` is not an
option here. Conditional SMC leaves the target invariant, so the iterations form a Markov
chain whose reference trajectories are (with incremental potentials) samples
from p(x | c) · r(x); each iteration can only improve on the reference it was
given, because the reference competes in every resampling step.

The evidence estimate (``log_evidence``) is the first sweep's: that sweep
is plain particle filtering, while a conditional sweep's estimate is biased
by the reference it was handed.
"""

from __future__ import annotations

import numpy as np

from piscale.search.driver import Driver
from piscale.search.kernel import Sweep, draw_reference, outcome, sweep
from piscale.search.layout import Sweeps, particles_per_sweep
from piscale.search.node import Node
from piscale.search.result import Outcome
from piscale.search.settings import Settings


def layout(budget: int, settings: Settings) -> Sweeps:
    particles = particles_per_sweep(budget, iterations=settings.iterations)
    return Sweeps(particles=particles, iterations=settings.iterations)


async def search(driver: Driver, layout: Sweeps, settings: Settings, rng: np.random.Generator) -> Outcome:
    reference: list[Node] | None = None
    sweeps: list[Sweep] = []
    for iteration in range(layout.iterations):
        sweeps.append(
            await sweep(driver, layout.particles, rng, reference=reference, hook=driver.trace, iteration=iteration)
        )
        if iteration + 1 < layout.iterations:
            reference = draw_reference(sweeps[-1], rng)
            if driver.trace is not None:
                driver.trace.event("reference", iteration=iteration + 1, steps=[n.text for n in reference])
    return await outcome(sweeps[-1], settings.selection, sweeps[0].log_z)
