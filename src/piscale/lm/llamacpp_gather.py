"""Planning the cache moves that put the sequences of one llama.cpp pass on
consecutive sequence ids, so that llama.cpp runs them as one micro-batch
(see ``piscale.lm.llamacpp``): which ids to copy where, with the fewest
copies."""

from __future__ import annotations

from collections.abc import Collection, Sequence

import numpy as np

def plan_gather(
    member_ids: Sequence[int], free_ids: Sequence[int], n_ids: int, pinned: Collection[int] = ()
) -> list[tuple[int, int]]:
    """Copies ``(source id, destination id)``, to be run in order, that put
    ``member_ids`` on consecutive ids with the fewest copies; empty when they
    already are consecutive, or when no id is free to move through.

    Ids that are neither members nor free belong to other live slots. Those
    inside the chosen window move out to free ids outside it; when there are
    too few, each swaps with a member outside the window through a free id
    (three copies). Then the remaining members outside move into the window's
    free and vacated ids. A copy reads its source as the copies before it
    left it, which is how llama.cpp runs them at the next pass. ``pinned``
    ids must not move: no window may hold one."""
    members = sorted(set(member_ids))
    k = len(members)
    if k < 2 or members[-1] - members[0] == k - 1 or not free_ids:
        return []

    def counted_before(ids: Collection[int]) -> np.ndarray:
        """counted_before(ids)[i]: how many of ``ids`` are below ``i``."""
        marks = np.zeros(n_ids + 1, np.int64)
        marks[np.fromiter(ids, np.int64, len(ids)) + 1] = 1
        return np.cumsum(marks)

    members_before, free_before, pinned_before = counted_before(members), counted_before(free_ids), counted_before(pinned)
    starts = np.arange(n_ids - k + 1)
    members_inside = members_before[starts + k] - members_before[starts]
    free_inside = free_before[starts + k] - free_before[starts]
    squatters = k - members_inside - free_inside
    evicted = np.minimum(squatters, free_before[-1] - free_inside)
    copies = (k - members_inside) + evicted + 2 * (squatters - evicted)
    copies[pinned_before[starts + k] - pinned_before[starts] > 0] = np.iinfo(np.int64).max
    if (copies == np.iinfo(np.int64).max).all():
        return []
    start = int(np.argmin(copies))
    window = range(start, start + k)
    member_set, free_set = set(members), set(free_ids)
    outside_free = [i for i in sorted(free_set) if i not in window]
    vacant = [i for i in window if i in free_set]
    arrivals = [i for i in members if i not in window]
    plan: list[tuple[int, int]] = []
    for i in window:
        if i in member_set or i in free_set:
            continue
        if outside_free:  # another slot's id: move it out
            plan.append((i, outside_free.pop(0)))
            vacant.append(i)
        else:  # swap it with a member outside, through a free id in the window
            member, temporary = arrivals.pop(), vacant[0]
            plan += [(i, temporary), (member, i), (temporary, member)]
    plan += list(zip(arrivals, sorted(vacant)))
    return plan
