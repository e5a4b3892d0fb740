"""Training curves: loss, gradient norm and learning rate against the data
seen, one line per run (a single run, or the runs of a sweep side by side)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

_PANELS = (("loss", "training loss (completion tokens)"), ("grad_norm", "gradient norm (before clipping)"),
           ("learning_rate", "learning rate"))


def plot_runs(runs: Mapping[str, Sequence], path: str | Path, early_step: Mapping[str, int] | None = None) -> Path:
    """One figure of three panels; ``runs`` maps a name to its per-step
    metrics (objects with ``step``, ``loss``, ``grad_norm``,
    ``learning_rate``, ``epoch``). ``early_step`` marks the step where each
    run's early indicators end. The format follows the file's suffix (PNG, SVG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 3, figsize=(12, 3.6), layout="constrained")
    for number, (name, metrics) in enumerate(runs.items()):
        # Against the data seen, not the step: runs with larger batches take
        # fewer, longer steps, and their curves then line up with the others.
        seen = [m.epoch for m in metrics]
        for ax, (field, _) in zip(axes, _PANELS):
            (line,) = ax.plot(seen, [getattr(m, field) for m in metrics], marker="o" if len(seen) < 30 else "",
                              markersize=3, label=name, linestyle=("-", "--", "-.", ":")[number % 4])
            marks = [m.epoch for m in metrics if early_step and m.step == early_step.get(name)]
            if marks:
                ax.axvline(marks[0], color=line.get_color(), alpha=0.35, linewidth=1)
    for ax, (_, label) in zip(axes, _PANELS):
        ax.set_xlabel("epochs of data seen")
        ax.set_title(label, fontsize=10)
        ax.grid(alpha=0.3)
    axes[2].ticklabel_format(axis="y", style="sci", scilimits=(0, 0))
    if len(runs) > 1:
        axes[0].legend(fontsize=8)
    path = Path(path)
    figure.savefig(path, dpi=90)
    plt.close(figure)
    return path
