"""A particle as a node in the tree of steps.

A particle is a ``Node``: its latest step (text, tokens and their
log-probabilities, score) and a pointer to the node it grew from, so a whole
partial answer is the chain of parents up to the root (the prompt). Two
particles that share a prefix share its nodes, and resampling copies
pointers, never text: the tree of nodes *is* the genealogy of the particle
system.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(eq=False)
class Node:
    """One step of one partial answer; the root (depth 0) is the prompt."""

    parent: Node | None
    text: str
    token_ids: tuple[int, ...]
    depth: int
    total_tokens: int
    """tokens generated from the root to here."""
    done: bool = False
    """no longer extended (it ended, or hit a cap); stays in the pool."""
    ended: str | None = None
    """why it is done: eos, answer, max_steps, max_tokens, context, or error
    (the backend failed to write this step)."""
    score: float | None = None
    """aggregated reward of the partial answer up to here; None = unscored.
    On a finished node it includes the terminal part."""
    terminal: float | None = None
    """the log-potential of the reward's terminal factors (``final:``), set
    once the node is finished; None before, or without such factors."""
    logprobs: tuple[float, ...] = ()
    """log p(token | prefix) at temperature 1 of each of ``token_ids``, as
    the backend returned them; rewards that read the policy's confidence
    (``Reward.needs_logprobs``) get them without another forward pass."""

    def lineage(self) -> list[Node]:
        """The nodes from depth 1 to this one."""
        nodes, node = [], self
        while node.parent is not None:
            nodes.append(node)
            node = node.parent
        return nodes[::-1]

    def steps(self) -> list[str]:
        return [node.text for node in self.lineage()]

    def response(self) -> str:
        return "".join(self.steps())

    def all_token_ids(self) -> list[int]:
        return [token for node in self.lineage() for token in node.token_ids]

    def step_logprobs(self) -> list[list[float]]:
        """The token log-probabilities of each step, depth 1 first."""
        return [list(node.logprobs) for node in self.lineage()]

    @property
    def failed(self) -> bool:
        return self.ended == "error"

    @property
    def complete(self) -> bool:
        """Ended on its own (end of sequence or a boxed answer), not by a cap."""
        return self.ended in ("eos", "answer")


def ready(nodes: Sequence[Node]) -> list[int]:
    """Indices of the nodes that are still extended."""
    return [i for i, node in enumerate(nodes) if not node.done]


def split_steps(text: str, delimiter: str) -> list[str]:
    """``text`` cut after every ``delimiter`` (which stays with its step);
    joining the pieces gives ``text`` back."""
    pieces, start = [], 0
    while (end := text.find(delimiter, start)) >= 0:
        pieces.append(text[start : end + len(delimiter)])
        start = end + len(delimiter)
    if start < len(text) or not pieces:
        pieces.append(text[start:])
    return pieces
