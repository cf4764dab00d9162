"""Open any index directory for search, whichever backend its manifest names."""

from __future__ import annotations

from pathlib import Path

from isdretrieve.files.manifest import BACKEND_MILVUS, read_manifest
from isdretrieve.index.backend import VectorIndex
from isdretrieve.index.milvus.search import MilvusIndex
from isdretrieve.index.search import SearchIndex


def open_index(index_dir: str | Path) -> VectorIndex:
    """The index directory ``index_dir`` opened for search: a FAISS :class:`SearchIndex`, or a
    :class:`MilvusIndex` over the collection its manifest names (pymilvus is imported only then)."""
    if read_manifest(index_dir).backend == BACKEND_MILVUS:
        return MilvusIndex.open(index_dir)
    return SearchIndex.open(index_dir)
