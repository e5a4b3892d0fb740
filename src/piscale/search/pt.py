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
on how their calls interleave. The chain temperatures T_k (the
``temperatures`` option) are the kernel's ``tempering``; they multiply the
softmax temperature τ of the weights and have nothing to do with the LM's
sampling temperature. The evidence estimate is the coldest chain's first,
unconditional sweep's: log E_p[r(x)^{1/(τ T_1)}] with the incremental
potential.
"""

from __future__ import annotations

import asyncio

import numpy as np

from piscale.search.driver import Driver
from piscale.search.kernel import Sweep, draw_reference, outcome, sweep
from piscale.search.layout import Ladder, particles_per_sweep
from piscale.search.node import Node
from piscale.search.result import Outcome
from piscale.search.settings import Settings
from piscale.smc import swap_probability


def layout(budget: int, settings: Settings) -> Ladder:
    if settings.chains < 2:
        raise ValueError(f"parallel tempering needs chains >= 2, got {settings.chains}")
    particles = particles_per_sweep(budget, chains=settings.chains, iterations=settings.iterations)
    return Ladder(particles=particles, chains=settings.chains, iterations=settings.iterations)


async def search(driver: Driver, layout: Ladder, settings: Settings, rng: np.random.Generator) -> Outcome:
    chain_temperatures = settings.chain_temperatures
    chains = len(chain_temperatures)
    chain_rngs = rng.spawn(chains)
    references: list[list[Node] | None] = [None] * chains
    log_evidence: float | None = None
    for iteration in range(layout.iterations):
        sweeps: list[Sweep] = list(
            await asyncio.gather(
                *(
                    sweep(
                        driver, layout.particles, chain_rngs[k], tempering=chain_temperatures[k],
                        reference=references[k], hook=driver.trace, iteration=iteration, chain=k,
                    )
                    for k in range(chains)
                )
            )
        )
        if iteration == 0:
            log_evidence = sweeps[0].log_z
        if iteration + 1 == layout.iterations:
            break
        drawn = [draw_reference(ended, chain_rngs[k]) for k, ended in enumerate(sweeps)]
        for k in range(chains - 1):
            colder, hotter = drawn[k], drawn[k + 1]
            final = driver.potentials([colder[-1], hotter[-1]])
            probability = swap_probability(final[0], final[1], chain_temperatures[k], chain_temperatures[k + 1])
            accepted = bool(rng.random() < probability)
            if accepted:
                drawn[k], drawn[k + 1] = hotter, colder
            if driver.trace is not None:
                driver.trace.event(
                    "swap", iteration=iteration + 1, chain=k, chains=[k, k + 1],
                    potentials=[float(final[0]), float(final[1])], probability=probability, accepted=accepted,
                )
        references = list(drawn)
        if driver.trace is not None:
            for k, reference in enumerate(drawn):
                driver.trace.event("reference", iteration=iteration + 1, chain=k, steps=[n.text for n in reference])
    return await outcome(sweeps[0], settings.selection, log_evidence)
