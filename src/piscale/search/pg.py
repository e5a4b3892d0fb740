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
"""

from __future__ import annotations

import numpy as np

from piscale.search.driver import Driver
from piscale.search.layout import Sweeps, particles_per_sweep
from piscale.search.node import Node
from piscale.search.result import Outcome
from piscale.search.pf import choose, smc_sweep
from piscale.search.settings import Settings
from piscale.smc import multinomial, normalize


def layout(budget: int, settings: Settings) -> Sweeps:
    particles = particles_per_sweep(budget, iterations=settings.iterations)
    return Sweeps(particles=particles, iterations=settings.iterations)


def draw_reference(nodes: list[Node], log_weights: np.ndarray, rng: np.random.Generator) -> list[Node]:
    """The lineage of one final particle drawn from the normalised weights."""
    index = int(multinomial(normalize(log_weights), 1, rng)[0])
    return nodes[index].lineage()


async def search(driver: Driver, layout: Sweeps, settings: Settings, rng: np.random.Generator) -> Outcome:
    reference: list[Node] | None = None
    for iteration in range(layout.iterations):
        nodes, log_weights = await smc_sweep(driver, layout.particles, rng, reference=reference, iteration=iteration)
        if iteration + 1 < layout.iterations:
            reference = draw_reference(nodes, log_weights, rng)
            if driver.trace is not None:
                driver.trace.event("reference", iteration=iteration + 1, steps=[n.text for n in reference])
    return choose(nodes, log_weights, settings.selection)
