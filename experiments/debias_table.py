"""The tables of docs/debias.md from the runs' report.json files.

    .venv/bin/python experiments/debias_table.py gender topic location
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent / "debias"
RUNS = ("sample", "sample-2draws", "pf-beta1", "pf-beta4", "pf-beta16", "bon4")


def label(report: dict, folder: str) -> str:
    s = report["run"]["sampling"]
    if s["method"] == "sample":
        return "sampling" + (" (first 2 draws)" if folder.endswith("2draws") else "")
    if s["method"] == "pf":
        return f"PF, β = {s['beta']:g}, N = {s['particles']}"
    return f"best-of-{s['particles']}"


def cell(c: dict, sign: bool = False) -> str:
    f = "{:+.4f}" if sign else "{:.4f}"
    return f"{f.format(c['value'])} [{f.format(c['low'])}, {f.format(c['high'])}]"


def table(attribute: str) -> str:
    reports = [(name, json.loads(p.read_text())) for name in RUNS if (p := ROOT / f"{attribute}-{name}" / "report.json").exists()]
    if not reports:
        return f"(no runs of {attribute})\n"
    first = reports[0][1]["bias"]
    pairs = [(p["a"], p["b"]) for p in first["pairs"]]
    # W1 of the pair furthest apart in the first run only: the tables stay readable.
    widest = max(first["pairs"], key=lambda p: p["wasserstein"]["value"])
    w1_pairs = [(widest["a"], widest["b"])]
    values = [v for v in first["values"] if v != "neutral"]
    head = ["run", "n per value"] + [f"{a} − {b}: mean diff" for a, b in pairs] + [f"{a} − {b}: W1 (no-bias 95%)" for a, b in w1_pairs]
    head += [f"sd of s: {v}" for v in values] + ["perplexity", "distinct-1", "distinct-2", "tokens / continuation", "wall time (s)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, report in reports:
        bias, q = report["bias"], report["quality_attributed"]
        by_pair = {(p["a"], p["b"]): p for p in bias["pairs"]}
        row = [label(report, name), str(min(bias["values"][v]["n"] for v in values))]
        row += [cell(by_pair[pair]["mean_difference"], sign=True) for pair in pairs]
        row += [f"{cell(by_pair[pair]['wasserstein'])} ({by_pair[pair]['null_wasserstein']['q95']:.4f})" for pair in w1_pairs]
        row += [f"{bias['values'][v]['sd']:.4f}" for v in values]
        row += [f"{q['perplexity']:.1f}", f"{q['distinct_1']:.3f}", f"{q['distinct_2']:.3f}",
                f"{q['generated_tokens_per_continuation']:.0f}", f"{q['seconds']:.0f}"]
        lines.append("| " + " | ".join(row) + " |")
    neutral = first["values"].get("neutral")
    if neutral is not None:
        lines.append("")
        lines.append(f"Neutral prompts (the target): n = {neutral['n']}, mean s {cell(neutral['mean'], sign=True)}, sd {neutral['sd']:.4f}.")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    for attribute in sys.argv[1:] or ["gender"]:
        print(f"### {attribute}\n")
        print(table(attribute))
