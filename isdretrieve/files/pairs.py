"""Mined positive pairs (``pairs.h5``), written by :func:`isdretrieve.mine.mining.mine_pairs` and read here
with h5py and NumPy only, so that training on them (SePP) needs neither FAISS nor the index layer.

Layout (``format = "isdretrieve.pairs/1"``), N = bank rows, P = pairs:

| dataset                    | shape   | meaning                                              |
|----------------------------|---------|------------------------------------------------------|
| `offsets`                  | [N+1]   | int64, row i's positives are entries offsets[i]:offsets[i+1] |
| `rows`                     | [P]     | int64, the positive's bank row                       |
| `similarities`             | [P]     | float32, cosine similarity                           |
| `dataset_indices`          | [N]     | int64, the dataset index of each bank row            |
| `candidates/rows`          | [N, k]  | int64, the top-k before filtering (for audits)       |
| `candidates/similarities`  | [N, k]  | float32                                              |

Attributes: the parameters (``k``, ``threshold`` as applied, ``quantile``, ``mutual``), the bank's
``fingerprint``, ``data_spec``, ``dataset_size`` and ``items_sha256`` (its file list), ``bank``,
``search_seconds``, ``created``, and how the candidates were searched: ``search`` ("exact", or
"approximate" through the index directory ``index``, with ``index_backend`` (faiss or milvus; absent
before it), ``index_factory`` and ``index_params``),
``search_recall`` (recall@k of the candidate lists against exact search on ``search_recall_queries``
sampled rows, own rows excluded on both sides; 1.0 and 0 queries for exact search).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from isdretrieve.errors import BankError, IsdError
from isdretrieve.files.atomic import atomic_path, fsync_path
from isdretrieve.files.h5 import attr_value

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

    def in_dataset_space(self, num_images: int) -> tuple[np.ndarray, np.ndarray]:
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
        offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        return offsets, members.astype(np.int64)


def write_pairs(
    out: Path,
    cand_rows: np.ndarray,
    cand_sims: np.ndarray,
    keep: np.ndarray,
    dataset_indices: np.ndarray,
    attrs: dict[str, Any],
) -> None:
    """Write ``pairs.h5`` atomically: the candidates [N, k] kept where ``keep``, as CSR lists."""
    counts = keep.sum(axis=1)
    with atomic_path(out) as tmp, h5py.File(tmp, "w") as f:
        f["offsets"] = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        f["rows"] = cand_rows[keep].astype(np.int64)  # row-major: grouped by anchor, best first
        f["similarities"] = cand_sims[keep].astype(np.float32)
        f["dataset_indices"] = dataset_indices.astype(np.int64)
        f["candidates/rows"] = cand_rows
        f["candidates/similarities"] = cand_sims
        for key, value in {"format": PAIRS_FORMAT, **attrs}.items():
            f.attrs[key] = value
    fsync_path(out.parent)


def find_pairs(directory: str | Path, fingerprint: str) -> list[Path]:
    """The pairs files (``*.h5`` of format ``isdretrieve.pairs/1``) in ``directory`` mined from the bank
    with ``fingerprint``, sorted by name; other HDF5 files and pairs of other banks are left out."""
    found = []
    for path in sorted(Path(directory).glob("*.h5")):
        try:
            with h5py.File(path, "r") as f:
                fmt, mined_from = attr_value(f.attrs.get("format")), attr_value(f.attrs.get("fingerprint"))
        except OSError:
            continue
        if fmt == PAIRS_FORMAT and mined_from == fingerprint and path.is_file():
            found.append(path)
    return found
