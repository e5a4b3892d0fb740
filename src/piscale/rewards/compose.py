"""Rewards built from other rewards: weighted sums, transforms, and terms that
judge only a given answer.

**Scales.** A probability-scale score p in [0, 1] is the probability that the
partial answer is good; its log-potential is log p (``piscale.smc.log_reward``;
p = 0 gives -inf, an exact zero likelihood). A log-scale score is a
log-potential already.

**Weighted sum.** With ``combine="log"`` (the default) the terms are combined
in log space,

    score = sum_k w_k * Phi_k,   Phi_k = log s_k (probability) or s_k (log),

a product of experts: exp(score) = prod_k p_k^{w_k}. Each term multiplies the
likelihood of "good", so a PRM (probability) and a density ratio (log) mix
without any unit problem, and the result is on the log scale. With
``combine="linear"`` the scores themselves are added, sum_k w_k s_k, which needs
every term on the same scale; for probabilities the weights must be a convex
combination (non-negative, summing to 1) so the result is again a probability
(a mixture of experts). In log space a probability-scale term must have a
non-negative weight (a zero probability is -inf, which a negative weight would
turn into +inf); a zero weight drops the term.

**Transform.** ``Transformed`` maps a reward's score through, in this order,

1. ``logit``: s -> log(p / (1 - p)) with p clipped to [c, 1 - c],
   c = ``piscale.smc.LOGIT_CLIP`` (``piscale.smc.logit_reward``); the result
   is a log-potential (Puri et al. 2025 weight particles by softmax(logit(r)/tau));
2. ``temperature`` T: the log-potential is divided by T. On the log scale that
   is s / T; on the probability scale it is p^(1/T), which stays in [0, 1].
   T > 1 flattens the likelihood, T < 1 sharpens it;
3. ``clip`` (lo, hi): the result is clipped into [lo, hi].

**Once answered.** ``OnceAnswered`` passes a reward's log-potential through
only from the step that gives the final (boxed) answer on; before it, the
partial answer scores 0 on the log scale, a likelihood of 1. In a product
with a step-level reward it is a terminal potential: the step reward steers
the partial answers, as the twist functions of twisted SMC do, and this term
weighs in once, on the answer. With the incremental potential the filter
then targets p(x | c) times the product of every term on complete answers,
while the steering never sees the term. That is for a reward that ranks
finished answers well but would narrow the particles too early if it
weighed every step. A term whose typical factor is far from 1 tilts the
resampling between particles that have answered and those still writing
(docs/results.md measures that for ``final:certainty^10``): the step reward
should then anticipate the term's scale.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Sequence
from typing import Literal

import numpy as np

from piscale.grading import extract_boxed
from piscale.rewards.aggregate import join_steps
from piscale.rewards.base import Reward, Scale
from piscale.smc import log_reward, logit_reward

class WeightedSum(Reward):
    """sum_k w_k * (score of reward k), in log space or linearly (see the module doc)."""

    def __init__(
        self,
        terms: Sequence[tuple[float, Reward]],
        combine: Literal["log", "linear"] = "log",
    ):
        if not terms:
            raise ValueError("WeightedSum needs at least one (weight, reward) term")
        for k, term in enumerate(terms):
            if not (isinstance(term, tuple) and len(term) == 2 and isinstance(term[1], Reward)):
                raise TypeError(f"term {k} must be a (weight, Reward) pair, got {term!r}")
            if not math.isfinite(float(term[0])):
                raise ValueError(f"term {k} has a non-finite weight {term[0]!r}")
        if combine not in ("log", "linear"):
            raise ValueError(f"combine must be 'log' or 'linear', got {combine!r}")
        self.terms = [(float(w), r) for w, r in terms]
        self.combine = combine
        if combine == "log":
            self.scale: Scale = "log"
            for k, (w, r) in enumerate(self.terms):
                if w < 0 and r.scale == "probability":
                    raise ValueError(
                        f"term {k} ({r.name}) is on the probability scale with a negative weight; "
                        "in log space its zero scores would become +inf"
                    )
        else:
            scales = {r.scale for _, r in self.terms}
            if len(scales) != 1:
                raise ValueError(
                    "combine='linear' adds raw scores, so every term must be on the same scale; "
                    f"got {sorted(scales)}. Use combine='log' to mix probability and log scales."
                )
            self.scale = scales.pop()
            if self.scale == "probability":
                weights = [w for w, _ in self.terms]
                if min(weights) < 0 or not math.isclose(sum(weights), 1.0, abs_tol=1e-9):
                    raise ValueError(
                        "a linear sum of probabilities must have non-negative weights summing "
                        f"to 1 to stay a probability; got weights {weights}"
                    )
        self.outcome_only = all(r.outcome_only for _, r in self.terms)
        # A term that reads the policy's log-probabilities gets them; the
        # others ignore them (``Reward.score_with_logprobs``).
        self.needs_logprobs = any(r.needs_logprobs for _, r in self.terms)
        self.name = " + ".join(f"{w:g}*{r.name}" for w, r in self.terms)

    async def score(self, prompts, trajectories) -> list[list[float]]:
        results = await asyncio.gather(*(r.score(prompts, trajectories) for _, r in self.terms))
        return self._combined(trajectories, results)

    async def score_with_logprobs(self, prompts, trajectories, logprobs) -> list[list[float]]:
        results = await asyncio.gather(
            *(r.score_with_logprobs(prompts, trajectories, logprobs) for _, r in self.terms)
        )
        return self._combined(trajectories, results)

    def _combined(self, trajectories, results) -> list[list[float]]:
        combined: list[list[float]] = []
        for i, steps in enumerate(trajectories):
            row = []
            for t in range(len(steps)):
                if self.combine == "log":
                    value = math.fsum(
                        w * float(log_reward(np.array([result[i][t]]), r.scale)[0])
                        for (w, r), result in zip(self.terms, results)
                        if w != 0.0
                    )
                else:
                    value = math.fsum(w * result[i][t] for (w, _), result in zip(self.terms, results))
                row.append(value)
            combined.append(row)
        return combined

    async def close(self) -> None:
        for _, r in self.terms:
            await r.close()


class Transformed(Reward):
    """A reward's score through logit, temperature and clipping (see the module doc)."""

    def __init__(
        self,
        reward: Reward,
        *,
        logit: bool = False,
        temperature: float = 1.0,
        clip: tuple[float, float] | None = None,
    ):
        if logit and reward.scale != "probability":
            raise ValueError(
                f"logit needs a probability-scale reward; {reward.name!r} is on the {reward.scale} scale"
            )
        if not (temperature > 0 and math.isfinite(temperature)):
            raise ValueError(f"temperature must be a positive number, got {temperature!r}")
        if clip is not None:
            low, high = clip
            if not low < high:
                raise ValueError(f"clip must be (low, high) with low < high, got {clip!r}")
        self.reward = reward
        self.logit = logit
        self.temperature = float(temperature)
        self.clip = clip
        self.scale: Scale = "log" if logit else reward.scale
        self.outcome_only = reward.outcome_only
        self.needs_logprobs = reward.needs_logprobs
        parts = (["logit"] if logit else []) + (
            [f"T={temperature:g}"] if temperature != 1.0 else []
        ) + ([f"clip={clip}"] if clip else [])
        self.name = f"{reward.name}[{','.join(parts)}]" if parts else reward.name

    def transform(self, score: float) -> float:
        value = float(score)
        if self.logit:
            value = float(logit_reward(np.array([value]), "probability")[0])
        if self.temperature != 1.0:
            if self.scale == "log":
                value = value / self.temperature
            else:
                value = max(value, 0.0) ** (1.0 / self.temperature)
        if self.clip is not None:
            value = min(max(value, self.clip[0]), self.clip[1])
        return value

    async def score(self, prompts, trajectories) -> list[list[float]]:
        inner = await self.reward.score(prompts, trajectories)
        return [[self.transform(s) for s in row] for row in inner]

    async def score_with_logprobs(self, prompts, trajectories, logprobs) -> list[list[float]]:
        inner = await self.reward.score_with_logprobs(prompts, trajectories, logprobs)
        return [[self.transform(s) for s in row] for row in inner]

    async def close(self) -> None:
        await self.reward.close()


