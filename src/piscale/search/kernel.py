"""The SMC kernel: one sweep of a particle filter over the step tree.

Particle filtering runs one sweep; particle Gibbs runs several, each
conditioned on a reference trajectory; parallel tempering runs several
chains of them with tempered potentials. All three call ``sweep``:

    N particles at the prompt, W = equal, log Ẑ = 0
    for t = 1, 2, ...
        mutate     each unfinished particle writes one step    x_t ~ p(. | c, x_<t)
                   (the reference slot takes the reference's step t)
        reweight   incremental: log w_i += (Φ_t - Φ_{t-1}) / T
                   paper:       log w_i  = Φ_t / T
        estimate   log Ẑ_t = log Ẑ_s + log mean_i w_i         (s: last resampling)
        observe    hook.step(...)                              (the trace)
        stop when every particle is finished
                   (then, and only then, Φ includes the reward's
                   terminal factors, final:; see below)
        if resampling is due (every step, or ESS < threshold x N):
            ancestors ~ scheme(W)  (conditional multinomial with a reference)
            x^i <- x^{a^i};  W = equal;  bank log Ẑ

Φ is the log-potential of a particle's score (``Driver.potentials``, which
already divides it by the softmax temperature τ of the weights);
``tempering`` T divides it once more (a parallel tempering chain's
temperature, 1 otherwise), so that with the incremental potential the sweep
targets p(x | c) · r(x)^{1/(τ T)} and its ``log_z`` estimates
log E_p[r(x)^{1/(τ T)}]. The weights live in a ``piscale.smc.Weights``
record; the nodes and their backend sequences in a
``piscale.search.population.Population``; what is recorded is up to the hook
(``piscale.search.trace.TraceRecorder`` satisfies ``StepHook``), so the loop
below holds only the mathematics.

A reward's terminal factors (``piscale.rewards.Terminal``) are left out of
Φ until the last step: the particles are resampled by the other factors,
the twists, and the final weights carry the terminal factor of each
answer. The target is unchanged (every intermediate target is one of the
steering factors alone), but an answer that finished early is not judged
against partial answers that have not yet met the terminal factor.

A conditional sweep's estimate is not an unbiased one (the reference was
not drawn by this sweep), so particle Gibbs and parallel tempering report
the estimate of their first, unconditional sweep.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from piscale.grading import extract_answer
from piscale.search import select
from piscale.search.driver import Driver
from piscale.search.node import Node
from piscale.search.population import Population
from piscale.search.result import Outcome
from piscale.smc import (
    Weights,
    conditional_multinomial,
    effective_sample_size,
    log_increments,
    multinomial,
    paper_log_weights,
    resampler,
)


class StepHook(Protocol):
    """What watches a sweep: called once per step, after reweighting and
    before resampling. ``origins[i]`` is the slot of the previous step that
    particle i descends from (None at the first step); ``ancestors`` is the
    resampling that the next step's particles will descend from (None when
    the step does not resample)."""

    def step(
        self,
        nodes: Sequence[Node],
        log_weights: Sequence[float | None],
        *,
        step: int,
        origins: Sequence[int | None],
        iteration: int = 0,
        chain: int = 0,
        ess: float | None = None,
        resampled: bool = False,
        ancestors: Sequence[int] | None = None,
        reference_slot: int | None = None,
    ) -> None: ...


@dataclass
class Sweep:
    """The end of a sweep: the final particles and their weights record."""

    nodes: list[Node]
    weights: Weights

    @property
    def log_weights(self) -> np.ndarray:
        return self.weights.log_weights

    @property
    def log_z(self) -> float | None:
        """log Ẑ of the sweep's target; None for the paper's potential."""
        return self.weights.log_z


async def sweep(
    driver: Driver,
    particles: int,
    rng: np.random.Generator,
    *,
    tempering: float = 1.0,
    reference: Sequence[Node] | None = None,
    hook: StepHook | None = None,
    iteration: int = 0,
    chain: int = 0,
) -> Sweep:
    """One particle filter run until every particle has finished.
    ``reference`` (a lineage, depth 1 first) makes it conditional SMC with
    the reference in slot 0; ``tempering`` divides the potentials;
    ``iteration`` and ``chain`` only label what the hook sees."""
    s = driver.settings
    population = await Population.open(driver, particles, reference)
    weights = Weights.equal(particles)
    origins: list[int | None] = [None] * particles
    scheme = resampler(s.resampler)
    with population.released_on_error():
        for step in range(1, s.max_steps + 1):
            previous = driver.potentials(population.nodes, terminal=False)
            await population.grow(step, rng)
            finished = population.finished
            # Terminal factors weigh in once every particle has finished,
            # after the last resampling: they never choose what is copied.
            current = driver.potentials(population.nodes, terminal=finished)
            if s.potential == "paper":
                weights = weights.replaced(paper_log_weights(current, tempering))
            else:
                weights = weights.reweighted(log_increments(current, previous, tempering))
            if not np.isfinite(weights.log_weights).any():
                # The reward ruled out every particle: nothing to prefer, so
                # go on from equal weights rather than fail (a particle whose
                # step failed stays out).
                driver.check_survivors(population.nodes)
                weights = weights.restarted(np.where([node.failed for node in population.nodes], -np.inf, 0.0))
            normalized = weights.normalized
            ess = effective_sample_size(normalized)
            due = not finished and (s.ess_threshold is None or ess < s.ess_threshold * particles)
            ancestors: np.ndarray | None = None
            if due:
                if population.pinned is not None:
                    ancestors = conditional_multinomial(normalized, particles, rng, population.pinned)
                else:
                    ancestors = scheme(normalized, particles, rng)
            if hook is not None:
                hook.step(
                    population.nodes, weights.log_weights.tolist(), step=step, origins=origins,
                    iteration=iteration, chain=chain, ess=ess, resampled=due, ancestors=ancestors,
                    reference_slot=population.pinned,
                )
            if finished:
                return Sweep(list(population.nodes), weights)
            if ancestors is not None:
                await population.resample(ancestors)
                weights = weights.resampled()
                origins = [int(a) for a in ancestors]
            else:
                origins = list(range(particles))
    raise AssertionError("every particle is done after max_steps steps")


def draw_reference(final: Sweep, rng: np.random.Generator) -> list[Node]:
    """The lineage of one final particle drawn from the normalised weights:
    the next conditional sweep's reference."""
    index = int(multinomial(final.weights.normalized, 1, rng)[0])
    return final.nodes[index].lineage()


async def outcome(final: Sweep, selection: str, log_evidence: float | None) -> Outcome:
    """The final population as an outcome, its answer chosen by ``selection``."""
    answers = [extract_answer(n.response()) for n in final.nodes]
    log_weights = final.log_weights
    chosen = await select.choose_async(selection, answers, log_weights)
    return Outcome(list(final.nodes), [float(w) for w in log_weights], chosen, log_evidence)
