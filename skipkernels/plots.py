"""Charts of training runs and benchmarks, drawn with matplotlib's Agg renderer.

matplotlib is optional: without it a chart is skipped with a one-line message. Figures are made
with ``matplotlib.figure.Figure`` on an Agg canvas, never through pyplot, so drawing changes no
global backend or state of the calling program.
"""
from __future__ import annotations

import csv
import sys
from pathlib import Path

from skipkernels._compat import install_hint

METRICS_COLUMNS = ("step", "epoch", "loss", "lr", "time_s")


def write_metrics_csv(steps: list[dict], path, append: bool = False) -> None:
    """One row per training step: ``METRICS_COLUMNS``. ``append``: add the rows to the file
    (flushed on return) instead of writing it anew with its header."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a" if append else "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=METRICS_COLUMNS, extrasaction="ignore")
        if not append:
            writer.writeheader()
        writer.writerows(steps)


def _new_figure(path: Path, **kwargs):
    """An Agg-backed Figure, or None (after saying so) when matplotlib is not installed."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        print(f"matplotlib is not installed: {path.name} not drawn ({install_hint('matplotlib')})", file=sys.stderr)
        return None
    figure = Figure(**kwargs)
    FigureCanvasAgg(figure)
    return figure


def _save(figure, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=100)


def training_chart(steps: list[dict], evaluations: list[dict], path, title: str) -> bool:
    """Loss and learning rate per step; accuracy (base, new, HM, or all) at each evaluated epoch when
    there is any (epoch 0, when there, is the zero-shot model: the accuracy panel's title says so
    only then). Returns False when the chart was not drawn."""
    path = Path(path)
    panels = 3 if evaluations else 2
    figure = _new_figure(path, figsize=(4.2 * panels, 3.6), layout="constrained")
    if figure is None:
        return False
    axes = figure.subplots(1, panels, squeeze=False)[0]
    x = [s["step"] for s in steps]
    axes[0].plot(x, [s["loss"] for s in steps], lw=0.8, color="tab:blue", alpha=0.6, label="step")
    by_epoch: dict[int, list[dict]] = {}
    for s in steps:
        by_epoch.setdefault(s["epoch"], []).append(s)
    axes[0].plot([max(r["step"] for r in rows) for rows in by_epoch.values()],
                 [sum(r["loss"] for r in rows) / len(rows) for rows in by_epoch.values()],
                 "o-", color="tab:red", ms=3, label="epoch mean")
    axes[0].set(title="training loss", xlabel="step", ylabel="cross-entropy")
    axes[0].legend(fontsize="small")
    axes[1].plot(x, [s["lr"] for s in steps], color="tab:green")
    axes[1].set(title="learning rate (--lr)", xlabel="step")  # the image tower's --lr-image has the same shape
    axes[1].ticklabel_format(axis="y", style="sci", scilimits=(-2, 2))
    if evaluations:
        epochs = [e["epoch"] for e in evaluations]
        for key in ("all", "base", "new", "hm"):  # all: a run on all classes (no base/new split)
            if all(key in e for e in evaluations):
                axes[2].plot(epochs, [e[key] for e in evaluations], "o-", label=key if key != "hm" else "HM")
        zero_shot = " (epoch 0: zero-shot)" if any(e["epoch"] == 0 for e in evaluations) else ""
        axes[2].set(title=f"test accuracy{zero_shot}", xlabel="epoch", ylabel="%")
        axes[2].legend(fontsize="small")
    figure.suptitle(title, fontsize="medium")
    _save(figure, path)
    return True


def bar_chart(panels: list[tuple[str, dict[str, float]]], path, title: str,
              reference_line: tuple[int, float | None] | None = None, share_y: bool = False,
              markers: list[dict[str, float] | None] | None = None, marker_label: str = "") -> bool:
    """Side-by-side bar panels ``(label, {bar name: value})``, each bar labelled with its value.
    ``reference_line=(panel index, value)`` draws a dashed horizontal line there (None: none).
    ``share_y``: one y-scale for every panel (panels of one quantity, so bars compare across them).
    ``markers``: per panel, {bar name: value} drawn as a black mark on that bar (bars not named
    get none), with ``marker_label`` in the panel's legend."""
    path = Path(path)
    figure = _new_figure(path, figsize=(max(3.6, 11 / len(panels)) * len(panels), 4.2), layout="constrained")
    if figure is None:
        return False
    axes = figure.subplots(1, len(panels), squeeze=False, sharey=share_y)[0]
    for index, (ax, (label, values)) in enumerate(zip(axes, panels)):
        colours = [f"C{i % 10}" for i in range(len(values))]
        bars = ax.bar(list(values), list(values.values()), color=colours)
        ax.bar_label(bars, fmt="%.1f", fontsize="small")
        marks = {name: v for name, v in ((markers or [None] * len(panels))[index] or {}).items() if name in values}
        if marks:
            ax.scatter(list(marks), list(marks.values()), marker="_", s=600, linewidths=2.5, color="black",
                       zorder=3, label=marker_label or None)
            if marker_label:
                ax.legend(fontsize="small", loc="lower right")
        ax.set_title(label)
        for tick in ax.get_xticklabels():  # long mode names
            tick.set(rotation=35, ha="right", fontsize="small")
        ax.margins(y=0.15)
    if reference_line is not None and reference_line[1] is not None:
        axes[reference_line[0]].axhline(reference_line[1], color="black", ls="--", lw=1)
    figure.suptitle(title, fontsize="medium")
    _save(figure, path)
    return True
