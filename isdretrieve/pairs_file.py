"""Reading mined positive pairs (``pairs.h5``, written by :mod:`isdretrieve.mining`, which documents the
layout) with h5py and NumPy only, so that training on them (SePP) needs neither FAISS nor the index layer."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import h5py
import numpy as np

from isdretrieve.bank_file import attr_value
from isdretrieve.errors import BankError, IsdError

if TYPE_CHECKING:
    import torch

PAIRS_FORMAT = "isdretrieve.pairs/1"


@dataclass(frozen=True)
class MiningParams:
    """``k`` candidates per row; keep those ≥ ``threshold`` (or ≥ the ``quantile`` of all candidate
    similarities); ``mutual``: keep j for i only if i is also among j's candidates."""

    k: int = 5
    threshold: float | None = None
    quantile: float | None = None
    mutual: bool = False

    def __post_init__(self) -> None:
        if self.k < 1:
            raise IsdError(f"k must be at least 1, got {self.k}")
        if self.threshold is not None and self.quantile is not None:
            raise IsdError("give a threshold or a quantile, not both")
        if self.threshold is not None and not -1.0 <= self.threshold <= 1.0:
            raise IsdError(f"threshold is a cosine similarity in [-1, 1], got {self.threshold}")
        if self.quantile is not None and not 0.0 <= self.quantile <= 1.0:
            raise IsdError(f"quantile must be in [0, 1], got {self.quantile}")


@dataclass
class Pairs:
    """Mined positives in CSR form over bank rows (see the module docstring), fully in memory."""

    offsets: np.ndarray
    rows: np.ndarray
    similarities: np.ndarray
    dataset_indices: np.ndarray
    candidate_rows: np.ndarray
    candidate_similarities: np.ndarray
    params: MiningParams
    threshold: float  # as applied (−inf: none)
    attrs: dict[str, Any]

    @classmethod
    def open(cls, path: str | Path) -> Pairs:
        path = Path(path)
        if not path.is_file():
            raise BankError(f"pairs file {path} not found")
        try:
            with h5py.File(path, "r") as f:
                if attr_value(f.attrs.get("format")) != PAIRS_FORMAT:
                    raise BankError(f"{path} is not a pairs file (expected format {PAIRS_FORMAT})")
                attrs = {key: attr_value(value) for key, value in f.attrs.items()}
                arrays = {
                    name: f[name][...] for name in ("offsets", "rows", "similarities", "dataset_indices")
                }
                cand_rows, cand_sims = f["candidates/rows"][...], f["candidates/similarities"][...]
        except (OSError, KeyError) as exc:
            raise BankError(f"cannot read pairs file {path}: {exc}") from None
        params = MiningParams(**json.loads(attrs["params"]))
        return cls(
            **arrays,
            candidate_rows=cand_rows,
            candidate_similarities=cand_sims,
            params=params,
            threshold=float(attrs["threshold"]),
            attrs=attrs,
        )

    def __len__(self) -> int:
        return len(self.offsets) - 1

    @property
    def counts(self) -> np.ndarray:
        return np.diff(self.offsets)

    @property
    def num_pairs(self) -> int:
        return int(self.offsets[-1])

    @property
    def coverage(self) -> float:
        """Fraction of rows with at least one positive."""
        return float((self.counts > 0).mean()) if len(self) else 0.0

    @property
    def search_recall(self) -> float:
        """recall@k of the candidate lists against exact search (1.0 when they were searched exactly)."""
        return float(self.attrs.get("search_recall", 1.0))

    def positives(self, row: int) -> tuple[np.ndarray, np.ndarray]:
        lo, hi = self.offsets[row], self.offsets[row + 1]
        return self.rows[lo:hi], self.similarities[lo:hi]

    def anchors(self) -> np.ndarray:
        """The bank row of each pair's anchor, aligned with ``rows``."""
        return np.repeat(np.arange(len(self)), self.counts)

    def in_dataset_space(self, num_images: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(offsets [num_images+1], members) over dataset indices: what training needs.

        Images without a bank row (skipped at export) get empty lists.
        """
        ds = self.dataset_indices
        if len(ds) and (ds.min() < 0 or ds.max() >= num_images):
            raise BankError(
                f"pairs were mined over dataset indices up to {int(ds.max())}, "
                f"but the training set has {num_images} images"
            )
        counts = np.zeros(num_images, dtype=np.int64)
        counts[ds] = self.counts
        order = np.argsort(ds[self.anchors()], kind="stable")  # pairs grouped by the anchor's index
        members = ds[self.rows][order]
        offsets = np.concatenate([[0], np.cumsum(counts)])
        import torch  # the callers train with it; reading pairs does not need it

        return torch.from_numpy(offsets), torch.from_numpy(members.astype(np.int64))
