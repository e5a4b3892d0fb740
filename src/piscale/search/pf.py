"""Particle filtering (Puri et al. 2025, Algorithm 1) and the SMC sweep that
particle Gibbs and parallel tempering reuse.

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
after resampling, so the final weighted particles target p(x | c) · r(x)^{1/τ}.
A finished particle's score does not change, so it keeps its last weight.

Particle Gibbs passes a *reference* trajectory: it occupies slot 0, its step t
is the stored node (with its stored reward), and conditional resampling keeps
it. Parallel tempering divides the potentials by a chain temperature.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence

import numpy as np

from piscale.grading import extract_answer
from piscale.search.driver import Driver
from piscale.search.layout import Population
from piscale.search.node import Node, ready
from piscale.search.result import Outcome
from piscale.search import select
from piscale.search.settings import Settings
from piscale.smc import (
    conditional_multinomial,
    effective_sample_size,
    incremental_log_weights,
    normalize,
    paper_log_weights,
    resampler,
)


def layout(budget: int, settings: Settings) -> Population:
    return Population(particles=budget)


async def search(driver: Driver, layout: Population, settings: Settings, rng: np.random.Generator) -> Outcome:
    nodes, log_weights = await smc_sweep(driver, layout.particles, rng)
    return choose(nodes, log_weights, settings.selection)


async def smc_sweep(
    driver: Driver,
    particles: int,
    rng: np.random.Generator,
    *,
    temperature: float = 1.0,
    reference: Sequence[Node] | None = None,
    iteration: int = 0,
    chain: int = 0,
) -> tuple[list[Node], np.ndarray]:
    """One particle filter run to the end: the final particles and their
    log-weights. ``reference`` (a lineage, depth 1 first) makes it conditional
    SMC with the reference in slot 0; ``temperature`` divides the potentials."""
    s = driver.settings
    pinned = 0 if reference is not None else None
    nodes: list[Node] = [driver.root] * particles
    handles = ([None] if pinned is not None else []) + await driver.open(particles - (pinned is not None))
    log_weights = np.zeros(particles)
    origins: list[int | None] = [None] * particles
    scheme = resampler(s.resampler)
    try:
        for step in range(1, s.max_steps + 1):
            previous = driver.potentials(nodes)
            grow = [i for i in ready(nodes) if i != pinned]
            children = await driver.extend([nodes[i] for i in grow], [handles[i] for i in grow], rng)
            for i, child in zip(grow, children):
                nodes[i] = child
                handles[i] = None if child.done else handles[i]
            if pinned is not None and not nodes[pinned].done:
                nodes[pinned] = reference[step - 1]
            current = driver.potentials(nodes)
            if s.potential == "paper":
                log_weights = paper_log_weights(current, temperature)
            else:
                log_weights = incremental_log_weights(log_weights, current, previous, temperature)
            if not np.isfinite(log_weights).any():
                # The reward ruled out every particle: nothing to prefer, so
                # start again from equal weights rather than fail (but a
                # particle whose step failed stays out).
                driver.check_survivors(nodes)
                log_weights = np.where([node.failed for node in nodes], -np.inf, 0.0)
            weights = normalize(log_weights)
            ess = effective_sample_size(weights)
            finished = all(node.done for node in nodes)
            due = not finished and (s.ess_threshold is None or ess < s.ess_threshold * particles)
            ancestors = None
            if due:
                if pinned is not None:
                    ancestors = conditional_multinomial(weights, particles, rng, pinned)
                else:
                    ancestors = scheme(weights, particles, rng)
            if driver.trace is not None:
                driver.trace.step(
                    nodes, log_weights.tolist(), step=step, origins=origins, iteration=iteration, chain=chain,
                    ess=ess, resampled=due, ancestors=ancestors, reference_slot=pinned,
                )
            if finished:
                return nodes, log_weights
            if due:
                nodes, handles = await driver.resample(nodes, handles, ancestors, pinned)
                log_weights = np.zeros(particles)
                origins = [int(a) for a in ancestors]
            else:
                origins = list(range(particles))
    except BaseException:
        with contextlib.suppress(Exception):
            driver.release(handles)
        raise
    raise AssertionError("every particle is done after max_steps steps")


def choose(nodes: list[Node], log_weights: np.ndarray, selection: str) -> Outcome:
    """The final population as an outcome, its answer chosen by ``selection``."""
    answers = [extract_answer(n.response()) for n in nodes]
    return Outcome(list(nodes), [float(w) for w in log_weights], select.choose(selection, answers, log_weights))
