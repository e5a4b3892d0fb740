"""Sequences kept after a request, so the next request can continue them.

A client that drives a search from outside (``piscale.lm.openai.OpenAILM``,
its_hub, a script) continues a particle by sending the exact tokens it has so
far: the prompt and every step generated before. The backend protocol cannot
feed given tokens into an existing sequence, but it can fork one: so the
server keeps the sequences it finished (keyed by their whole token list) and
the prompts it opened, and a request whose prompt equals one of them forks it
instead of prefilling the prefix again. Identical prompts arriving together
share one prefill (the later ones wait for the first).

Kept sequences are evicted least recently used first. Their cost depends on
the engine: a few bytes for the toy model, cache memory for llama.cpp, and for
the transformers engine a cache row that every decoding pass carries.
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict
from collections.abc import Sequence

from piscale.lm.base import Handle, LanguageModel
from piscale.serve.metered import MeteredLM


class KeptSequences:
    def __init__(self, lm: LanguageModel, capacity: int):
        self.lm = lm
        self.capacity = capacity
        self._entries: OrderedDict[tuple[int, ...], Handle] = OrderedDict()
        self._opening: dict[tuple[int, ...], asyncio.Future[Handle]] = {}
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        return len(self._entries)

    async def acquire(self, view: MeteredLM, prompt: Sequence[int], copies: int) -> list[Handle]:
        """``copies`` sequences holding ``prompt``, owned by ``view``: forks
        of a kept sequence when there is one, else a fresh prefill (kept too)."""
        key = tuple(int(t) for t in prompt)
        if self.capacity == 0:
            [handles] = await view.open([list(key)], copies)
            return handles
        if key not in self._entries and key in self._opening:
            try:
                await asyncio.shield(self._opening[key])
            except Exception:
                pass  # the first request's prefill failed; try our own below
        base = self._entries.get(key)
        if base is not None:
            self._entries.move_to_end(key)
            self.hits += 1
            children = self.lm.fork([base] * copies)
            view.adopt(children, cached_tokens=len(key))
            return children
        self.misses += 1
        opening: asyncio.Future[Handle] = asyncio.get_running_loop().create_future()
        self._opening[key] = opening
        try:
            [[base]] = await view.open([list(key)], 1)
            view.detach([base])
        except BaseException as error:
            opening.set_exception(error if isinstance(error, Exception) else RuntimeError("the prefill was cancelled"))
            opening.exception()  # mark it retrieved: waiters see it, nobody else must
            raise
        finally:
            self._opening.pop(key, None)
        self._store(key, base)
        opening.set_result(base)
        children = self.lm.fork([base] * copies)
        view.adopt(children, cached_tokens=0)
        return children

    def keep(self, view: MeteredLM, handle: Handle) -> None:
        """Move a finished request's sequence (not ended by end-of-sequence)
        from ``view`` into the store."""
        if self.capacity == 0:
            return
        key = tuple(self.lm.token_ids(handle))
        view.detach([handle])
        if key in self._entries:
            self.lm.release([handle])
            self._entries.move_to_end(key)
            return
        self._store(key, handle)

    def _store(self, key: tuple[int, ...], handle: Handle) -> None:
        self._entries[key] = handle
        while len(self._entries) > self.capacity:
            _, evicted = self._entries.popitem(last=False)
            self.lm.release([evicted])

    def clear(self) -> None:
        handles = list(self._entries.values())
        self._entries.clear()
        if handles:
            self.lm.release(handles)
