"""A per-request view of the shared backend.

The server holds one backend; every request talks to it through its own
``MeteredLM``, which forwards each call unchanged (so concurrent requests
still share the backend's batches) and

* counts the work done for this request alone: prompt tokens prefilled,
  tokens generated, tokens read by ``score``; the counts follow the backend's
  own accounting (``piscale.lm.base.Usage``), so the sum over requests equals
  what the engine counted;
* remembers the sequences it opened or forked and has not released, so that
  a request that ends any way at all (done, failed, timed out, client gone)
  gives all of them back (``release_all``).

A request's reward gets a second view over the same backend, so that reward
tokens are counted apart from the policy's.
"""

from __future__ import annotations

from collections.abc import Sequence

from piscale.lm.base import Handle, LanguageModel, ScoreOutput, StepOutput, StepParams, Usage


class MeteredLM(LanguageModel):
    """Forwards to ``inner``; counts into ``usage``; tracks live handles."""

    def __init__(self, inner: LanguageModel):
        self.inner = inner
        self.name = inner.name
        self.usage = Usage()
        self.cached_tokens = 0
        """prompt tokens served from a kept sequence instead of a prefill."""
        self._live: dict[Handle, None] = {}

    # -- attributes of the backend -------------------------------------------
    @property
    def context_length(self) -> int:  # type: ignore[override]
        return self.inner.context_length

    @property
    def eos_token_ids(self) -> frozenset[int]:  # type: ignore[override]
        return self.inner.eos_token_ids

    @property
    def max_sequences(self) -> int | None:  # type: ignore[override]
        return self.inner.max_sequences

    @property
    def vocab_size(self) -> int | None:  # type: ignore[override]
        return self.inner.vocab_size

    @property
    def live_sequences(self) -> int | None:
        return self.inner.live_sequences

    def encode(self, text: str) -> list[int]:
        return self.inner.encode(text)

    def decode(self, token_ids: Sequence[int]) -> str:
        return self.inner.decode(token_ids)

    def chat(self, messages, *, add_generation_prompt: bool = True, continue_final_message: bool = False) -> list[int]:
        return self.inner.chat(
            messages, add_generation_prompt=add_generation_prompt, continue_final_message=continue_final_message
        )

    def token_ids(self, handle: Handle) -> list[int]:
        return self.inner.token_ids(handle)

    # -- sequences ----------------------------------------------------------
    async def open(self, prompts, copies=1) -> list[list[Handle]]:
        prompts = [list(p) for p in prompts]
        groups = await self.inner.open(prompts, copies)
        self.usage.calls += 1
        self.usage.prefill_tokens += sum(len(p) for p in prompts)
        for group in groups:
            self._live.update(dict.fromkeys(group))
        return groups

    def adopt(self, handles: Sequence[Handle], cached_tokens: int) -> None:
        """Take over handles made outside this view (forks of a kept
        sequence) whose prompt of ``cached_tokens`` tokens needed no prefill."""
        self._live.update(dict.fromkeys(handles))
        self.cached_tokens += cached_tokens

    def detach(self, handles: Sequence[Handle]) -> None:
        """Stop tracking handles that now belong to someone else."""
        for handle in handles:
            self._live.pop(handle, None)

    async def extend(self, handles, params: StepParams, seeds=None) -> list[StepOutput]:
        outputs = await self.inner.extend(handles, params, seeds)
        self.usage.calls += 1
        self.usage.generated_tokens += sum(len(o.token_ids) for o in outputs)
        return outputs

    def fork(self, ancestors: Sequence[Handle]) -> list[Handle]:
        children = self.inner.fork(ancestors)
        self._live.update(dict.fromkeys(children))
        return children

    def release(self, handles: Sequence[Handle]) -> None:
        self.inner.release(handles)
        for handle in handles:
            self._live.pop(handle, None)

    @property
    def live_handles(self) -> list[Handle]:
        return list(self._live)

    def release_all(self) -> list[Handle]:
        """Release every handle still held; returns those the backend refused
        because they are still being extended (a cancelled call runs on in
        some engines), for the caller to release later."""
        busy = []
        for handle in list(self._live):
            try:
                self.inner.release([handle])
            except RuntimeError:
                busy.append(handle)
            except KeyError:
                pass  # already gone
            self._live.pop(handle, None)
        return busy

    # -- scoring ------------------------------------------------------------
    async def score(self, prompts, continuations) -> list[ScoreOutput]:
        prompts = [list(p) for p in prompts]
        continuations = [list(c) for c in continuations]
        outputs = await self.inner.score(prompts, continuations)
        self.usage.calls += 1
        self.usage.scored_tokens += sum(len(p) + len(c) for p, c in zip(prompts, continuations))
        return outputs

    @property
    def tokens(self) -> int:
        """Every token this view made the backend read or write."""
        return self.usage.prefill_tokens + self.usage.generated_tokens + self.usage.scored_tokens
