"""``Retriever``: search an index directory with images or feature vectors, from Python or a notebook.

    r = Retriever.open("indices/cifar10-train")
    hits = r.search(["query.jpg"], k=5)        # or PIL images, a uint8/float image batch, or features
    hits[0][0].path, hits[0][0].score, hits[0][0].label
    found = r.neighbours([17, "query.jpg", "more/"], k=8)   # bank rows (self left out), files, folders
    found = r.neighbours(r.sample_rows(16, seed=0), k=8)    # a random sample of bank rows
    r.search_vectors([[0.1] * r.dim], k=5)                 # feature vectors, checked against the bank's D
    r.search(["query.jpg"], k=5, labels=[3, 5])             # only hits of these classes
    r.row(17), r.row_image(17)                              # a bank row's label and path; its picture
    r.embed(["query.jpg"])                                  # unit float32 rows [Q, D] of images

Images are embedded with the index's own encoder (``encoder.pt``, or ``encoder.safetensors`` with its
``encoder.json``, in the index directory, checked against the bank's fingerprint) through
:class:`~isdretrieve.encoder.FrozenEncoder`, as the bank was. Searching with vectors needs only FAISS and
NumPy: torch is imported when the first image is embedded. The index is whatever backend built the
directory (FAISS, or a Milvus collection): the Retriever uses only the one index interface
(:class:`~isdretrieve.index.backend.VectorIndex`), and the directory's bank for labels, paths and pictures.
"""

from __future__ import annotations

import sys
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

from isdretrieve.errors import BankError, QueryError
from isdretrieve.index.backend import LabelFilter, VectorIndex
from isdretrieve.index.exact import as_float32, cuda_available
from isdretrieve.index.open import open_index
from isdretrieve.retrieve.hits import BankRow, Hit, class_name, label_differs
from isdretrieve.retrieve.pictures import ImageSource
from isdretrieve.retrieve.queries import NeighbourQuery, NeighbourResult, QueryItem, expand_queries

if TYPE_CHECKING:  # torch and the encoder are imported when images are embedded, not to search vectors
    import torch

    from isdretrieve.encoder import FrozenEncoder, Queries

ENCODER_FILES = ("encoder.pt", "encoder.safetensors")  # the first one present is used
Labels = int | Sequence[int] | None  # a class filter: one label, several, or none