class OnceAnswered(Reward):
    """A reward's log-potential from the step that gives the final answer on;
    0 before it (see the module doc). The wrapped reward reads only the
    trajectories that hold an answer."""

    scale: Scale = "log"

    def __init__(self, reward: Reward):
        self.reward = reward
        self.outcome_only = reward.outcome_only
        self.needs_logprobs = reward.needs_logprobs
        self.name = f"final:{reward.name}"

    async def score(self, prompts, trajectories) -> list[list[float]]:
        return await self._scored(prompts, trajectories, None)

    async def score_with_logprobs(self, prompts, trajectories, logprobs) -> list[list[float]]:
        return await self._scored(prompts, trajectories, logprobs)

    async def _scored(self, prompts, trajectories, logprobs) -> list[list[float]]:
        answered = [(i, start) for i, steps in enumerate(trajectories) if (start := answer_step(steps)) is not None]
        rows = [[0.0] * len(steps) for steps in trajectories]
        if not answered:
            return rows
        chosen_prompts = [prompts[i] for i, _ in answered]
        chosen = [trajectories[i] for i, _ in answered]
        if logprobs is None:
            inner = await self.reward.score(chosen_prompts, chosen)
        else:
            inner = await self.reward.score_with_logprobs(chosen_prompts, chosen, [logprobs[i] for i, _ in answered])
        for (i, start), scores in zip(answered, inner):
            potentials = log_reward(np.asarray(scores[start:], dtype=float), self.reward.scale)
            rows[i][start:] = [float(p) for p in potentials]
        return rows

    async def close(self) -> None:
        await self.reward.close()


def answer_step(steps: Sequence[str]) -> int | None:
    """The index of the first step by which the partial answer holds a
    complete boxed answer, or None."""
    for t in range(len(steps)):
        if "}" in steps[t] and extract_boxed(join_steps(steps[: t + 1])) is not None:
            return t
    return None
