"""The particles of one SMC sweep and the backend sequences they hold.

The SMC kernel (``piscale.search.kernel``) thinks in nodes and weights; the
backend thinks in sequences (handles to cached prefixes). A ``Population``
keeps the two in step, so that the kernel never touches a handle:

* slot i holds a node (its partial answer) and, while the node is being
  extended, the handle of a backend sequence holding exactly its tokens;
  a finished node holds none (the driver released it when it finished);
* ``grow`` extends every unfinished slot by one step, in one backend call;
* ``resample`` makes slot i a copy of slot ``ancestors[i]``: the first copy
  of a live ancestor keeps its sequence, the others fork it, the sequences
  no copy needs are released (``Driver.resample``);
* in conditional SMC one slot is *pinned* to a reference trajectory: at
  step t it holds the reference's stored node t and no sequence at all (a
  copy of it is re-opened from its tokens when resampling picks it);
* ``released_on_error`` gives the sequences back when a sweep fails half way,
  so that a failed search leaves nothing behind in the backend.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import numpy as np

from piscale.lm.base import Handle
from piscale.search.driver import Driver
from piscale.search.node import Node, ready


class Population:
    """N slots, each a node and the handle of its backend sequence (or None)."""

    def __init__(self, driver: Driver, handles: list[Handle | None], reference: Sequence[Node] | None) -> None:
        self.driver = driver
        self.nodes: list[Node] = [driver.root] * len(handles)
        self.handles = handles
        self.reference = reference
        self.pinned: int | None = 0 if reference is not None else None
        """the reference's slot (conditional SMC), or None."""

    @classmethod
    async def open(cls, driver: Driver, particles: int, reference: Sequence[Node] | None = None) -> Population:
        """``particles`` slots at the prompt, each with a backend sequence
        except the reference's."""
        fresh = particles - 1 if reference is not None else particles
        handles: list[Handle | None] = [None] * (particles - fresh) + list(await driver.open(fresh))
        return cls(driver, handles, reference)

    def __len__(self) -> int:
        return len(self.nodes)

    @property
    def finished(self) -> bool:
        return all(node.done for node in self.nodes)

    async def grow(self, step: int, rng: np.random.Generator) -> None:
        """Every unfinished slot writes its step ``step`` (the pinned slot
        takes the reference's instead, with the reward stored on it)."""
        grow = [i for i in ready(self.nodes) if i != self.pinned]
        children = await self.driver.extend([self.nodes[i] for i in grow], [self.handles[i] for i in grow], rng)
        for i, child in zip(grow, children):
            self.nodes[i] = child
            self.handles[i] = None if child.done else self.handles[i]
        if self.pinned is not None and not self.nodes[self.pinned].done:
            self.nodes[self.pinned] = self.reference[step - 1]  # type: ignore[index]

    async def resample(self, ancestors: Sequence[int] | np.ndarray) -> None:
        """Slot i becomes a copy of slot ``ancestors[i]``."""
        self.nodes, self.handles = await self.driver.resample(self.nodes, self.handles, ancestors, self.pinned)

    @contextlib.contextmanager
    def released_on_error(self) -> Iterator[None]:
        """Release every sequence the population holds if the body raises."""
        try:
            yield
        except BaseException:
            with contextlib.suppress(Exception):
                self.driver.release(self.handles)
            raise
