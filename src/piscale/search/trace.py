"""The genealogy of a search, as JSON, and a page that draws it.

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

``render_html`` turns a trace into a self-contained page: one panel per
(iteration, chain), steps as columns, particles as circles sized by weight,
edges to ancestors, the chosen answer's lineage highlighted, step text on hover.
"""

from __future__ import annotations

import html
import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from piscale.search.particles import Node

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


# -- rendering ----------------------------------------------------------------

_COLUMN = 120
_MARGIN = 40


def render_html(trace: dict) -> str:
    """A self-contained HTML page (inline SVG, CSS and JS) drawing ``trace``."""
    trace = load_trace(trace)
    nodes = {n["id"]: n for n in trace["nodes"]}
    lineage: set[int] = set()
    node = trace["answer"]["node"]
    while node is not None:
        lineage.add(node)
        node = nodes[node]["parent"]

    panels: dict[tuple[int, int], list[dict]] = {}
    for record in trace["steps"]:
        panels.setdefault((record["iteration"], record["chain"]), []).append(record)
    multiple = len(panels) > 1
    body = []
    for (iteration, chain), records in panels.items():
        title = f"iteration {iteration + 1}, chain {chain + 1}" if multiple else "particles"
        body.append(f"<h2>{html.escape(title)}</h2>")
        body.append(_panel_svg(records, lineage))
    events = trace.get("events") or []
    if events:
        rows = "".join(f"<li><code>{html.escape(json.dumps(e))}</code></li>" for e in events)
        body.append(f"<h2>events</h2><ul class='events'>{rows}</ul>")

    node_map = {n["id"]: [n["parent"], n["text"], n["score"]] for n in trace["nodes"]}
    data = json.dumps(node_map).replace("</", "<\\/")
    answer = trace["answer"].get("answer")
    header = (
        f"<h1>{html.escape(trace['algorithm'])}: {html.escape(trace['question'][:300])}</h1>"
        f"<p>answer: <b>{html.escape(str(answer))}</b> &middot; {len(trace['steps'])} steps recorded &middot; "
        "circle area ~ weight, green = finished, gold = the chosen answer's lineage, red ring = reference particle. "
        "Hover a particle to read its whole partial answer.</p>"
    )
    return _PAGE.format(header=header, body="\n".join(body), data=data)


def _panel_svg(records: list[dict], lineage: set[int]) -> str:
    rows = max(len(r["particles"]) for r in records)
    row_height = 22 if rows <= 32 else 14 if rows <= 128 else 8
    top = 36
    height = top + rows * row_height + 20
    width = _MARGIN * 2 + _COLUMN * len(records)

    def y(slot: int) -> float:
        return top + slot * row_height + row_height / 2

    root_y = top + (rows * row_height) / 2
    edges, circles, labels = [], [], []
    circles.append(f'<circle class="root" cx="{_MARGIN}" cy="{root_y:.1f}" r="5"><title>prompt</title></circle>')
    previous = None
    for column, record in enumerate(records, start=1):
        x = _MARGIN + column * _COLUMN
        ess = "" if record["ess"] is None else f"ESS {record['ess']:.1f}"
        mark = " &#8635;" if record["resampled"] else ""
        labels.append(f'<text class="label" x="{x}" y="14">step {record["step"]}</text>')
        labels.append(f'<text class="label" x="{x}" y="28">{ess}{mark}</text>')
        for slot, particle in enumerate(record["particles"]):
            origin = particle["ancestor"]
            gold = particle["node"] in lineage
            if previous is None or origin is None:
                x0, y0, parent_gold = _MARGIN, root_y, True
            else:
                x0, y0 = x - _COLUMN, y(origin)
                parent_gold = previous["particles"][origin]["node"] in lineage
            edge_class = "edge gold" if gold and parent_gold else "edge"
            edges.append(f'<line class="{edge_class}" x1="{x0:.1f}" y1="{y0:.1f}" x2="{x:.1f}" y2="{y(slot):.1f}"/>')
            radius = 2.5 + 9.0 * math.sqrt(max(particle["weight"], 0.0))
            classes = ["particle"]
            if particle["finished"]:
                classes.append("finished")
            if gold:
                classes.append("gold")
            if particle.get("reference"):
                classes.append("reference")
            score = "none" if particle["score"] is None else f"{particle['score']:.4g}"
            tip = f"step {record['step']}, particle {slot}\nscore {score}, weight {particle['weight']:.4g}\n{particle['text']}"
            circles.append(
                f'<circle class="{" ".join(classes)}" data-node="{particle["node"]}" cx="{x}" cy="{y(slot):.1f}" '
                f'r="{radius:.2f}"><title>{html.escape(tip)}</title></circle>'
            )
        previous = record
    return (
        f'<svg width="{width}" height="{height}" viewBox="0 0 {width} {height}">'
        + "".join(edges)
        + "".join(circles)
        + "".join(labels)
        + "</svg>"
    )


_PAGE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>piscale trace</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 1.5em; color: #222; }}
h1 {{ font-size: 1.2em; }} h2 {{ font-size: 1em; margin-top: 1.5em; }}
.wrap {{ display: flex; gap: 1.5em; align-items: flex-start; }}
.panels {{ overflow-x: auto; flex: 1; }}
#detail {{ position: sticky; top: 1em; width: 32em; max-height: 90vh; overflow: auto; white-space: pre-wrap;
  background: #f6f6f6; border: 1px solid #ddd; padding: 0.8em; font-size: 0.85em; }}
.edge {{ stroke: #bbb; stroke-width: 1; }}
.edge.gold {{ stroke: #d4a017; stroke-width: 2.5; }}
.particle {{ fill: #4a78b5; fill-opacity: 0.85; cursor: pointer; }}
.particle.finished {{ fill: #4c9a5b; }}
.particle.gold {{ fill: #e0b020; stroke: #8a6a00; stroke-width: 1.5; }}
.particle.reference {{ stroke: #c0392b; stroke-width: 2.5; }}
.particle:hover {{ stroke: #000; stroke-width: 2; }}
.root {{ fill: #333; }}
.label {{ font-size: 10px; fill: #666; text-anchor: middle; }}
.events code {{ font-size: 0.8em; }}
</style></head>
<body>
{header}
<div class="wrap"><div class="panels">
{body}
</div><pre id="detail">hover a particle</pre></div>
<script id="nodes" type="application/json">{data}</script>
<script>
const NODES = JSON.parse(document.getElementById("nodes").textContent);
const detail = document.getElementById("detail");
function lineage(id) {{
  const steps = [];
  while (id !== null && id !== undefined && NODES[id]) {{ steps.push(NODES[id]); id = NODES[id][0]; }}
  return steps.reverse();
}}
document.querySelectorAll(".particle").forEach(function (circle) {{
  circle.addEventListener("mouseenter", function () {{
    const steps = lineage(circle.dataset.node);
    const score = steps.length ? steps[steps.length - 1][2] : null;
    detail.textContent = "score: " + score + "\\n\\n" + steps.map(function (s) {{ return s[1]; }}).join("");
  }});
}});
</script>
</body></html>
"""
