"""A self-contained HTML page to explore an extraction: pick a story, see its
characters (gender, certainty, importance, mentions) and each main
character's event chain in temporal order (saying which order the
extraction used), coloured by verb category, and
the corpus-level odds ratios with their intervals.

``render_page`` takes results (``output.load_results``) and, optionally, the
rows of ``piscale narrative bias`` (its ``bias.json``). Everything is inline
(CSS, JS, SVG, data); the page needs no server and no network.
"""

from __future__ import annotations

import html
import json
import math
from collections.abc import Sequence
from typing import Any

from piscale.narrative.schema import StoryResult

__all__ = ["CATEGORY_COLOURS", "render_page"]

# One colour per WordNet verb supersense.
CATEGORY_COLOURS = {
    "verb.body": "#e377c2",
    "verb.change": "#8c564b",
    "verb.cognition": "#9467bd",
    "verb.communication": "#1f77b4",
    "verb.competition": "#d62728",
    "verb.consumption": "#bcbd22",
    "verb.contact": "#ff7f0e",
    "verb.creation": "#17becf",
    "verb.emotion": "#f7b6d2",
    "verb.motion": "#2ca02c",
    "verb.perception": "#aec7e8",
    "verb.possession": "#ffbb78",
    "verb.social": "#98df8a",
    "verb.stative": "#c7c7c7",
    "verb.weather": "#7f7f7f",
}
_OTHER = "#dddddd"
_CONTEXT = 220  # characters of the sentence shown with an event


def _story_data(result: StoryResult) -> dict[str, Any]:
    main = {c.id for c in result.characters if c.importance in ("primary", "secondary")}
    chains = {}
    for character in result.characters:
        if character.id not in main:
            continue
        chains[character.id] = [
            [
                e.verb,
                e.category or "",
                e.role[0],
                e.temporal_rank,
                result.sentences[e.sentence].text[:_CONTEXT] if e.sentence < len(result.sentences) else "",
                int(e.salient),
            ]
            for e in result.chain(character.id)
        ]
    return {
        "id": result.id,
        "origin": result.origin,
        "characters": [
            [
                c.id,
                c.name,
                c.gender,
                round(c.gender_certainty, 2),
                c.importance,
                c.mentions,
                len(result.chain(c.id)),
                c.animacy,
            ]
            for c in result.characters
        ],
        "chains": chains,
    }


def _bias_svg(rows: Sequence[dict[str, Any]]) -> str:
    overall = sorted((r for r in rows if r["segment"] == "all"), key=lambda r: r["log_odds_ratio"])
    if not overall:
        return "<p>no bias table given (run <code>piscale narrative bias</code> and pass <code>--bias</code>)</p>"
    values = [math.log(r["ci_low"]) for r in overall] + [math.log(r["ci_high"]) for r in overall]
    extent = max(1.0, max(abs(v) for v in values if math.isfinite(v)))
    width, left, right, row_height, top = 640, 150, 20, 22, 24
    height = top + row_height * len(overall) + 40
    scale = (width - left - right) / (2 * extent)

    def x(value: float) -> float:
        return left + (value + extent) * scale

    parts = [
        f'<svg id="bias-plot" width="{width}" height="{height}" viewBox="0 0 {width} {height}" role="img" '
        'aria-label="log odds ratios of verb categories, female versus male characters">',
        f'<line class="zero" x1="{x(0):.1f}" y1="{top - 8}" x2="{x(0):.1f}" y2="{height - 34}"/>',
    ]
    for i, row in enumerate(overall):
        y = top + i * row_height + row_height / 2
        low, high, point = math.log(row["ci_low"]), math.log(row["ci_high"]), row["log_odds_ratio"]
        colour = CATEGORY_COLOURS.get(row["category"], _OTHER)
        tip = (
            f"{row['category']}: OR {row['odds_ratio']:.2f} [{row['ci_low']:.2f}, {row['ci_high']:.2f}]; "
            f"female {row['female']}/{row['female_total']}, male {row['male']}/{row['male_total']}"
        )
        parts.append(
            f'<g class="bias-row"><title>{html.escape(tip)}</title>'
            f'<text class="cat" x="{left - 8}" y="{y + 4:.1f}">{html.escape(row["category"].removeprefix("verb."))}</text>'
            f'<line class="ci" x1="{x(low):.1f}" y1="{y:.1f}" x2="{x(high):.1f}" y2="{y:.1f}"/>'
            f'<circle cx="{x(point):.1f}" cy="{y:.1f}" r="5" fill="{colour}" stroke="#333"/></g>'
        )
    axis_y = height - 26
    for tick in range(-math.ceil(extent), math.ceil(extent) + 1):
        if abs(tick) <= extent:
            parts.append(f'<text class="tick" x="{x(tick):.1f}" y="{axis_y}">{tick}</text>')
    parts.append(
        f'<text class="tick" x="{(left + width - right) / 2:.1f}" y="{height - 8}">'
        "log odds ratio; right of 0: more often a female character's verb</text></svg>"
    )
    return "".join(parts)


