"""Line charts drawn with matplotlib (Agg backend, imported only when a chart is drawn): the mining
audit's curves and a training run's ``curves.png``."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from isdretrieve.files.atomic import atomic_path

PANEL_INCHES = (5.0, 3.4)  # width, height of one panel
COLUMNS = 2  # panels per row


@dataclass
class Panel:
    """One chart: named series of (x, y) points; ``y_range`` None scales the y axis to the data."""

    title: str
    x_label: str
    series: dict[str, tuple[Sequence[float], Sequence[float]]] = field(default_factory=dict)
    y_range: tuple[float, float] | None = (0.0, 1.0)
    y_label: str = ""
    log_y: bool = False


def line_charts(panels: Sequence[Panel], path: str | Path, *, title: str = "") -> Path:
    """Draw ``panels`` in rows of two into the PNG ``path`` (written atomically)."""
    import matplotlib

    matplotlib.use("Agg", force=False)  # no display needed; keeps an interactive backend if one is set
    from matplotlib.figure import Figure

    cols = min(COLUMNS, max(1, len(panels)))
    rows = -(-max(1, len(panels)) // cols)
    fig = Figure(figsize=(PANEL_INCHES[0] * cols, PANEL_INCHES[1] * rows), dpi=100, layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    for ax, panel in zip(axes, panels, strict=False):
        _draw(ax, panel)
    for ax in axes[len(panels) :]:
        ax.set_visible(False)
    if title:
        fig.suptitle(title)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    return Path(path)


def _draw(ax, panel: Panel) -> None:
    for name, (xs, ys) in panel.series.items():
        marker = "o" if len(xs) <= 30 else None
        ax.plot(list(xs), list(ys), marker=marker, markersize=3, linewidth=1.5, label=name)
    ax.set_title(panel.title)
    ax.set_xlabel(panel.x_label)
    if panel.y_label:
        ax.set_ylabel(panel.y_label)
    if panel.log_y:
        ax.set_yscale("log")
    if panel.y_range is not None:
        ax.set_ylim(*panel.y_range)
    ax.grid(True, alpha=0.3)
    if len(panel.series) > 1:
        ax.legend(loc="best", fontsize="small")
    if not any(len(xs) for xs, _ in panel.series.values()):
        ax.text(0.5, 0.5, "no data yet", ha="center", va="center", transform=ax.transAxes, color="grey")
