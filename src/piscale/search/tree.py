"""Reward-guided tree search, shared by beam search and DVTS.

    G independent groups; each keeps its K best partial answers
    step 1: each group expands the prompt K x M times
    repeat
        each kept unfinished partial answer writes M continuations
        (all groups in one backend call, scored in one reward call)
        in each group: keep the K best of (its finished kept answers
        + the new continuations), by aggregated reward
    until every kept answer is finished
    answer: the best-scoring kept answer

Beam search is one group keeping N/M; DVTS is N/M groups keeping one each.
Candidates are compared by the logit of their score (unscored ones, as with
an outcome-only reward before the answer, count as even odds). In the trace,
candidates that were dropped have no weight.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from piscale.lm.base import Handle
from piscale.search.driver import Driver
from piscale.search.node import Node
from piscale.search.result import Outcome
from piscale.search.select import max_weight


@dataclass
class _Kept:
    node: Node
    handle: Handle | None
    group: int


async def tree_search(driver: Driver, rng: np.random.Generator, *, groups: int, keep: int, width: int) -> Outcome:
    root_handles = await driver.open(groups * keep * width)
    # Each frontier entry is a kept partial answer and the sequences its
    # M continuations will use (its own plus M - 1 forks).
    frontier = [
        (_Kept(driver.root, None, index // keep), root_handles[index * width : (index + 1) * width])
        for index in range(groups * keep)
    ]
    kept: list[_Kept] = []
    column_of: dict[int, int] = {}  # id(node) -> its index in the previous trace column
    for step in range(1, driver.settings.max_steps + 1):
        parents = [entry for entry, handles in frontier for _ in handles]
        handles = [h for _, entry_handles in frontier for h in entry_handles]
        children = await driver.extend([p.node for p in parents], handles, rng)
        carried = [k for k in kept if k.node.done]
        candidates = carried + [
            _Kept(child, None if child.done else handle, parent.group)
            for parent, child, handle in zip(parents, children, handles)
        ]
        potentials = driver.potentials([c.node for c in candidates], "paper")
        chosen = best_per_group(potentials, [c.group for c in candidates], keep)
        driver.release([c.handle for i, c in enumerate(candidates) if i not in chosen])
        if driver.trace is not None:
            origins = [column_of.get(id(c.node)) for c in carried] + [column_of.get(id(p.node)) for p in parents]
            driver.trace.step(
                [c.node for c in candidates],
                [float(potentials[i]) if i in chosen else None for i in range(len(candidates))],
                step=step,
                origins=origins,
            )
            column_of = {id(c.node): i for i, c in enumerate(candidates)}
        kept = [candidates[i] for i in sorted(chosen)]
        if all(k.node.done for k in kept):
            break
        frontier = [(k, [k.handle, *driver.lm.fork([k.handle] * (width - 1))]) for k in kept if not k.node.done]
    final = [k.node for k in kept]
    log_weights = [float(p) for p in driver.potentials(final, "paper")]
    scores = [-np.inf if node.score is None else node.score for node in final]
    return Outcome(final, log_weights, max_weight(scores))


def best_per_group(potentials: np.ndarray, groups: list[int], keep: int) -> set[int]:
    """Indices of the ``keep`` largest potentials within each group (earlier
    candidates win ties)."""
    chosen: set[int] = set()
    taken: dict[int, int] = {}
    for i in np.argsort(-potentials, kind="stable"):
        group = groups[int(i)]
        if taken.get(group, 0) < keep:
            chosen.add(int(i))
            taken[group] = taken.get(group, 0) + 1
    return chosen
