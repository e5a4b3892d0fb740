"""Report groups as plots: accuracy against budget and against generated
tokens, one line per algorithm with its interval as a band, PNG and SVG."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from piscale.eval.summary import PASS_AT, Group

_MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*")
_DASHES = ("-", "--", "-.", ":")


def write_plots(groups: Sequence[Group], out_dir: str | Path) -> list[Path]:
    """Accuracy versus budget and versus generated tokens per problem, one
    line per algorithm with its interval as a band; PNG and SVG for each
    configuration. Returns the files written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for group in groups:
        for axis, label in (("budget", "budget (samples / particles)"), ("tokens", "generated tokens per problem")):
            figure, ax = plt.subplots(figsize=(6.4, 4.4), layout="constrained")
            for number, algorithm in enumerate(group.algorithms):
                cells = sorted((c for c in group.cells if c.algorithm == algorithm), key=lambda c: c.budget)
                xs = [c.budget if axis == "budget" else max(c.generated_tokens, 1e-9) for c in cells]
                ys = [100 * c.accuracy for c in cells]
                # Distinct markers and dashes keep coinciding lines (bon and wbon often are) visible;
                # the pass@n bound is drawn grey and dotted, apart from the algorithms.
                bound = algorithm.split("[")[0] == PASS_AT
                (line,) = ax.plot(
                    xs,
                    ys,
                    marker="" if bound else _MARKERS[number % len(_MARKERS)],
                    linestyle=":" if bound else _DASHES[number % len(_DASHES)],
                    markersize=5,
                    label=group.short_label(algorithm),
                    **({"color": "0.45"} if bound else {}),
                )
                ax.fill_between(
                    xs, [100 * c.low for c in cells], [100 * c.high for c in cells], color=line.get_color(), alpha=0.12
                )
            ax.set_xscale("log", base=2 if axis == "budget" else 10)
            if axis == "budget":
                ax.set_xticks(group.budgets, [str(b) for b in group.budgets])
            ax.set_xlabel(label)
            ax.set_ylabel("accuracy (%)")
            ax.set_title(f"{group.dataset}: {group.model}, reward {group.reward}", fontsize=10)
            ax.grid(True, alpha=0.3)
            ax.legend(title="algorithm", fontsize=8)
            # No date stamp and fixed SVG element ids: the same results give the
            # same files byte for byte, so a refreshed page changes only where
            # its numbers do.
            with matplotlib.rc_context({"svg.hashsalt": group.slug}):
                for suffix in ("png", "svg"):
                    path = out_dir / f"{group.slug}-accuracy-vs-{axis}.{suffix}"
                    figure.savefig(path, dpi=150 if suffix == "png" else None, metadata={"Date": None})
                    written.append(path)
            plt.close(figure)
    return written
