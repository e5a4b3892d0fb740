"""Training curves: loss, gradient norm and learning rate against step, one
line per run (a single run, or the runs of a sweep side by side)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

_PANELS = (("loss", "training loss (completion tokens)"), ("grad_norm", "gradient norm (before clipping)"),
           ("learning_rate", "learning rate"))


def plot_runs(runs: Mapping[str, Sequence], path: str | Path, early_step: Mapping[str, int] | None = None) -> Path:
    """One figure of three panels; ``runs`` maps a name to its per-step
    metrics (objects with ``step``, ``loss``, ``grad_norm``,
    ``learning_rate``). ``early_step`` marks where each run's early
    indicators end. The format follows the file's suffix (PNG, SVG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 3, figsize=(12, 3.6), layout="constrained")
    for number, (name, metrics) in enumerate(runs.items()):
        steps = [m.step for m in metrics]
        for ax, (field, _) in zip(axes, _PANELS):
            (line,) = ax.plot(steps, [getattr(m, field) for m in metrics], marker="o" if len(steps) < 30 else "",
                              markersize=3, label=name, linestyle=("-", "--", "-.", ":")[number % 4])
            if early_step and name in early_step:
                ax.axvline(early_step[name], color=line.get_color(), alpha=0.3, linewidth=1)
    for ax, (_, label) in zip(axes, _PANELS):
        ax.set_xlabel("optimiser step")
        ax.set_title(label, fontsize=10)
        ax.grid(alpha=0.3)
    axes[2].ticklabel_format(axis="y", style="sci", scilimits=(0, 0))
    if len(runs) > 1:
        axes[0].legend(fontsize=8)
    path = Path(path)
    figure.savefig(path, dpi=90)
    plt.close(figure)
    return path
