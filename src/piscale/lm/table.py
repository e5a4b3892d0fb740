"""The bookkeeping every engine shares: its sequence table and the checks on
what callers pass to ``open``, ``extend``, ``fork``, ``release`` and ``score``.

An engine keeps one record per live sequence (its tokens, its cache row or
slot) in a ``SequenceTable``, which issues the handles and refuses what the
protocol forbids: unknown or released handles, a handle twice in one call, and
forking, releasing or extending a sequence while it is being extended. The
functions ``check_open`` and ``check_score`` validate the arguments of those
two calls. An engine then writes only what is its own: the forward pass and
the cache copy.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator, Sequence
from typing import Generic, Protocol, TypeVar

from piscale.lm.base import Handle, LanguageModel


class Record(Protocol):
    """What the table needs of an engine's record of one sequence."""

    busy: bool
    """True while an ``extend`` call is extending the sequence."""


R = TypeVar("R", bound=Record)


class SequenceTable(Generic[R]):
    """Handles, issued in increasing order from 0, each mapped to one record.

    ``guard``, when given, runs before every lookup (an engine that has been
    closed refuses all handles with its own error)."""

    def __init__(self, guard: Callable[[], None] | None = None):
        self._records: dict[Handle, R] = {}
        self._next_handle = itertools.count()
        self._guard = guard

    # -- the table --------------------------------------------------------------
    def add(self, record: R) -> Handle:
        """A new handle for ``record``."""
        handle = next(self._next_handle)
        self._records[handle] = record
        return handle

    def checked(self, handle: Handle) -> R:
        """The record of a live handle; an unknown or released one is a
        ``KeyError`` that says so."""
        if self._guard is not None:
            self._guard()
        try:
            return self._records[handle]
        except KeyError:
            raise KeyError(f"unknown or released sequence handle {handle}") from None

    def __contains__(self, handle: object) -> bool:
        return handle in self._records

    def __len__(self) -> int:
        return len(self._records)

    def __iter__(self) -> Iterator[Handle]:
        return iter(self._records)

    def items(self):
        return self._records.items()

    def values(self):
        return self._records.values()

    def __getitem__(self, handle: Handle) -> R:
        return self._records[handle]

    def get(self, handle: Handle) -> R | None:
        """The record of ``handle`` or None, without checks (for an engine's
        own loops, which may outlive a released handle)."""
        return self._records.get(handle)

    def pop(self, handle: Handle) -> R:
        return self._records.pop(handle)

    def clear(self) -> None:
        self._records.clear()

    # -- the protocol's checks --------------------------------------------------
    def to_fork(self, ancestors: Sequence[Handle]) -> list[R]:
        """The records of ``ancestors``, none of them being extended."""
        parents = [self.checked(a) for a in ancestors]
        for handle, parent in zip(ancestors, parents):
            if parent.busy:
                raise RuntimeError(f"cannot fork sequence {handle} while it is being extended")
        return parents

    def release(self, handles: Sequence[Handle]) -> list[R]:
        """Remove ``handles`` (distinct, known, none being extended) and
        return their records; nothing is removed if any is refused."""
        handles = list(handles)
        if len(set(handles)) != len(handles):
            raise ValueError("a handle appears twice in one release call")
        for handle in handles:
            if self.checked(handle).busy:
                raise RuntimeError(f"cannot release sequence {handle} while it is being extended")
        return [self._records.pop(handle) for handle in handles]

    def to_extend(self, handles: Sequence[Handle], seeds: Sequence[int] | None) -> list[R]:
        """The records of ``handles`` (distinct, known, none being extended
        already), with one seed each if seeds are given."""
        if seeds is not None and len(seeds) != len(handles):
            raise ValueError(f"got {len(seeds)} seeds for {len(handles)} sequences")
        if len(set(handles)) != len(handles):
            raise ValueError("a sequence appears twice in one extend call; fork it first")
        records = [self.checked(h) for h in handles]
        for handle, record in zip(handles, records):
            if record.busy:
                raise RuntimeError(f"sequence {handle} is already being extended")
        return records


def check_open(
    prompts: Sequence[Sequence[int]],
    copies: int | Sequence[int],
    context_length: int,
    vocab_size: int | None = None,
) -> tuple[list[list[int]], list[int]]:
    """The prompts as lists of ints and the number of copies of each, once
    every prompt has a token, fits the context window with room for one more,
    and (given ``vocab_size``) holds only ids of the vocabulary."""
    lists = [[int(t) for t in p] for p in prompts]
    counts = [copies] * len(prompts) if isinstance(copies, int) else [int(c) for c in copies]
    if len(counts) != len(lists):
        raise ValueError(f"copies has {len(counts)} entries for {len(lists)} prompts")
    if any(c < 1 for c in counts):
        raise ValueError("copies must be >= 1")
    for i, prompt in enumerate(lists):
        if not prompt:
            raise ValueError(f"prompt {i} is empty; a prompt needs at least one token")
        if len(prompt) >= context_length:
            raise ValueError(
                f"prompt {i} has {len(prompt)} tokens, which does not fit the context window of {context_length}"
            )
        check_vocabulary(prompt, vocab_size, f"prompt {i}")
    return lists, counts


def check_score(
    prompts: Sequence[Sequence[int]],
    continuations: Sequence[Sequence[int]],
    context_length: int,
    vocab_size: int | None = None,
) -> list[tuple[list[int], list[int]]]:
    """(prompt, continuation) pairs as lists of ints, once every prompt has a
    token to condition on and every pair fits the context window."""
    if len(prompts) != len(continuations):
        raise ValueError(f"got {len(prompts)} prompts for {len(continuations)} continuations")
    pairs = [([int(t) for t in p], [int(t) for t in c]) for p, c in zip(prompts, continuations)]
    for i, (prompt, continuation) in enumerate(pairs):
        if not prompt:
            raise ValueError(f"prompt {i} is empty; scoring needs at least one token to condition on")
        if len(prompt) + len(continuation) > context_length:
            raise ValueError(
                f"prompt and continuation {i} ({len(prompt) + len(continuation)} tokens) exceed the "
                f"context window of {context_length}"
            )
        check_vocabulary(prompt + continuation, vocab_size, f"pair {i}")
    return pairs


def check_vocabulary(tokens: Sequence[int], vocab_size: int | None, what: str) -> None:
    """Refuse token ids outside ``range(vocab_size)`` (no check without one)."""
    if vocab_size is None:
        return
    bad = [t for t in tokens if not 0 <= t < vocab_size]
    if bad:
        raise ValueError(f"{what} has token ids outside the vocabulary (size {vocab_size}): {bad[:5]}")


class TableLM(LanguageModel):
    """A ``LanguageModel`` whose sequences live in a ``SequenceTable``
    (``self._sequences``, made by the engine's constructor): releasing and
    counting sequences are the table's. An engine whose cache needs more on
    release (a slot freed) overrides ``release`` and calls the table's."""

    _sequences: SequenceTable

    def release(self, handles: Sequence[Handle]) -> None:
        self._sequences.release(handles)

    @property
    def live_sequences(self) -> int:
        return len(self._sequences)
