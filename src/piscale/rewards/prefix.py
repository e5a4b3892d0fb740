"""Rewards that score each partial answer on its own, with a memo.

Many rewards (judges, density ratios, verifiers, checkers, embeddings) give
step t a score that depends only on (prompt, steps[:t+1]). During a search the
same prefixes come back again and again (a particle's earlier steps, copies
made by resampling), so a ``PrefixReward`` remembers the score of every
(prompt, prefix) it has computed, up to ``memo_size`` entries (least recently
used first out), and only computes the new ones, all in one batch.
"""

from __future__ import annotations

import abc
from collections import OrderedDict
from collections.abc import Sequence

from piscale.rewards.base import Reward

PrefixKey = tuple[str, tuple[str, ...]]


class PrefixReward(Reward):
    memo_size: int = 4096

    def __init__(self, memo_size: int = 4096):
        if memo_size < 0:
            raise ValueError(f"memo_size must be >= 0, got {memo_size}")
        self.memo_size = memo_size
        self._memo: OrderedDict[PrefixKey, float] = OrderedDict()
        self.computed = 0
        """How many (prompt, prefix) scores were computed rather than remembered."""

    @abc.abstractmethod
    async def score_prefixes(self, items: Sequence[PrefixKey]) -> list[float]:
        """The score of each (prompt, steps) item: ``steps`` is a whole partial
        answer and the score judges its last step in the light of the others."""

    async def score(self, prompts, trajectories) -> list[list[float]]:
        if len(prompts) != len(trajectories):
            raise ValueError(
                f"got {len(prompts)} prompts but {len(trajectories)} trajectories; they must pair up"
            )
        keys: list[list[PrefixKey]] = []
        missing: dict[PrefixKey, None] = {}
        for prompt, steps in zip(prompts, trajectories):
            if isinstance(steps, str):
                raise TypeError("each trajectory must be a list of step strings, not a string")
            steps = tuple(steps)
            row = [(prompt, steps[: t + 1]) for t in range(len(steps))]
            keys.append(row)
            for key in row:
                if key not in self._memo:
                    missing[key] = None
        fresh: dict[PrefixKey, float] = {}
        if missing:
            todo = list(missing)
            values = await self.score_prefixes(todo)
            if len(values) != len(todo):
                raise RuntimeError(f"{self.name}: {len(values)} scores for {len(todo)} prefixes")
            self.computed += len(todo)
            fresh = dict(zip(todo, (float(v) for v in values)))
        result = []
        for row in keys:
            scores = []
            for key in row:
                if key in fresh:
                    value = fresh[key]
                else:
                    value = self._memo[key]
                    self._memo.move_to_end(key)
                scores.append(value)
            result.append(scores)
        for key, value in fresh.items():
            self._remember(key, value)
        return result

    def _remember(self, key: PrefixKey, value: float) -> None:
        if self.memo_size == 0:
            return
        self._memo[key] = value
        self._memo.move_to_end(key)
        while len(self._memo) > self.memo_size:
            self._memo.popitem(last=False)

    def forget(self) -> None:
        """Drop every remembered score."""
        self._memo.clear()
