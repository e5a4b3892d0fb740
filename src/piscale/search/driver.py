"""The driver: how every algorithm talks to the backend and the reward.

The ``Driver`` does the talking the same way for every algorithm:

* ``extend`` grows a list of particles by one step each with ONE
  ``lm.extend`` call and scores the new steps with ONE reward call; a
  particle that finished is released from the backend at once (afterwards it
  is only a record, copied by resampling but never extended);
* ``resample`` turns ancestor indices into the next generation: the first
  copy of a live particle keeps its backend sequence, further copies are
  ``lm.fork``-ed (the backend copies caches, it does not re-read), unused
  sequences are released;
* ``sample`` draws complete answers in one ``lm.extend`` call (best-of-N and
  its relatives);
* ``potentials`` turns the particles' scores into log-potentials Φ (see
  ``piscale.smc``), divided by the softmax temperature τ of the weights;
* a reward's terminal factors (``final:``, ``piscale.rewards.Terminal``)
  are scored on finished particles only, and ``potentials`` can leave them
  out, so that the SMC kernel resamples by the other factors alone;
* it counts the work: tokens generated and prefilled, reward calls and the
  step strings they read, backend calls;
* a step the backend could not produce (``finish_reason == "error"``: a
  remote request that failed for good) ends its particle with zero weight:
  resampling replaces it, no selection picks it, and ``failures`` keeps the
  reason. Only a search whose every particle failed raises.

Randomness comes from the ``numpy.random.Generator`` an algorithm passes in:
per-sequence seeds for ``lm.extend`` are drawn from it, so a search depends
only on its own seed, not on what else shares the backend's batches.

The driver records nothing itself: ``trace`` is the step hook (a
``piscale.search.trace.TraceRecorder``, or None) that the algorithms and the
SMC kernel report to.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from piscale.grading import extract_boxed
from piscale.lm.base import Handle, LanguageModel, StepOutput, StepParams
from piscale.rewards.aggregate import score_trajectories
from piscale.rewards.base import Reward
from piscale.rewards.compose import split_terminal
from piscale.search.node import Node, split_steps
from piscale.search.settings import Settings
from piscale.search.trace import TraceRecorder
from piscale.smc import log_potential

SEED_RANGE = 2**31
"""Per-sequence seeds are drawn in [0, 2^31) so every backend accepts them."""


@dataclass
class SearchUsage:
    generated_tokens: int = 0
    prompt_tokens: int = 0
    reward_calls: int = 0
    reward_steps: int = 0
    extend_calls: int = 0

    def to_dict(self, wall_time: float) -> dict[str, float]:
        return {**self.__dict__, "wall_time": wall_time}

@dataclass
class Driver:
    lm: LanguageModel
    reward: Reward | None
    question: str
    prompt_ids: list[int]
    settings: Settings
    trace: TraceRecorder | None = None
    usage: SearchUsage = field(default_factory=SearchUsage)
    failures: list[dict] = field(default_factory=list)
    """{"depth", "reason"} of every particle dropped because its step failed."""

    def __post_init__(self) -> None:
        self.root = Node(parent=None, text="", token_ids=(), depth=0, total_tokens=0)
        self.steering, self.terminal = split_terminal(self.reward)

    # -- weights ------------------------------------------------------------
    def potentials(self, nodes: Sequence[Node], kind: str | None = None, terminal: bool = True) -> np.ndarray:
        """Φ of each node's score (``settings.potential`` unless ``kind``),
        over the softmax temperature; an unscored node is neutral (Φ = 0)
        and a failed one impossible (Φ = -inf). ``terminal=False`` leaves
        the terminal factors out of finished nodes' scores."""
        scores = np.array([np.nan if n.score is None else n.score for n in nodes], dtype=float)
        if not terminal:
            scores -= [n.terminal or 0.0 for n in nodes]
        scored = ~np.isnan(scores)
        values = np.zeros(len(nodes))
        if scored.any():
            scale = self.reward.scale if self.reward is not None else "probability"
            values[scored] = log_potential(scores[scored], scale, kind or self.settings.potential)
        values[[n.failed for n in nodes]] = -np.inf
        return values / self.settings.softmax_temperature

    # -- backend ------------------------------------------------------------
    async def open(self, copies: int, node: Node | None = None) -> list[Handle]:
        """``copies`` backend sequences holding the prompt and ``node``'s steps."""
        if copies == 0:
            return []
        prompt = self.prompt_ids + (node.all_token_ids() if node is not None else [])
        [handles] = await self.lm.open([prompt], copies=copies)
        self.usage.prompt_tokens += len(prompt)
        return handles

    def release(self, handles: Sequence[Handle | None]) -> None:
        live = [h for h in handles if h is not None]
        if live:
            self.lm.release(live)

    def _seeds(self, count: int, rng: np.random.Generator) -> list[int]:
        return [int(s) for s in rng.integers(0, SEED_RANGE, size=count)]

    async def extend(self, nodes: Sequence[Node], handles: Sequence[Handle], rng: np.random.Generator) -> list[Node]:
        """One more step for each (node, handle), in one backend call; the new
        nodes are scored in one reward call. Handles of nodes that are done
        are released; the others now hold the new nodes' sequences."""
        if not nodes:
            return []
        s = self.settings
        # One call means one step cap for all: near the whole-answer cap,
        # the particle with the least room left shortens everyone's step
        # (the others just continue at the next step), so no answer ever
        # exceeds max_tokens.
        room = min(s.max_tokens - node.total_tokens for node in nodes)
        params = StepParams(
            max_tokens=max(1, min(s.max_step_tokens, room)),
            stop=(s.step_delimiter,),
            temperature=s.temperature,
            top_p=s.top_p,
        )
        outputs = await self.lm.extend(list(handles), params, seeds=self._seeds(len(nodes), rng))
        self.usage.extend_calls += 1
        children = [self._child(node, output) for node, output in zip(nodes, outputs)]
        self.release([h for h, child in zip(handles, children) if child.done])
        await self.score(children)
        return children

    def _child(self, parent: Node, output: StepOutput) -> Node:
        self.usage.generated_tokens += len(output.token_ids)
        child = Node(
            parent=parent,
            text=output.text,
            token_ids=tuple(output.token_ids),
            depth=parent.depth + 1,
            total_tokens=parent.total_tokens + len(output.token_ids),
            logprobs=tuple(output.logprobs),
        )
        if output.finish_reason == "error":
            child.ended = "error"
            self._failed(child, output)
        elif output.finish_reason in ("eos", "context"):
            child.ended = output.finish_reason
        elif extract_boxed(output.text) is not None:
            child.ended = "answer"
        elif child.depth >= self.settings.max_steps:
            child.ended = "max_steps"
        elif child.total_tokens >= self.settings.max_tokens:
            child.ended = "max_tokens"
        child.done = child.ended is not None
        return child

    async def resample(
        self,
        nodes: Sequence[Node],
        handles: Sequence[Handle | None],
        ancestors: Sequence[int] | np.ndarray,
        pinned: int | None = None,
    ) -> tuple[list[Node], list[Handle | None]]:
        """The generation ``nodes[ancestors[i]]``. Live copies get backend
        sequences: the first copy of an ancestor keeps its sequence, the
        others fork it; an ancestor without a sequence (a stored reference
        particle) is re-opened from its tokens. Slot ``pinned`` (the
        reference's) needs no sequence. Unused sequences are released."""
        new_nodes = [nodes[a] for a in ancestors]
        new_handles: list[Handle | None] = [None] * len(ancestors)
        slots_of: dict[int, list[int]] = {}
        for slot, ancestor in enumerate(ancestors):
            if slot != pinned and not new_nodes[slot].done:
                slots_of.setdefault(int(ancestor), []).append(slot)
        fork_from, fork_into, reopen = [], [], []
        for ancestor, slots in slots_of.items():
            if handles[ancestor] is None:
                reopen.append((ancestor, slots))
                continue
            new_handles[slots[0]] = handles[ancestor]
            fork_from += [handles[ancestor]] * (len(slots) - 1)
            fork_into += slots[1:]
        for slot, handle in zip(fork_into, self.lm.fork(fork_from)):
            new_handles[slot] = handle
        self.release([h for a, h in enumerate(handles) if a not in slots_of])
        for ancestor, slots in reopen:
            for slot, handle in zip(slots, await self.open(len(slots), nodes[ancestor])):
                new_handles[slot] = handle
        return new_nodes, new_handles

    async def sample(self, count: int, rng: np.random.Generator, score: bool = True) -> list[Node]:
        """``count`` complete answers, sampled in one backend call with the
        whole-response token cap, each stored as its chain of steps (split at
        the step delimiter; its tokens, and their log-probabilities, sit on
        the last step's node: a cut at the delimiter may fall inside a token)."""
        handles = await self.open(count)
        params = StepParams(
            max_tokens=self.settings.max_tokens,
            stop=(),
            temperature=self.settings.temperature,
            top_p=self.settings.top_p,
        )
        try:
            outputs = await self.lm.extend(handles, params, seeds=self._seeds(count, rng))
        finally:
            self.release(handles)
        self.usage.extend_calls += 1
        answers = []
        for output in outputs:
            self.usage.generated_tokens += len(output.token_ids)
            node = self.root
            pieces = split_steps(output.text, self.settings.step_delimiter)
            for i, piece in enumerate(pieces):
                last = i == len(pieces) - 1
                tokens = tuple(output.token_ids) if last else ()
                logprobs = tuple(output.logprobs) if last else ()
                node = Node(node, piece, tokens, node.depth + 1, node.total_tokens + len(tokens), logprobs=logprobs)
            node.done = True
            if output.finish_reason == "error":
                node.ended = "error"
                self._failed(node, output)
            elif output.finish_reason == "eos":
                node.ended = "eos"
            elif extract_boxed(output.text) is not None:
                node.ended = "answer"
            else:
                node.ended = "max_tokens" if output.finish_reason == "length" else output.finish_reason
            answers.append(node)
        if score:
            await self.score(answers)
        return answers

    def _failed(self, node: Node, output: StepOutput) -> None:
        self.failures.append({"depth": node.depth, "reason": output.error or "the backend gave no reason"})

    def check_survivors(self, nodes: Sequence[Node]) -> None:
        """Raise when every one of the final ``nodes`` failed: then there is
        no answer to give, only the backend's reasons."""
        if nodes and all(node.failed for node in nodes):
            reasons = sorted({f["reason"] for f in self.failures})
            raise RuntimeError(f"every particle failed ({len(self.failures)} failed steps): " + "; ".join(reasons[:3]))

    # -- reward -------------------------------------------------------------
    async def score(self, nodes: Sequence[Node]) -> None:
        """Set ``score`` on the nodes: one reward call for the steering
        factors, and one for the terminal factors of the nodes that just
        finished (their sum, on the log scale, is the score). An
        outcome-only reward (a verifier) scores finished nodes only; failed
        nodes have nothing to score. A reward that reads the policy's
        confidence also gets each step's token log-probabilities."""
        if self.reward is None:
            return
        live = [n for n in nodes if not n.failed]
        steered = [n for n in live if self.steering is not None and (n.done or not self.steering.outcome_only)]
        for node, value in zip(steered, await self._scores(self.steering, steered)):
            node.score = value
        if self.terminal is None:
            return
        finished = [n for n in live if n.done and n.terminal is None]
        for node, value in zip(finished, await self._scores(self.terminal, finished)):
            node.terminal = value
            node.score = (node.score or 0.0) + value

    async def _scores(self, reward: Reward | None, nodes: Sequence[Node]) -> list[float]:
        if reward is None or not nodes:
            return []
        trajectories = [node.steps() for node in nodes]
        logprobs = [self._logprobs(node) for node in nodes] if reward.needs_logprobs else None
        scores = await score_trajectories(
            reward, [self.question] * len(nodes), trajectories, self.settings.aggregation,  # type: ignore[arg-type]
            logprobs=logprobs,
        )
        self.usage.reward_calls += 1
        self.usage.reward_steps += len(nodes) if self.settings.aggregation == "model" else sum(map(len, trajectories))
        return [float(value) for value in scores]

    def _logprobs(self, node: Node) -> list[list[float]]:
        """``node.step_logprobs()``, checked: a backend that returned fewer
        log-probabilities than tokens would make a confidence of a part of
        the answer look like one of the whole."""
        for step in node.lineage():
            if len(step.logprobs) != len(step.token_ids):
                raise RuntimeError(
                    f"backend {self.lm.name!r} returned {len(step.logprobs)} log-probabilities for "
                    f"{len(step.token_ids)} tokens; reward {self.reward.name!r} needs one per token"  # type: ignore[union-attr]
                )
        return node.step_logprobs()
