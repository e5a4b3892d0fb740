"""Refresh the measured parts of docs/results.md from the tracked databases.

Each block of the page between ``<!-- report NAME -->`` and ``<!-- /report -->``
is replaced by ``piscale report`` on ``experiments/db/NAME.sqlite`` (tables,
footnotes and the two plots, written to ``docs/results/NAME/``). The prose
around the blocks is written by hand and must be re-read after a refresh.

    python experiments/page.py            # run from the repository root
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path


ROOT = Path(__file__).resolve().parent.parent
PAGE = ROOT / "docs" / "results.md"
BLOCK = re.compile(r"(<!-- report (?P<name>[\w.-]+) -->\n).*?(<!-- /report -->)", re.S)


def database(name: str) -> Path:
    db = ROOT / "experiments" / "db" / f"{name}.sqlite"
    if not db.exists():
        sys.exit(f"{db} does not exist: run experiments/run.sh and experiments/snapshot.sh first")
    return db


def report_block(name: str) -> str:
    db = database(name)
    out = ROOT / "docs" / "results" / name
    piscale = Path(sys.executable).with_name("piscale")
    done = subprocess.run(
        [str(piscale), "report", str(db), "--markdown", "--out", str(out)], capture_output=True, text=True, cwd=ROOT
    )
    if done.returncode != 0:
        sys.exit(f"piscale report {db} failed:\n{done.stderr}")
    text = (out / "report.md").read_text()
    # The page has its own heading for each block; drop the report's.
    body = text.split("\n", 1)[1].strip() if text.startswith("### ") else text.strip()
    plots = sorted(p.name for p in out.glob("*-accuracy-vs-*.png"))
    images = [f"![{p.rsplit('-accuracy-', 1)[1][:-4].replace('-', ' ')}](results/{name}/{p})" for p in plots]
    return body + "\n\n" + "\n".join(images) + "\n"


def main() -> None:
    page = PAGE.read_text()
    if not BLOCK.search(page):
        sys.exit(f"{PAGE} has no <!-- report NAME --> blocks")
    PAGE.write_text(BLOCK.sub(lambda m: m[1] + report_block(m["name"]) + m[3], page))


if __name__ == "__main__":
    main()
