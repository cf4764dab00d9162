"""Training checkpoints on disk: ``OUT/checkpoints/epoch-NNNN.pt``, written atomically, newest wins.

A checkpoint written on SIGTERM/SIGINT in the middle of an epoch is ``epoch-NNNN-step-SSSS.pt``: NNNN
epochs completed, then SSSS steps of the next one; it sorts between ``epoch-NNNN`` and ``epoch-NNNN+1``.

A checkpoint that cannot be read (truncated by a crash or a full disk) is skipped with a warning and
the previous one is used.
"""

from __future__ import annotations

import re
import warnings
from pathlib import Path
from typing import Any

from isdretrieve.errors import CheckpointError
from isdretrieve.models.checkpoints import CHECKPOINT_FORMAT, atomic_save, safe_load

_NAME = re.compile(r"epoch-(\d+)(?:-step-(\d+))?\.pt$")


def checkpoint_dir(out_dir: Path) -> Path:
    return out_dir / "checkpoints"


def list_checkpoints(out_dir: Path) -> list[Path]:
    """Checkpoint files of a run, oldest first."""
    folder = checkpoint_dir(out_dir)
    if not folder.is_dir():
        return []
    found = [
        ((int(m.group(1)), int(m.group(2) or 0)), p)
        for p in folder.iterdir()
        if (m := _NAME.fullmatch(p.name))
    ]
    return [p for _, p in sorted(found)]


def save_checkpoint(out_dir: Path, state: dict[str, Any], epoch: int, keep: int, epoch_step: int = 0) -> Path:
    """Write ``state`` as the checkpoint of ``epoch`` (atomically) and prune all but the ``keep`` newest.

    ``epoch_step`` > 0 marks a mid-epoch checkpoint: ``epoch`` completed epochs plus that many steps.
    """
    name = f"epoch-{epoch:04d}" + (f"-step-{epoch_step:04d}" if epoch_step else "")
    path = checkpoint_dir(out_dir) / f"{name}.pt"
    atomic_save({"format": CHECKPOINT_FORMAT, **state}, path)
    for old in list_checkpoints(out_dir)[:-keep] if keep > 0 else []:
        old.unlink(missing_ok=True)
    return path


def load_latest_checkpoint(out_dir: Path) -> tuple[Path, dict[str, Any]] | None:
    """The newest readable checkpoint of a run, or None when there is none."""
    for path in reversed(list_checkpoints(out_dir)):
        try:
            state = safe_load(path)
        except CheckpointError as exc:
            warnings.warn(f"skipping unreadable checkpoint: {exc}", stacklevel=2)
            continue
        if isinstance(state, dict) and state.get("format") == CHECKPOINT_FORMAT:
            return path, state
        warnings.warn(f"skipping {path}: not an isdretrieve training checkpoint", stacklevel=2)
    return None