_ORDER_WORDS = {
    "rules": "in story time (text order, corrected by tense, aspect and temporal connectives)",
    "text": "in text order",
}


def render_page(
    results: Sequence[StoryResult], bias_rows: Sequence[dict[str, Any]] | None = None, *, temporal: str | None = None
) -> str:
    """The page (see the module docstring); ``temporal`` names the order the
    extraction ranked events by (``index.json``'s settings), to say so."""
    stories = [_story_data(r) for r in results]
    data = json.dumps({"stories": stories, "colours": CATEGORY_COLOURS}, ensure_ascii=False).replace("</", "<\\/")
    legend = "".join(
        f'<span class="chip" style="background:{colour}">{html.escape(name.removeprefix("verb."))}</span>'
        for name, colour in CATEGORY_COLOURS.items()
    )
    order = html.escape(_ORDER_WORDS.get(temporal or "", "in temporal order"))
    summary = (
        f"{len(results)} stories, {sum(len(r.characters) for r in results)} characters, "
        f"{sum(len(r.events) for r in results)} events"
    )
    return _PAGE.format(
        summary=html.escape(summary), order=order, legend=legend, bias=_bias_svg(bias_rows or []), data=data
    )


_PAGE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>piscale narrative</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 1.5em; color: #222; }}
h1 {{ font-size: 1.2em; }} h2 {{ font-size: 1em; margin-top: 1.5em; }}
.wrap {{ display: flex; gap: 2em; align-items: flex-start; flex-wrap: wrap; }}
.left {{ flex: 1; min-width: 36em; }}
.table {{ max-height: 20em; overflow-y: auto; display: inline-block; border: 1px solid #eee; }}
table {{ border-collapse: collapse; font-size: 0.9em; }}
th, td {{ border-bottom: 1px solid #ddd; padding: 0.25em 0.6em; text-align: left; }}
td.num {{ text-align: right; }}
.female {{ color: #b03a7a; }} .male {{ color: #2a62a8; }} .group-or-unknown {{ color: #777; }}
.chain {{ margin: 0.4em 0 1em; line-height: 2em; }}
.chain h3 {{ font-size: 0.95em; margin: 0.2em 0; }}
.chip {{ display: inline-block; padding: 0 0.45em; margin: 0 0.15em 0.2em 0; border-radius: 0.6em;
  font-size: 0.8em; line-height: 1.6em; border: 1px solid rgba(0,0,0,0.15); cursor: default; }}
.chip.o {{ font-style: italic; border-style: dashed; }}
.chip.s {{ font-weight: 600; }}
.legend {{ font-size: 0.85em; }}
#context {{ background: #f6f6f6; border: 1px solid #ddd; padding: 0.6em; min-height: 2.5em; font-size: 0.85em; }}
#bias-plot .cat {{ font-size: 11px; text-anchor: end; }}
#bias-plot .tick {{ font-size: 10px; fill: #666; text-anchor: middle; }}
#bias-plot .ci {{ stroke: #333; stroke-width: 1.5; }}
#bias-plot .zero {{ stroke: #999; stroke-dasharray: 4 3; }}
select {{ font-size: 1em; max-width: 30em; }}
</style></head>
<body>
<h1>Narrative event chains and gender</h1>
<p>{summary}. Pick a story: its characters, then each main character's events {order}, coloured by
WordNet verb category (<b>bold</b>: the sentence's most salient event; <i>italic, dashed</i>: the character is the
object). Hover an event to read its sentence.</p>
<p><label for="story">story</label> <select id="story"></select> <span id="origin"></span></p>
<div class="wrap"><div class="left">
<h2>characters</h2>
<div class="table"><table id="characters"><thead><tr><th>name</th><th>gender</th><th>certainty</th>
<th>importance</th><th>mentions</th><th>events</th><th>kind</th></tr></thead><tbody></tbody></table></div>
<h2>event chains of the main characters</h2>
<div id="context">hover an event</div>
<div id="chains"></div>
<p class="legend">{legend}</p>
</div><div>
<h2>corpus: verb categories, female vs male characters</h2>
{bias}
</div></div>
<script id="data" type="application/json">{data}</script>
<script>
const DATA = JSON.parse(document.getElementById("data").textContent);
const select = document.getElementById("story");
const context = document.getElementById("context");
function cell(row, text, cls) {{
  const td = document.createElement("td");
  td.textContent = text;
  if (cls) td.className = cls;
  row.appendChild(td);
}}
function show(index) {{
  const story = DATA.stories[index];
  document.getElementById("origin").textContent = story ? story.origin : "";
  const body = document.querySelector("#characters tbody");
  body.innerHTML = "";
  const chains = document.getElementById("chains");
  chains.innerHTML = "";
  if (!story) return;
  if (!story.characters.length) {{
    const row = document.createElement("tr");
    cell(row, "no characters found");
    body.appendChild(row);
  }}
  const names = {{}};
  story.characters.forEach(function (c) {{
    names[c[0]] = c;
    const row = document.createElement("tr");
    row.className = "character";
    cell(row, c[1]); cell(row, c[2], c[2]); cell(row, c[3].toFixed(2), "num"); cell(row, c[4]);
    cell(row, c[5], "num"); cell(row, c[6], "num"); cell(row, c[7]);
    body.appendChild(row);
  }});
  Object.keys(story.chains).forEach(function (id) {{
    const c = names[id];
    const div = document.createElement("div");
    div.className = "chain";
    const title = document.createElement("h3");
    title.textContent = c[1] + " (" + c[2] + ", " + c[4] + ")";
    title.className = c[2];
    div.appendChild(title);
    story.chains[id].forEach(function (e) {{
      const chip = document.createElement("span");
      chip.className = "chip event" + (e[2] === "o" ? " o" : "") + (e[5] ? " s" : "");
      chip.style.background = DATA.colours[e[1]] || "{other}";
      chip.textContent = e[0];
      chip.title = (e[1] || "no category") + ", rank " + e[3];
      chip.addEventListener("mouseenter", function () {{
        context.textContent = (e[1] || "no category") + " \\u00b7 " + (e[2] === "o" ? "object" : "subject") +
          " \\u00b7 rank " + e[3] + ": " + e[4];
      }});
      div.appendChild(chip);
    }});
    chains.appendChild(div);
  }});
}}
DATA.stories.forEach(function (story, i) {{
  const option = document.createElement("option");
  option.value = i;
  option.textContent = story.id + " (" + story.characters.length + " characters)";
  select.appendChild(option);
}});
select.addEventListener("change", function () {{ show(Number(select.value)); }});
const wanted = decodeURIComponent(location.hash.slice(1));
const start = Math.max(0, DATA.stories.findIndex(function (s) {{ return s.id === wanted; }}));
select.value = start;
show(start);
</script>
</body></html>
"""
_PAGE = _PAGE.replace("{other}", _OTHER)
