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

**Terminal.** ``Terminal`` marks a factor of a product as a terminal
potential: it judges finished answers only, and a search weighs it in once
per answer. In a particle filter the other factors steer the partial
answers, as the twist functions of twisted SMC do, and the terminal factor
multiplies each final particle's weight after the last resampling, so it
never decides which particles are copied (``piscale.search.kernel``). With
the incremental potential the filter targets p(x | c) times every factor on
complete answers, the same target as the plain product, by another route.
That is for a reward that ranks finished answers well but whose factor is
far from 1 on every answer: applied at each particle's own end, it tilts
every later resampling against the particles that have answered
(docs/results.md measures that for ``certainty^10``). Whole-answer searches
(best-of-N and its relatives) see no difference between ``A*final:B`` and
``A*B``. Called directly, as on a list of finished answers, ``Terminal``
scores as its reward does, on the log scale; ``split_terminal`` is how a
search tells the two parts of a product apart.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Sequence
from typing import Literal

import numpy as np

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


class Terminal(Reward):
    """A factor that judges finished answers only (see the module doc):
    its reward's log-potential."""

    scale: Scale = "log"

    def __init__(self, reward: Reward):
        if isinstance(reward, Terminal):
            raise ValueError(f"{reward.name!r} is already terminal; final:final:... means nothing more")
        self.reward = reward
        self.outcome_only = reward.outcome_only
        self.needs_logprobs = reward.needs_logprobs
        self.name = f"final:{reward.name}"

    async def score(self, prompts, trajectories) -> list[list[float]]:
        return self._logged(await self.reward.score(prompts, trajectories))

    async def score_with_logprobs(self, prompts, trajectories, logprobs) -> list[list[float]]:
        return self._logged(await self.reward.score_with_logprobs(prompts, trajectories, logprobs))

    def _logged(self, rows: list[list[float]]) -> list[list[float]]:
        return [[float(p) for p in log_reward(np.asarray(row, dtype=float), self.reward.scale)] for row in rows]

    async def close(self) -> None:
        await self.reward.close()


def split_terminal(reward: Reward | None) -> tuple[Reward | None, Reward | None]:
    """(steering, terminal): a reward's ``Terminal`` factors apart from the
    others, each part a product on the log scale (None where it has no
    factor). A reward without terminal factors is all steering. A terminal
    factor must be a factor of the top-level product: inside a transform or
    a linear mixture it has no meaning apart from the rest."""
    if isinstance(reward, Terminal):
        return None, reward.reward
    if isinstance(reward, WeightedSum) and reward.combine == "log":
        steering = [(w, r) for w, r in reward.terms if not isinstance(r, Terminal)]
        terminal = [(w, r.reward) for w, r in reward.terms if isinstance(r, Terminal)]
        for _, r in steering:
            _check_no_terminal(r)
        if terminal:
            return (WeightedSum(steering) if steering else None), WeightedSum(terminal)
        return reward, None
    _check_no_terminal(reward)
    return reward, None


def _check_no_terminal(reward: Reward | None) -> None:
    inner: list[Reward] = []
    if isinstance(reward, WeightedSum):
        inner = [r for _, r in reward.terms]
    elif isinstance(reward, Transformed):
        inner = [reward.reward]
    for r in inner:
        if isinstance(r, Terminal):
            raise ValueError(
                f"{r.name!r} sits inside {reward.name!r}; a final: term must be a factor of the "  # type: ignore[union-attr]
                "reward's top-level product (e.g. value*arith*final:certainty^10)"
            )
        _check_no_terminal(r)
