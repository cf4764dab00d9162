"""A run's training curves: loss, learning rate, online k-NN top-1 and images/s over steps, read from
``metrics.jsonl`` and drawn into ``curves.png`` (matplotlib is imported only when they are drawn)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from isdretrieve.util.plot import Panel, line_charts

CURVES_FILE = "curves.png"


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """The records of a ``metrics.jsonl``; a torn last line (a run killed mid-write) is skipped."""
    records = []
    for line in Path(path).read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


def _series(records: list[dict[str, Any]], key: str) -> tuple[list[float], list[float]]:
    points = [(r["step"], r[key]) for r in records if isinstance(r.get(key), (int, float)) and "step" in r]
    return [p[0] for p in points], [p[1] for p in points]


def write_training_curves(run_dir: str | Path, title: str = "") -> Path:
    """Draw RUN_DIR/metrics.jsonl into RUN_DIR/curves.png (atomically) and return its path."""
    run_dir = Path(run_dir)
    records = read_metrics(run_dir / "metrics.jsonl")
    steps = [r for r in records if "loss" in r]  # the per-log-step records
    monitored = [r for r in records if "knn_top1" in r]  # the k-NN monitor's, the untrained one first
    knn_label = f"(k={monitored[0]['knn_k']}, T={monitored[0]['knn_temperature']})" if monitored else ""
    panels = [
        Panel("loss", "step", {"loss": _series(steps, "loss")}, y_range=None),
        Panel("learning rate", "step", {"lr": _series(steps, "lr")}, y_range=None),
        Panel(
            f"online k-NN top-1 {knn_label}", "step", {"top-1": _series(monitored, "knn_top1")}, y_range=None
        ),
        Panel("throughput", "step", {"images/s": _series(steps, "images_per_s")}, None, "images/s"),
    ]
    return line_charts(panels, run_dir / CURVES_FILE, title=title or run_dir.name)
