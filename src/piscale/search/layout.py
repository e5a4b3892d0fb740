"""How an algorithm spends its budget: one small record per kind of search.

The budget counts what Puri et al. (2025) count, roughly complete answers'
worth of generation, and each algorithm splits it its own way:

    pf          N particles                          Particles(particles)
    pg          N particles x T iterations           Sweeps(particles, iterations)
    pt          N particles x M chains x T iter.     Ladder(particles, chains, iterations)
    bon/wbon/sc N samples                            Samples(samples)
    beam        N/M beams x M expansions             Beams(beams, beam_width)
    dvts        N/M subtrees x M expansions          Subtrees(subtrees, beam_width)

A layout is computed before any work is done (an impossible split is an
error that names the split), and ``as_dict`` gives the fields in declaration
order: that dict is what a ``SearchResult``'s ``settings`` records.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class Layout:
    """Base of the layouts; its fields are the split of the budget."""

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


@dataclass(frozen=True)
class Particles(Layout):
    """One particle filter: ``particles`` = the budget."""

    particles: int


@dataclass(frozen=True)
class Sweeps(Layout):
    """Particle Gibbs: ``iterations`` sweeps of ``particles`` particles."""

    particles: int
    iterations: int


@dataclass(frozen=True)
class Ladder(Layout):
    """Parallel tempering: ``chains`` chains, each ``iterations`` sweeps of
    ``particles`` particles."""

    particles: int
    chains: int
    iterations: int


@dataclass(frozen=True)
class Samples(Layout):
    """Complete answers sampled in one batch."""

    samples: int


@dataclass(frozen=True)
class Beams(Layout):
    """Beam search: ``beams`` kept partial answers, each expanded
    ``beam_width`` times per step."""

    beams: int
    beam_width: int


@dataclass(frozen=True)
class Subtrees(Layout):
    """DVTS: ``subtrees`` independent subtrees, each keeping one partial
    answer and expanding it ``beam_width`` times per step."""

    subtrees: int
    beam_width: int


def particles_per_sweep(budget: int, **factors: int) -> int:
    """budget / prod(factors), requiring an exact split with at least two
    particles (one fresh besides a reference trajectory)."""
    product = 1
    for value in factors.values():
        product *= value
    described = " x ".join(f"{name}={value}" for name, value in factors.items())
    if budget % product or budget // product < 2:
        raise ValueError(
            f"budget {budget} must be a multiple of {described} = {product} with at least 2 particles each; "
            f"use a budget of at least {2 * product} or change {', '.join(factors)}"
        )
    return budget // product


def per_expansion(budget: int, width: int, what: str) -> int:
    """N / M for the tree searches, requiring M to divide N."""
    if budget % width or budget < width:
        raise ValueError(
            f"budget {budget} must be a positive multiple of beam_width={width} ({what} = budget / beam_width)"
        )
    return budget // width