class Retriever:
    """Search one index directory by images, bank rows or feature vectors (see the module docstring)."""

    def __init__(self, index: VectorIndex, index_dir: Path, device: str = "auto") -> None:
        self.index, self.index_dir = index, index_dir
        self.device = ("cuda" if cuda_available() else "cpu") if str(device) == "auto" else str(device)
        bank = index.bank
        self._labels, self._indices, self._paths = bank.labels(), bank.indices(), bank.paths()
        self._encoder: FrozenEncoder | None = None
        self._lock = threading.Lock()  # the encoder and the data set are opened once, by one thread
        self._images = ImageSource(bank.data_spec)

    @classmethod
    def open(cls, index_dir: str | Path, *, device: str = "auto") -> Retriever:
        """Open ``indices/NAME`` (manifest.json, bank.h5, index.faiss or a Milvus collection, encoder.pt)."""
        return cls(open_index(index_dir), Path(index_dir), device)

    def close(self) -> None:
        """Close the index and its bank."""
        self.index.close()

    def __enter__(self) -> Retriever:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def dim(self) -> int:
        return self.index.bank.dim

    @property
    def classes(self) -> list[str]:
        """Class names of the bank's labels (empty when the data set had none)."""
        return self.index.bank.classes

    def class_name(self, label: int) -> str:
        """The name of ``label`` ("unlabelled" for −1; the number itself where the bank names none)."""
        return class_name(label, self.classes)

    @property
    def encoder_path(self) -> Path | None:
        """The index directory's ``encoder.pt`` (else its ``encoder.safetensors``), None without either."""
        return next((p for p in (self.index_dir / name for name in ENCODER_FILES) if p.is_file()), None)

    @property
    def has_encoder(self) -> bool:
        """Whether the index directory holds an encoder to embed images with."""
        return self.encoder_path is not None

    @property
    def encoder(self) -> FrozenEncoder:
        """The index's encoder (:attr:`encoder_path`), loaded on first use and checked against the bank."""
        with self._lock:
            if self._encoder is None:
                from isdretrieve.encoder import FrozenEncoder

                path = self.encoder_path
                if path is None:
                    raise BankError(
                        f"{self.index_dir} has no encoder.pt: search it with feature vectors instead"
                    )
                encoder = FrozenEncoder.load(path, device=self.device)
                found, expected = encoder.fingerprint, self.index.bank.fingerprint
                if found != expected:
                    raise BankError(f"{path} does not match the bank (fingerprint {found} != {expected})")
                self._encoder = encoder
            return self._encoder

    def prepare(self, images: Queries) -> torch.Tensor:
        """Images (paths, PIL images or a batch) as the uint8 batch that :meth:`encode` embeds; decoding
        them apart from encoding lets several callers' images share one forward."""
        return self.encoder.prepare(images)

    def encode(self, images: Queries) -> torch.Tensor:
        """L2-normalised float32 features [Q, D] (on CPU) of images: paths, PIL images or an image batch."""
        encoder = self.encoder
        return encoder.embed(encoder.prepare(images))

    def embed(self, images: Queries) -> np.ndarray:
        """The embeddings of images (paths, PIL images or an image batch): unit float32 rows [Q, D], as the
        bank's rows were made (the index's own encoder)."""
        return np.ascontiguousarray(self.encode(images).numpy(), dtype=np.float32)

    def search(self, queries: Queries, k: int = 10, labels: Labels = None) -> list[list[Hit]]:
        """The k nearest bank rows of each query (images, or feature vectors [Q, D] / [D]); with
        ``labels`` (one label or several) only rows of those classes."""
        features = self._as_features(queries)
        scores, rows = self.index.search(features, k, LabelFilter.of(labels))
        return [
            [self._hit(int(r), float(s)) for s, r in zip(score_row, row_row, strict=True) if r >= 0]
            for score_row, row_row in zip(scores, rows, strict=True)
        ]

    def _hit(self, row: int, score: float, query_label: int = -1) -> Hit:
        label = int(self._labels[row])
        return Hit(
            row, int(self._indices[row]), label, self._paths[row], score, label_differs(query_label, label)
        )

    def search_vectors(
        self, vectors: Sequence[Sequence[float]] | np.ndarray, k: int = 10, labels: Labels = None
    ) -> list[list[Hit]]:
        """:meth:`search` for feature vectors only ([Q, D] or [D]): a QueryError, not an image error, when
        their length is not the bank's dimension or a value is not finite."""
        try:
            x = np.asarray(vectors, dtype=np.float32)
        except (TypeError, ValueError):
            raise QueryError("feature vectors must be lists of numbers of one length") from None
        x = x[None] if x.ndim == 1 else x
        if x.ndim != 2 or x.shape[1] != self.dim or not len(x):
            shape = "x".join(str(n) for n in x.shape)
            raise QueryError(f"feature vectors must have {self.dim} numbers each (the bank's D), got {shape}")
        if not np.isfinite(x).all():
            raise QueryError("feature vectors must hold finite numbers only")
        return self.search(x, k, labels)

    def row(self, row: int) -> BankRow:
        """Bank row ``row``'s dataset index, label and path; a QueryError for a row the bank lacks."""
        if not 0 <= row < len(self.index):
            raise QueryError(f"unknown bank row {row}: the bank has rows 0..{len(self.index) - 1}")
        return BankRow(row, int(self._indices[row]), int(self._labels[row]), self._paths[row])

    def row_image(self, row: int) -> Image.Image | None:
        """The picture of bank row ``row``, read from the bank's data SPEC (in-memory data sets too), or
        None where that data set is gone or names the row differently; never read from another path."""
        found = self.row(row)
        with self._lock:
            self._images.names(found.index, found.path)  # opens the data set once, under the lock
        return self._images.dataset_row(found.index, found.path)

    def sample_rows(self, n: int, seed: int = 0, label: int | None = None) -> list[int]:
        """``n`` distinct bank rows (all of them when ``n`` >= their number) drawn with ``seed``, sorted;
        only rows of class ``label`` when it is given (an empty list when the bank has none)."""
        if n < 1:
            raise QueryError(f"the sample size must be at least 1, got {n}")
        pool = np.arange(len(self.index)) if label is None else np.flatnonzero(self._labels == label)
        rng = np.random.default_rng(seed)
        return sorted(int(r) for r in rng.choice(pool, size=min(n, len(pool)), replace=False))

    def neighbours(
        self, queries: QueryItem | Sequence[QueryItem], k: int = 10, labels: Labels = None
    ) -> list[NeighbourResult]:
        """The k nearest bank rows of each query, in the order given: bank rows (``int``, each left out of
        its own neighbours), image paths, folders (their images, sorted) or PIL images; with ``labels``
        only rows of those classes."""
        items = expand_queries(queries)
        n = len(self.index)
        has_rows = any(isinstance(item, int) for item in items)
        most = n - 1 if has_rows else n
        if not 1 <= k <= most:
            raise QueryError(f"k must be between 1 and {most} for this bank of {n:,} rows, got {k}")
        described = [self._describe(number, item) for number, item in enumerate(items)]
        features = np.zeros((len(items), self.dim), dtype=np.float32)
        images = [i for i, query in enumerate(described) if query.row is None]
        for start in range(0, len(images), 256):  # bounded memory for large query folders
            chunk = images[start : start + 256]
            features[chunk] = self.encode([items[i] for i in chunk]).numpy()
        for i, query in enumerate(described):
            if query.row is not None:
                features[i] = self.index.bank.features(query.row, query.row + 1)[0]
        scores, rows = self.index.search(features, min(k + 1, n) if has_rows else k, LabelFilter.of(labels))
        return [
            NeighbourResult(query, self._hits(query, score_row, row_row, k))
            for query, score_row, row_row in zip(described, scores, rows, strict=True)
        ]

    def _describe(self, number: int, item: QueryItem) -> NeighbourQuery:
        """The query ``item`` (the ``number``-th) with its row, dataset index, label and path."""
        if isinstance(item, int):
            found = self.row(item)
            return NeighbourQuery(f"row {item}", item, found.index, found.label, found.path)
        if isinstance(item, Image.Image):
            return NeighbourQuery(f"image {number}", None, None, -1, "", item)
        return NeighbourQuery(str(item), None, None, -1, str(item))

    def _hits(self, query: NeighbourQuery, scores: np.ndarray, rows: np.ndarray, k: int) -> tuple[Hit, ...]:
        """The first k found rows other than the query's own row (missing ones, row -1, dropped)."""
        kept = [(float(s), int(r)) for s, r in zip(scores, rows, strict=True) if r >= 0 and r != query.row]
        return tuple(self._hit(row, score, query.label) for score, row in kept[:k])

    def _as_features(self, queries: Queries) -> np.ndarray:
        """Feature vectors ([Q, D] or [D], arrays or tensors) as unit rows; anything else is embedded."""
        torch = sys.modules.get("torch")
        is_tensor = torch is not None and isinstance(queries, torch.Tensor)
        if (
            (isinstance(queries, np.ndarray) or is_tensor)
            and queries.ndim in (1, 2)
            and queries.shape[-1] == self.dim
        ):
            x = as_float32(queries).reshape(-1, self.dim)
            return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
        return self.encode(queries).numpy()
