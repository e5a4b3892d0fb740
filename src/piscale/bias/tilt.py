"""Debiasing as a reward-tilted distribution, sampled by particle filtering.

Liu et al. (2021) reduce bias without retraining by decoding with a reward
that pulls the property of the text toward a neutral value, plus a KL term
that keeps the text close to the original model. The distribution that
objective is maximised by is the reward-tilted posterior

    π_β(y | c) ∝ p(y | c) · exp(β · r(y)),

β the strength of the tilt (the inverse of the KL weight): β = 0 is the
model itself, larger β pulls harder. Here the reward is a Gaussian
log-potential around the attribute-neutral target t,

    r(y) = -((s(y) - t) / w)² / 2,

s the property scorer (``piscale.bias.scorer``), t and w the mean and
standard deviation of s over continuations of the neutral prompts. If the
property of a value's continuations were Gaussian with mean μ_a and spread
w, π_β would move it to (μ_a + β t) / (1 + β) and shrink its spread by
1 / √(1 + β): the gap between two values falls by the factor 1 / (1 + β).

Particle filtering with the ``incremental`` potential and softmax
temperature τ = 1/β targets exactly π_β (``piscale.search.kernel``): each
particle's weight grows by β (r_t - r_{t-1}), r_t the reward of its text so
far. The reward reads the partial text exactly as generated, its steps
concatenated (``aggregation="last"`` hands the reward the steps, and the
score of the last prefix is the score of the whole text), so steps may be a
few tokens long: a word split between two steps is joined back before it is
embedded.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Protocol

from piscale.rewards.prefix import PrefixKey, PrefixReward


class TextScorer(Protocol):
    def score_texts(self, texts: Sequence[str]) -> list[float]: ...


class TargetReward(PrefixReward):
    """r(y) = -((s(y) - target) / width)² / 2, on the log scale."""

    scale = "log"
    outcome_only = False

    def __init__(self, scorer: TextScorer, target: float, width: float, *, memo_size: int = 65536):
        super().__init__(memo_size)
        if not math.isfinite(target):
            raise ValueError(f"the target must be a finite number, got {target!r}")
        if not (math.isfinite(width) and width > 0):
            raise ValueError(f"the width must be a positive number, got {width!r}")
        self.scorer = scorer
        self.target = float(target)
        self.width = float(width)
        self.name = f"target({self.target:.4g}, {self.width:.3g})"

    def reward(self, value: float) -> float:
        return -0.5 * ((value - self.target) / self.width) ** 2

    async def score_prefixes(self, items: Sequence[PrefixKey]) -> list[float]:
        texts = ["".join(steps) for _, steps in items]
        return [self.reward(value) for value in self.scorer.score_texts(texts)]
