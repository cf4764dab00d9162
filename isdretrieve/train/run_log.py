"""Where a run reports: ``metrics.jsonl`` (one JSON object per line), TensorBoard when installed, and a
rich progress bar with images/s. Only the main process writes."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn


class RunLog:
    def __init__(self, out_dir: Path, *, enabled: bool = True, quiet: bool = False) -> None:
        self.enabled, self.quiet = enabled, quiet
        self.console = Console(stderr=True, quiet=quiet or not enabled)
        self.metrics_path = out_dir / "metrics.jsonl"
        self._tb = _tensorboard_writer(out_dir / "tensorboard") if enabled else None
        self._progress: Progress | None = None
        self._task = None

    def write(self, record: dict[str, Any]) -> None:
        """Append one record (a step's or an epoch's numbers) to metrics.jsonl and TensorBoard."""
        if not self.enabled:
            return
        record = {"time": round(time.time(), 3), **record}
        with self.metrics_path.open("a") as fh:
            fh.write(json.dumps(record) + "\n")
        if self._tb is not None and "step" in record:
            for key, value in record.items():
                if isinstance(value, (int, float)) and key not in ("step", "time"):
                    self._tb.add_scalar(key, value, record["step"])

    def info(self, message: str) -> None:
        if self.enabled:
            self.console.print(message)

    def start_epoch(self, epoch: int, epochs: int, steps: int) -> None:
        if not self.enabled or self.quiet or not self.console.is_terminal:
            return  # logs and CI get the per-epoch lines only
        self._progress = Progress(
            TextColumn(f"epoch {epoch + 1}/{epochs}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[status]}"),
            TimeRemainingColumn(),
            console=self.console,
            transient=True,
        )
        self._progress.start()
        self._task = self._progress.add_task("train", total=steps, status="")

    def advance(self, steps: int, status: str = "") -> None:
        if self._progress is not None:
            self._progress.update(self._task, advance=steps, status=status)

    def end_epoch(self) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None

    def close(self) -> None:
        self.end_epoch()
        if self._tb is not None:
            self._tb.close()


def _tensorboard_writer(path: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # tensorboard is optional
        return None
    return SummaryWriter(str(path))
