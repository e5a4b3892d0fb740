"""The genealogy of a search, as JSON.

A trace is a plain dict (``json.dumps`` takes it as it is):

* ``nodes``: every step ever written, once: ``{"id", "parent", "depth",
  "text", "score"}`` (id 0 is the prompt);
* ``steps``: one record per step of each sweep, in order of (iteration,
  chain, step): ``{"iteration", "chain", "step", "ess", "resampled",
  "ancestors", "particles"}``, where ``particles[i]`` is particle i after
  that step's growth and reweighting: ``{"node", "ancestor", "text",
  "score", "log_weight", "weight", "finished", "reference"}``. ``ancestor``
  is the index in the previous step's list that particle i descends from
  (None at the first step); ``ancestors`` is the resampling outcome that the
  next step's particles descend from (None when no resampling happened);
* ``answer``: the chosen node and its answer; ``events``: anything else an
  algorithm reports (particle Gibbs references, tempering swaps).

``TraceRecorder`` is the step hook the searches call: the SMC kernel after
every reweighting (``piscale.search.kernel.StepHook``), the sampling and tree
searches once per column, and particle Gibbs and parallel tempering with
``event`` between sweeps. ``piscale.tracepage`` draws a finished trace.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from piscale.search.node import Node

FORMAT = "piscale-trace"
VERSION = 1


@dataclass
class _Step:
    iteration: int
    chain: int
    step: int
    nodes: list[Node]
    log_weights: list[float | None]
    weights: list[float]
    origins: list[int | None]
    ess: float | None
    resampled: bool
    ancestors: list[int] | None
    reference_slot: int | None


@dataclass
class TraceRecorder:
    """Collects steps while a search runs; ``finish`` builds the trace dict.
    Nodes are numbered when the trace is built, in the order steps are
    sorted, so concurrent sweeps give the same ids however they interleave."""

    algorithm: str
    question: str
    report: Callable[[dict], None] | None = None
    """Called with a summary of every step and event as it happens (``progress``
    below): how a command line or a server shows a search at work."""
    _steps: list[_Step] = field(default_factory=list)
    _events: list[tuple[tuple[int, int, int], dict]] = field(default_factory=list)

    def step(
        self,
        nodes: Sequence[Node],
        log_weights: Sequence[float | None],
        *,
        step: int,
        origins: Sequence[int | None],
        iteration: int = 0,
        chain: int = 0,
        ess: float | None = None,
        resampled: bool = False,
        ancestors: Sequence[int] | None = None,
        reference_slot: int | None = None,
    ) -> None:
        finite = [w for w in log_weights if w is not None and math.isfinite(w)]
        top = max(finite) if finite else 0.0
        raw = [0.0 if w is None else math.exp(w - top) if math.isfinite(w) else 0.0 for w in log_weights]
        if all(w is None for w in log_weights):
            raw = [1.0] * len(log_weights)
        total = sum(raw) or 1.0
        self._steps.append(
            _Step(
                iteration,
                chain,
                step,
                list(nodes),
                [None if w is None else float(w) for w in log_weights],
                [w / total for w in raw],
                list(origins),
                None if ess is None else float(ess),
                bool(resampled),
                None if ancestors is None else [int(a) for a in ancestors],
                reference_slot,
            )
        )
        if self.report is not None:
            self.report(progress(self._steps[-1]))

    def event(self, kind: str, *, iteration: int = 0, chain: int = 0, **details) -> None:
        """Something an algorithm did between steps (a reference drawn, a swap)."""
        self._events.append(((iteration, chain, len(self._events)), {"kind": kind, "iteration": iteration, "chain": chain, **details}))
        if self.report is not None:
            self.report({"event": kind, "iteration": iteration, "chain": chain})

    def finish(self, chosen: Node | None, answer: str | None) -> dict:
        ids: dict[int, int] = {}
        table: list[dict] = []

        def number(node: Node) -> int:
            unnumbered, current = [], node
            while current is not None and id(current) not in ids:
                unnumbered.append(current)
                current = current.parent
            for item in reversed(unnumbered):
                ids[id(item)] = len(table)
                table.append(
                    {
                        "id": len(table),
                        "parent": None if item.parent is None else ids[id(item.parent)],
                        "depth": item.depth,
                        "text": item.text,
                        "score": item.score,
                    }
                )
            return ids[id(node)]

        steps = []
        for record in sorted(self._steps, key=lambda s: (s.iteration, s.chain, s.step)):
            particles = []
            for slot, node in enumerate(record.nodes):
                particles.append(
                    {
                        "node": number(node),
                        "ancestor": record.origins[slot],
                        "text": node.text,
                        "score": node.score,
                        "log_weight": _finite_or_none(record.log_weights[slot]),
                        "weight": record.weights[slot],
                        "finished": node.done,
                        "reference": slot == record.reference_slot,
                    }
                )
            steps.append(
                {
                    "iteration": record.iteration,
                    "chain": record.chain,
                    "step": record.step,
                    "ess": record.ess,
                    "resampled": record.resampled,
                    "ancestors": record.ancestors,
                    "particles": particles,
                }
            )
        events = [details for _, details in sorted(self._events, key=lambda e: e[0])]
        return {
            "format": FORMAT,
            "version": VERSION,
            "algorithm": self.algorithm,
            "question": self.question,
            "nodes": table,
            "steps": steps,
            "events": events,
            "answer": {"node": None if chosen is None else number(chosen), "answer": answer},
        }


def progress(record: _Step) -> dict:
    """What a progress report says of one step: where the sweep is, how many
    particles are still being extended, the effective sample size, whether
    it resampled, the best score so far and the tokens its particles hold."""
    scores = [n.score for n in record.nodes if n.score is not None]
    return {
        "iteration": record.iteration,
        "chain": record.chain,
        "step": record.step,
        "particles": len(record.nodes),
        "finished": sum(1 for n in record.nodes if n.done),
        "ess": record.ess,
        "resampled": record.resampled,
        "best_score": max(scores) if scores else None,
    }


def _finite_or_none(value: float | None) -> float | None:
    """JSON has no infinities: a zero weight's log (-inf) is stored as None."""
    return value if value is not None and math.isfinite(value) else None


def load_trace(data: dict) -> dict:
    """The trace inside ``data``: a bare trace, or a ``SearchResult.to_dict()``
    that holds one."""
    if isinstance(data, dict) and data.get("format") == FORMAT:
        return data
    if isinstance(data, dict) and isinstance(data.get("trace"), dict) and data["trace"].get("format") == FORMAT:
        return data["trace"]
    if isinstance(data, dict) and "trace" in data and data["trace"] is None:
        raise ValueError("this search result holds no trace; run the search with trace=True (--trace)")
    raise ValueError(f"not a piscale trace: expected a dict with format={FORMAT!r} or a search result with a 'trace'")
