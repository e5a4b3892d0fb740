"""A self-contained HTML page that draws a search's particle tree.

``render_html`` takes a trace (``piscale.search.trace``), or a search result
that holds one, and draws one panel per (iteration, chain): steps as
columns, particles as circles whose area follows their normalised weight,
edges to the ancestors they were resampled from, the chosen answer's lineage
in gold, the reference particle of particle Gibbs ringed in red, and the
whole partial answer of a particle shown on hover. ``piscale trace`` writes
the page; the search package itself only records.
"""

from __future__ import annotations

import html
import json
import math

from piscale.search.trace import load_trace

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
