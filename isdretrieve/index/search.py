"""An index directory opened for search (:class:`SearchIndex`): the FAISS index, its manifest and bank."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import TYPE_CHECKING

import faiss
import numpy as np

from isdretrieve.errors import BankError, IsdError
from isdretrieve.files.bank import FeatureBank
from isdretrieve.files.manifest import (
    BANK_FILE,
    INDEX_FILE,
    IVFDATA_FILE,
    KIND_ONDISK,
    IndexManifest,
    check_bank_fingerprint,
    check_files,
    read_manifest,
    recorded_sizes,
)
from isdretrieve.index.exact import (
    GPU_MAX_K,
    as_float32,
    bank_exact_search,
    cuda_available,
    exact_search_torch,
)
from isdretrieve.index.faiss_ops import is_exact, read_index, set_params, to_gpu
from isdretrieve.index.ondisk import ListsFile, read_ondisk
from isdretrieve.index.recall import heldout_queries, heldout_recall, heldout_search

if TYPE_CHECKING:
    import torch  # imported only on the CUDA paths


def clamp_k(k: int, most: int) -> int:
    """``k``, or ``most`` with a warning when k is larger (a bank smaller than the k asked for)."""
    if k > most:
        warnings.warn(f"k={k} lowered to {most}: the bank has too few rows", stacklevel=3)
        return most
    return k


class SearchIndex:
    """A built index directory, opened for search: ``manifest``, ``bank`` and ``search``."""

    def __init__(
        self,
        directory: Path,
        manifest: IndexManifest,
        index: faiss.Index,
        bank: FeatureBank,
        lists_file: ListsFile | None = None,
    ):
        self.directory = directory
        self._lists_file = lists_file  # on-disk lists: checked before every search
        self.manifest = manifest
        self.bank = bank
        self._index = index
        self._gpu_index = to_gpu(index)
        if self._gpu_index is not None:
            set_params(self._gpu_index, manifest.params, gpu=True)
        self._torch_exact = self._gpu_index is None and is_exact(index) and cuda_available()
        self._cuda_features: torch.Tensor | None = None

    @classmethod
    def open(cls, index_dir: str | Path) -> SearchIndex:
        """Open ``index_dir``; a bank whose fingerprint differs from the manifest's is a BankError, a file
        whose size is not the one the manifest recorded a DamagedFile (checked before anything is
        read or memory-mapped)."""
        directory = Path(index_dir)
        manifest = read_manifest(directory)
        check_files(directory, manifest)
        bank = FeatureBank.open(directory / BANK_FILE)
        lists_file = None
        try:
            check_bank_fingerprint(directory, manifest, bank.fingerprint)
            check_files(directory, manifest, (BANK_FILE,))
            if manifest.kind == KIND_ONDISK:
                lists_file = ListsFile(directory / IVFDATA_FILE, recorded_sizes(manifest)[IVFDATA_FILE])
                index = read_ondisk(directory / INDEX_FILE)
            else:
                index = read_index(directory / INDEX_FILE)
            if not len(bank) == index.ntotal == manifest.count or bank.dim != index.d:
                raise BankError(
                    f"bank {directory / BANK_FILE} has {len(bank):,} x {bank.dim} rows but the index holds "
                    f"{index.ntotal:,} x {index.d}: rebuild the index"
                )
            set_params(index, manifest.params, gpu=False)
        except BaseException:
            bank.close()
            if lists_file is not None:
                lists_file.close()
            raise
        return cls(directory, manifest, index, bank, lists_file)

    def __len__(self) -> int:
        return self.manifest.count

    def search(self, queries: np.ndarray | torch.Tensor, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Top-k bank rows for each query: (scores [Q,k] float32, rows [Q,k] int64).

        Queries ([Q,D] or [D]) are L2-normalised first, so on a normalised bank scores are cosines.
        An approximate index may return fewer than k hits; missing ones have row -1. A k above the
        bank's size is lowered to it, with a warning.
        """
        if k < 1:
            raise IsdError(f"k must be at least 1, got {k}")
        k = clamp_k(k, len(self))
        x = as_float32(queries)
        x = x[None] if x.ndim == 1 else x
        if x.ndim != 2 or x.shape[1] != self.manifest.dim:
            raise IsdError(f"queries must have shape [Q, {self.manifest.dim}], got {list(x.shape)}")
        x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
        if self._lists_file is not None:
            self._lists_file.check()
        if self._torch_exact:
            import torch

            return exact_search_torch(self._features_on_cuda(), torch.from_numpy(x), k)
        index = self._gpu_index if self._gpu_index is not None and k <= GPU_MAX_K else self._index
        scores, rows = index.search(x, k)
        return scores.astype(np.float32, copy=False), rows.astype(np.int64, copy=False)

    def _features_on_cuda(self) -> torch.Tensor:
        """The bank's features on the GPU (loaded on first use), for Flat search without GPU FAISS."""
        if self._cuda_features is None:
            import torch

            features = torch.empty(len(self), self.manifest.dim, device="cuda")
            for start, x in self.bank.blocks():
                features[start : start + len(x)] = torch.from_numpy(x)
            self._cuda_features = features
        return self._cuda_features

    def recall(self, k: int = 10, queries: int = 1000, seed: int = 0) -> float:
        """Re-measure held-out recall@k (the build's protocol) on ``queries`` bank rows sampled with ``seed``.

        A k of at least the bank's size is lowered to its size - 1 (the other rows), with a warning.
        """
        if k < 1:
            raise IsdError(f"k must be at least 1, got {k}")
        if len(self) < 2:
            raise IsdError("recall needs at least 2 bank rows (each query's own row is left out)")
        k = clamp_k(k, len(self) - 1)
        rows, xq = heldout_queries(self.bank, queries, seed)
        truth = heldout_search(lambda q, kk: bank_exact_search(self.bank, q, kk), xq, rows, k)[1]
        return heldout_recall(self.search, xq, rows, truth)

    def close(self) -> None:
        self._cuda_features = None
        self.bank.close()
        if self._lists_file is not None:
            self._lists_file.close()

    def __enter__(self) -> SearchIndex:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
