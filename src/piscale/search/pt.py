"""Parallel tempering (Puri et al. 2025, Algorithm 3).

    budget = N particles x M chains x T iterations
    chain k runs particle Gibbs at temperature T_k (T_1 = 1 < ... < T_M):
        its potentials are divided by T_k, so it targets π_k(x) ∝ p(x|c) exp(Φ(x)/T_k)
    after each iteration, every chain draws its reference x_k; then for
    k = 1..M-1 the neighbours swap references with probability
        min(1, π_{k+1}(x_k) π_k(x_{k+1}) / (π_k(x_k) π_{k+1}(x_{k+1})))
    answer: chosen from the coldest chain's last particles

Hot chains see flattened rewards and explore; swaps carry what they find to
the cold chain. Chains run concurrently (their steps share the backend's
batches), each with its own random generator, so the result does not depend
on how their calls interleave.
"""

from __future__ import annotations

import asyncio

import numpy as np

from piscale.search.driver import Driver
from piscale.search.layout import Ladder, particles_per_sweep
from piscale.search.node import Node
from piscale.search.result import Outcome
from piscale.search.pf import choose, smc_sweep
from piscale.search.pg import draw_reference
from piscale.search.settings import Settings
from piscale.smc import swap_probability


def layout(budget: int, settings: Settings) -> Ladder:
    if settings.chains < 2:
        raise ValueError(f"parallel tempering needs chains >= 2, got {settings.chains}")
    particles = particles_per_sweep(budget, chains=settings.chains, iterations=settings.iterations)
    return Ladder(particles=particles, chains=settings.chains, iterations=settings.iterations)


async def search(driver: Driver, layout: Ladder, settings: Settings, rng: np.random.Generator) -> Outcome:
    ladder = settings.ladder
    chains = len(ladder)
    chain_rngs = rng.spawn(chains)
    references: list[list[Node] | None] = [None] * chains
    for iteration in range(layout.iterations):
        sweeps = await asyncio.gather(
            *(
                smc_sweep(
                    driver, layout.particles, chain_rngs[k], temperature=ladder[k],
                    reference=references[k], iteration=iteration, chain=k,
                )
                for k in range(chains)
            )
        )
        if iteration + 1 == layout.iterations:
            break
        references = [draw_reference(nodes, weights, chain_rngs[k]) for k, (nodes, weights) in enumerate(sweeps)]
        for k in range(chains - 1):
            colder, hotter = references[k], references[k + 1]
            final = driver.potentials([colder[-1], hotter[-1]])
            probability = swap_probability(final[0], final[1], ladder[k], ladder[k + 1])
            accepted = bool(rng.random() < probability)
            if accepted:
                references[k], references[k + 1] = hotter, colder
            if driver.trace is not None:
                driver.trace.event(
                    "swap", iteration=iteration + 1, chain=k, chains=[k, k + 1],
                    potentials=[float(final[0]), float(final[1])], probability=probability, accepted=accepted,
                )
        if driver.trace is not None:
            for k, reference in enumerate(references):
                driver.trace.event("reference", iteration=iteration + 1, chain=k, steps=[n.text for n in reference])
    nodes, log_weights = sweeps[0]
    return choose(nodes, log_weights, settings.selection)
