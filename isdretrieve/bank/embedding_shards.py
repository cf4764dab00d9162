"""Embeddings as a folder of shards: the layout embedding-reader, autofaiss and clip-retrieval read and write.

    OUT/img_emb/img_emb_0000.npy         [n, D] float32 rows (embeddings only: nothing else is *.npy)
    OUT/metadata/metadata_0000.parquet   one line per row: image_path, row, index, label
    OUT/meta.json                        ours: format, fingerprint, data spec, class names, count, dim

Shard ``i`` of ``img_emb/`` and of ``metadata/`` hold the same rows; names are zero-padded so that the
sorted order embedding-reader pairs them in is the row order. embedding-reader reads the folder as
``EmbeddingReader("OUT/img_emb", file_format="parquet_npy", metadata_folder="OUT/metadata", ...)``.

Reading (``--embeddings FOLDER``) takes this layout, clip-retrieval's output (the same two folders; its
metadata names the image in ``image_path``, or ``url``), a bare folder of ``*.npy`` shards, or the
``img_emb`` folder itself. Shards pair by the number in their names (``img_emb_7`` with ``metadata_7``).
Paths come from ``image_path`` (else ``path``, else ``url``), labels from ``label``, dataset indices
from ``index``, each when present. Shards are memory-mapped and read in blocks.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import numpy as np

from isdretrieve.errors import EmbeddingsError
from isdretrieve.util.extras import pyarrow_module

EMB_DIR, META_DIR, META_FILE = "img_emb", "metadata", "meta.json"
SHARDS_FORMAT = "isdretrieve.embeddings/2"
PATH_COLUMNS = ("image_path", "path", "url")
_NUMBER = re.compile(r"(\d+)(?=\.[^.]+$)")


def shard_name(prefix: str, number: int, shards: int, suffix: str) -> str:
    """``img_emb_0007.npy``: zero-padded to at least 4 digits (and to the digits of ``shards - 1``)."""
    return f"{prefix}_{number:0{max(4, len(str(max(shards - 1, 0))))}d}{suffix}"


def _number(path: Path) -> int | None:
    found = _NUMBER.search(path.name)
    return int(found.group(1)) if found else None


def _sorted(paths: list[Path]) -> list[Path]:
    """By the number in the names when each has its own (``img_emb_10`` after ``img_emb_9``), else by name."""
    numbers = [_number(p) for p in paths]
    if None in numbers or len(set(numbers)) != len(numbers):
        return sorted(paths)
    return [p for _, p in sorted(zip(numbers, paths, strict=True))]


def is_shard_folder(folder: Path) -> bool:
    """Whether ``folder`` holds ``img_emb/`` or ``*.npy`` shards (an old ``features.npy`` folder does not)."""
    if not folder.is_dir() or (folder / "features.npy").is_file():
        return False
    return (folder / EMB_DIR).is_dir() or any(folder.glob("*.npy"))


class ShardRows:
    """The rows of several ``[n_i, D]`` npy shards as one array-like (``shape``, ``dtype``, ``rows[a:b]``)."""

    def __init__(self, shards: list[Path]) -> None:
        self.arrays = [_load(path) for path in shards]
        first = self.arrays[0]
        for path, array in zip(shards, self.arrays, strict=True):
            if array.ndim != 2 or first.ndim != 2 or array.shape[1] != first.shape[1]:
                raise EmbeddingsError(
                    f"{path}: shards must be 2-D arrays [N, D] of one D, got shape {list(array.shape)} "
                    f"(the first shard: {list(first.shape)})"
                )
        self.starts = np.cumsum([0] + [len(a) for a in self.arrays])
        self.shape = (int(self.starts[-1]), int(first.shape[1]))
        self.dtype = np.result_type(*(a.dtype for a in self.arrays))

    def __getitem__(self, rows: slice) -> np.ndarray:
        start, stop, _ = rows.indices(self.shape[0])
        parts = []
        for i, array in enumerate(self.arrays):
            lo, hi = max(start, self.starts[i]), min(stop, self.starts[i + 1])
            if lo < hi:
                parts.append(np.asarray(array[lo - self.starts[i] : hi - self.starts[i]]))
        return np.concatenate(parts) if parts else np.zeros((0, self.shape[1]), np.float32)


def _load(path: Path) -> np.ndarray:
    try:
        return np.load(path, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError) as exc:
        raise EmbeddingsError(f"cannot read {path}: {exc}") from None


def _root(source: Path) -> tuple[Path, Path]:
    """(folder of the npy shards, folder around them): ``source/img_emb`` and ``source``, or, for
    ``source`` itself holding the shards, ``source`` and (for an ``img_emb`` folder) its parent."""
    if (source / EMB_DIR).is_dir():
        return source / EMB_DIR, source
    return source, source.parent if source.name == EMB_DIR else source


def _folders(source: Path) -> tuple[list[Path], list[Path]]:
    """(npy shards, parquet metadata shards) of a shard folder, each sorted."""
    emb, root = _root(source)
    shards = _sorted(list(emb.glob("*.npy")))
    if not shards:
        raise EmbeddingsError(f"{source}: no .npy embeddings in {emb}")
    meta = root / META_DIR
    metadata = _sorted(list(meta.glob("*.parquet"))) if meta.is_dir() else []
    if metadata and len(metadata) != len(shards):
        raise EmbeddingsError(
            f"{source}: {len(shards)} embedding shards but {len(metadata)} metadata files in {meta}"
        )
    return shards, metadata


def read_shard_folder(source: Path) -> tuple[ShardRows, dict[str, Any]]:
    """(rows, metadata) of a shard folder: paths, labels and indices from the parquet metadata, our
    fingerprint, data spec and classes from ``meta.json`` when the folder has one."""
    shards, metadata = _folders(source)
    rows = ShardRows(shards)
    meta: dict[str, Any] = {}
    if metadata:
        meta = _read_metadata(shards, metadata, rows)
    info_path = _root(source)[1] / META_FILE
    if info_path.is_file():
        try:
            info = json.loads(info_path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise EmbeddingsError(f"{info_path} is not valid JSON: {exc}") from None
        if isinstance(info, dict):
            meta.update({k: info[k] for k in ("fingerprint", "data_spec", "classes") if k in info})
    return rows, meta


def _read_metadata(shards: list[Path], metadata: list[Path], rows: ShardRows) -> dict[str, Any]:
    """Paths, labels and dataset indices from the metadata shards (each checked against its npy shard)."""
    pa = pyarrow_module()
    columns: dict[str, list[Any]] = {}
    for npy, table_path, array in zip(shards, metadata, rows.arrays, strict=True):
        number_npy, number_meta = _number(npy), _number(table_path)
        if number_npy is not None and number_meta is not None and number_npy != number_meta:
            raise EmbeddingsError(f"{table_path} does not pair with {npy}: their shard numbers differ")
        try:
            table = pa.parquet.read_table(table_path)
        except (pa.ArrowException, OSError) as exc:
            raise EmbeddingsError(f"cannot read parquet file {table_path}: {exc}") from None
        if table.num_rows != len(array):
            raise EmbeddingsError(f"{table_path} has {table.num_rows} rows, {npy} has {len(array)}")
        path_column = next((c for c in PATH_COLUMNS if c in table.column_names), None)
        wanted = {"paths": path_column, "labels": "label", "indices": "index"}
        for field, column in wanted.items():
            if column is not None and column in table.column_names:
                columns.setdefault(field, []).extend(table.column(column).to_pylist())
    meta: dict[str, Any] = {}
    for field, values in columns.items():
        if len(values) != rows.shape[0]:
            raise EmbeddingsError(f"{metadata[0].parent}: column for {field} is missing from some shards")
        if field == "paths":
            meta[field] = ["" if v is None else str(v) for v in values]
        else:
            meta[field] = np.array([-1 if v is None else int(v) for v in values], dtype=np.int64)
    return meta
