"""What an export's loops share: the job, its result, the progress bar, and the check of each batch."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from isdretrieve.data.datasets import ImageDataset
from isdretrieve.encoder import FrozenEncoder
from isdretrieve.errors import BankError

MAX_SKIPPED_PATHS = 1000  # skipped images named in the bank (the count is always exact)
DELETE_HINT = "delete it or choose another --out"


@dataclass
class ExportResult:
    path: Path
    rows: int  # rows in the finished bank
    skipped: int  # unreadable images skipped (whole bank)
    seconds: float  # this call
    images_per_s: float  # images processed by this call per second (0 when there was nothing to do)
    resumed_from: int = 0  # rows found already written by an interrupted export


@dataclass(frozen=True)
class ExportJob:
    """One rank's export: the encoder, the data, the block of dataset items ``lo:hi`` it owns (and, for
    ``wds:`` data, its block of tar shards), and how batches are made and checked."""

    encoder: FrozenEncoder
    dataset: ImageDataset
    out: Path
    lo: int
    hi: int
    dtype: str
    on_bad_image: str
    batch_size: int
    workers: int
    progress: bool
    started: float
    shard_block: list[int] | None = None

    def result(self, rows: int, skipped: int, processed: int, resumed_from: int) -> ExportResult:
        """The result of this call, with the images/s of the images it processed itself."""
        seconds = time.perf_counter() - self.started
        rate = processed / seconds if seconds > 0 else 0.0
        return ExportResult(self.out, rows, skipped, seconds, rate, resumed_from)

    def rate(self, processed: int) -> float:
        return processed / max(time.perf_counter() - self.started, 1e-9)


def check_finite(features: torch.Tensor, keep: torch.Tensor, indices: torch.Tensor) -> None:
    """BankError unless the kept rows of a batch's features are finite."""
    if not torch.isfinite(features[keep]).all():
        a, b = int(indices[0]), int(indices[-1])
        raise BankError(f"the encoder produced non-finite features for dataset items {a}..{b}")


@contextlib.contextmanager
def progress_bar(enabled: bool, *, total: int, done: int) -> Iterator[Callable[[int, float], Any]]:
    """A rich bar with images/s on stderr; yields ``advance(n_images, rate)``."""
    if not enabled:
        yield lambda n, rate: None
        return
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    columns = (
        TextColumn("export"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[rate]} img/s"),
        TimeRemainingColumn(),
    )
    with Progress(*columns, console=Console(stderr=True)) as bar:  # stdout is for results
        task = bar.add_task("export", total=total, completed=done, rate="-")
        yield lambda n, rate: bar.update(task, advance=n, rate=f"{rate:,.0f}")
