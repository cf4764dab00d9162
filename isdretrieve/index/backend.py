"""The one index interface: what every search backend offers, and the label filter they all accept.

An index directory opened for search is a :class:`VectorIndex`, whatever holds its vectors: the FAISS
index in RAM or with its lists on disk (:class:`~isdretrieve.index.search.SearchIndex`), or a Milvus
collection (:class:`~isdretrieve.index.milvus.search.MilvusIndex`).
:func:`~isdretrieve.index.open.open_index` opens either from its ``manifest.json``. Every consumer
(``Retriever``, ``isd-knn``, ``isd-index neighbours``, ``mine --approximate``, the service) uses only
this interface::

    scores, rows = index.search(vectors, k, filter=LabelFilter.of([3, 5]))
    len(index), index.recall(k=10), index.close()

plus the directory's ``manifest`` and its ``bank`` (where thumbnails and metadata come from).
"""

from __future__ import annotations

import math
import warnings
from abc import ABC, abstractmethod
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from isdretrieve.errors import IsdError, QueryError
from isdretrieve.files.bank import FeatureBank
from isdretrieve.files.manifest import IndexManifest
from isdretrieve.index.exact import as_float32
from isdretrieve.index.recall import heldout_recall, heldout_truth

if TYPE_CHECKING:
    import torch

MISSING_SCORE = np.finfo(np.float32).min  # the score of a missing hit (row -1), as FAISS reports it


def clamp_k(k: int, most: int) -> int:
    """``k``, or ``most`` with a warning when k is larger (a bank smaller than the k asked for)."""
    if k > most:
        warnings.warn(f"k={k} lowered to {most}: the bank has too few rows", stacklevel=3)
        return most
    return k


def widen_for_filter(knob: str, value: int, passing: float, most: int) -> int:
    """The search knob ``knob`` (nprobe, ef, efSearch) at ``value``, widened for a filter that a fraction
    ``passing`` of the rows pass, at most ``most``: nprobe / passing (as many allowed candidates as
    unfiltered); ef / passing² (a graph walk through rows it may not return loses more: on the digits
    pixels with 20 % passing, FAISS HNSW's filtered recall@10 was 0.62 at efSearch 64, 0.98 at 256)."""
    power = 1 if knob == "nprobe" else 2
    return int(min(most, math.ceil(value / max(passing, 1e-9) ** power)))


@dataclass(frozen=True)
class LabelFilter:
    """Hits restricted to bank rows whose label is one of ``labels`` (one label: equality)."""

    labels: tuple[int, ...]

    @classmethod
    def of(cls, labels: int | Iterable[int] | None) -> LabelFilter | None:
        """A filter for one label or a set of them; None (no filter) for None. An empty set is refused."""
        if labels is None:
            return None
        found = (labels,) if isinstance(labels, int | np.integer) else tuple(labels)
        try:
            values = tuple(sorted({int(v) for v in found}))
        except (TypeError, ValueError):
            raise QueryError(f"a label filter takes whole numbers, got {list(found)}") from None
        if not values:
            raise QueryError("a label filter needs at least one label")
        return cls(values)

    def passing(self, labels: np.ndarray) -> float:
        """The fraction of rows that pass, given every row's label."""
        return float(np.isin(labels, self.labels).mean()) if len(labels) else 0.0

    def rows(self, labels: np.ndarray) -> np.ndarray:
        """The bank rows (sorted, int64) whose label passes, given every row's label."""
        return np.flatnonzero(np.isin(labels, self.labels)).astype(np.int64)

    def expression(self, field: str = "label") -> str:
        """The filter as a Milvus boolean expression: ``label == 3`` or ``label in [3, 5]``."""
        if len(self.labels) == 1:
            return f"{field} == {self.labels[0]}"
        return f"{field} in [{', '.join(str(v) for v in self.labels)}]"


class VectorIndex(ABC):
    """An index directory opened for search: ``manifest``, ``bank``, ``search``, ``recall``, ``close``.

    Subclasses set ``directory``, ``manifest`` and ``bank`` and implement :meth:`search_unit` (and
    :meth:`close`, which must close the bank too).
    """

    directory: Path
    manifest: IndexManifest
    bank: FeatureBank

    def __len__(self) -> int:
        return self.manifest.count

    @property
    def backend(self) -> str:
        """Where the vectors are searched: ``faiss`` or ``milvus``."""
        return self.manifest.backend

    def search(
        self, vectors: np.ndarray | torch.Tensor, k: int, filter: LabelFilter | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Top-k bank rows for each query: (scores [Q,k] float32, rows [Q,k] int64).

        Queries ([Q,D] or [D]) are L2-normalised first, so on a normalised bank scores are cosines.
        ``filter`` keeps only rows of the given labels. An approximate index, or a filter that few rows
        pass, may return fewer than k hits; missing ones have row -1. A k above the bank's size is
        lowered to it, with a warning.
        """
        if k < 1:
            raise IsdError(f"k must be at least 1, got {k}")
        k = clamp_k(k, len(self))
        x = as_float32(vectors)
        x = x[None] if x.ndim == 1 else x
        if x.ndim != 2 or x.shape[1] != self.manifest.dim:
            raise IsdError(f"queries must have shape [Q, {self.manifest.dim}], got {list(x.shape)}")
        x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
        return self.search_unit(np.ascontiguousarray(x, dtype=np.float32), k, filter)

    @abstractmethod
    def search_unit(self, x: np.ndarray, k: int, filter: LabelFilter | None) -> tuple[np.ndarray, np.ndarray]:
        """:meth:`search` on checked, unit-length float32 queries [Q, D] with 1 <= k <= len(self)."""

    def recall(self, k: int = 10, queries: int = 1000, seed: int = 0) -> float:
        """Re-measure held-out recall@k (the build's protocol) on ``queries`` bank rows sampled with ``seed``.

        A k of at least the bank's size is lowered to its size - 1 (the other rows), with a warning.
        """
        if k < 1:
            raise IsdError(f"k must be at least 1, got {k}")
        if len(self) < 2:
            raise IsdError("recall needs at least 2 bank rows (each query's own row is left out)")
        k = clamp_k(k, len(self) - 1)
        rows, xq, truth = heldout_truth(self.bank, queries, seed, k)
        return heldout_recall(self.search, xq, rows, truth)

    @abstractmethod
    def close(self) -> None:
        """Release the index and close the bank."""

    def __enter__(self) -> VectorIndex:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def pad_hits(found: list[list[tuple[int, float]]], k: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-query (row, score) lists as (scores [Q,k], rows [Q,k]), missing hits as row -1."""
    scores = np.full((len(found), k), MISSING_SCORE, dtype=np.float32)
    rows = np.full((len(found), k), -1, dtype=np.int64)
    for q, hits in enumerate(found):
        for j, (row, score) in enumerate(hits[:k]):
            rows[q, j], scores[q, j] = row, score
    return scores, rows
