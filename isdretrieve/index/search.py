"""An index directory of the FAISS backend opened for search (:class:`SearchIndex`): the FAISS index
(in RAM, or with its lists on disk), its manifest and bank, behind the one index interface
(:class:`~isdretrieve.index.backend.VectorIndex`)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import faiss
import numpy as np

from isdretrieve.errors import BankError, IsdError
from isdretrieve.files.bank import FeatureBank
from isdretrieve.files.manifest import (
    BACKEND_FAISS,
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
from isdretrieve.index.backend import LabelFilter, VectorIndex
from isdretrieve.index.exact import GPU_MAX_K, cuda_available, exact_search_torch
from isdretrieve.index.faiss_ops import is_exact, read_index, search_selected, set_params, to_gpu
from isdretrieve.index.ondisk import ListsFile, read_ondisk

if TYPE_CHECKING:
    import torch  # imported only on the CUDA paths


class SearchIndex(VectorIndex):
    """A FAISS index directory, opened for search: ``manifest``, ``bank``, ``search`` and ``recall``."""

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
        self._labels: np.ndarray | None = None

    @classmethod
    def open(cls, index_dir: str | Path) -> SearchIndex:
        """Open ``index_dir``; a bank whose fingerprint differs from the manifest's is a BankError, a file
        whose size is not the one the manifest recorded a DamagedFile (checked before anything is
        read or memory-mapped)."""
        directory = Path(index_dir)
        manifest = read_manifest(directory)
        if manifest.backend != BACKEND_FAISS:
            raise IsdError(f"{directory} is a {manifest.backend} index: open it with open_index")
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

    def search_unit(self, x: np.ndarray, k: int, filter: LabelFilter | None) -> tuple[np.ndarray, np.ndarray]:
        """FAISS search of unit queries; a filter goes through an ID selector on the CPU index. On-disk
        lists are checked against their recorded size first (a truncated file is never read)."""
        if self._lists_file is not None:
            self._lists_file.check()
        if filter is not None:
            allowed = filter.rows(self.labels)
            return search_selected(self._index, x, k, allowed, self.manifest.params, self.bank)
        if self._torch_exact:
            import torch

            return exact_search_torch(self._features_on_cuda(), torch.from_numpy(x), k)
        index = self._gpu_index if self._gpu_index is not None and k <= GPU_MAX_K else self._index
        scores, rows = index.search(x, k)
        return scores.astype(np.float32, copy=False), rows.astype(np.int64, copy=False)

    @property
    def labels(self) -> np.ndarray:
        """Every bank row's label (read once, for label filters)."""
        if self._labels is None:
            self._labels = self.bank.labels()
        return self._labels

    def _features_on_cuda(self) -> torch.Tensor:
        """The bank's features on the GPU (loaded on first use), for Flat search without GPU FAISS."""
        if self._cuda_features is None:
            import torch

            features = torch.empty(len(self), self.manifest.dim, device="cuda")
            for start, x in self.bank.blocks():
                features[start : start + len(x)] = torch.from_numpy(x)
            self._cuda_features = features
        return self._cuda_features

    def close(self) -> None:
        self._cuda_features = None
        self.bank.close()
        if self._lists_file is not None:
            self._lists_file.close()
