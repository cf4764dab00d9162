"""Embeddings made elsewhere, imported as a bank: npy folders or files, parquet files and HDF5 files.

Formats (see ``indices/README.md``):

- **npy**: a folder of shards (``img_emb/*.npy`` with ``metadata/*.parquet``, as our npy export,
  embedding-reader and clip-retrieval write it: :mod:`isdretrieve.bank.embedding_shards`); a folder
  holding ``features.npy`` [N, D] (and optionally ``indices.npy``, ``labels.npy``, ``paths.txt``,
  ``meta.json`` with the fingerprint, data spec and class names: the layout of release 0.1.0); or one
  ``.npy`` file.
- **parquet**: one file with an ``embedding`` list column (``--key`` names another) and optional ``row``,
  ``index``, ``label`` and ``path`` columns; our metadata in the schema's ``isdretrieve`` key. Needs the
  optional ``parquet`` extra (pyarrow).
- **HDF5**: any file with a 2-D float dataset: ``--key`` names it, else ``features``, else the only 2-D
  float dataset in the file (more than one without ``--key`` is an error).

The whole input (features' shape and dtype, labels, indices, paths and metadata) is checked by
:func:`~isdretrieve.bank.embeddings_checks.check_import` before the bank is written; rows are then checked
and normalised as :mod:`isdretrieve.bank.arrays` does, streamed in blocks, never held whole in memory.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import h5py
import numpy as np

from isdretrieve.bank.arrays import array_blocks, content_fingerprint, write_bank_blocks
from isdretrieve.bank.embedding_shards import is_shard_folder, read_shard_folder
from isdretrieve.bank.embeddings_checks import (
    check_import,
    column_labels,
    parquet_rows,
    parse_meta,
    read_text,
)
from isdretrieve.errors import EmbeddingsError
from isdretrieve.files.bank import BANK_FORMAT, FeatureBank
from isdretrieve.files.h5 import attr_value
from isdretrieve.util.extras import pyarrow_module


def read_labels(path: str | Path) -> np.ndarray:
    """One int label a row from a .npy file or a text file with one integer a line."""
    path = Path(path)
    try:
        if path.suffix.lower() == ".npy":
            labels = np.load(path, allow_pickle=False)
        else:
            labels = np.array([int(line) for line in path.read_text().split()], dtype=np.int64)
    except (ValueError, OSError, OverflowError) as exc:
        raise EmbeddingsError(f"cannot read labels from {path}: {exc}") from None
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
        raise EmbeddingsError(
            f"{path}: labels must be one integer a row, got {labels.dtype} {list(labels.shape)}"
        )
    return labels.astype(np.int64)


def embeddings_format(path: Path) -> str:
    """'npy', 'parquet' or 'h5' from the path: a folder or .npy is npy, .parquet/.pq parquet, else HDF5."""
    suffix = path.suffix.lower()
    if path.is_dir() or suffix == ".npy":
        return "npy"
    if suffix in (".parquet", ".pq"):
        return "parquet"
    return "h5"


def import_embeddings(
    source: str | Path,
    bank_path: str | Path,
    *,
    key: str | None = None,
    labels: np.ndarray | None = None,
) -> Path:
    """Import the embeddings at ``source`` (npy folder or file, parquet file, HDF5 file) as a bank.

    ``key`` chooses the HDF5 dataset; ``labels`` (one int a row) override those found in the source.
    The bank's fingerprint is the source's own (npy ``meta.json``, parquet metadata, an isdretrieve bank)
    or else a hash of the rows.
    """
    source = Path(source)
    if not source.exists():
        raise EmbeddingsError(f"embeddings {source} not found")
    kind = embeddings_format(source)
    reader = {"npy": _read_npy, "parquet": _read_parquet, "h5": _read_h5}[kind]
    with reader(source, key) as found:
        features, meta = found
        meta = dict(meta)
        if labels is not None:
            meta["labels"] = labels
        check_import(features, meta, source)
        n, dim = _shape2(features, source)
        if not meta.get("fingerprint"):
            meta["fingerprint"] = content_fingerprint(features)
        return write_bank_blocks(bank_path, n, dim, array_blocks(features), source=str(source), **meta)


def _shape2(x: Any, source: Path) -> tuple[int, int]:
    if len(x.shape) != 2:
        raise EmbeddingsError(f"{source}: embeddings must be a 2-D array [N, D], got shape {list(x.shape)}")
    return int(x.shape[0]), int(x.shape[1])


class _Opened:
    """A context manager yielding (features array-like, metadata) and closing what it opened."""

    def __init__(self, value: tuple[Any, dict[str, Any]], close: Any = None) -> None:
        self.value, self._close = value, close

    def __enter__(self) -> tuple[Any, dict[str, Any]]:
        return self.value

    def __exit__(self, *exc: object) -> None:
        if self._close is not None:
            self._close()


def _load_npy(path: Path) -> np.ndarray:
    try:
        return np.load(path, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError) as exc:
        raise EmbeddingsError(f"cannot read {path}: {exc}") from None


def _read_npy(source: Path, key: str | None) -> _Opened:
    if is_shard_folder(source):
        return _Opened(read_shard_folder(source))
    folder = source if source.is_dir() else None
    features_path = folder / "features.npy" if folder else source
    if not features_path.is_file():
        raise EmbeddingsError(f"{source}: no features.npy in the folder")
    features = _load_npy(features_path)
    meta: dict[str, Any] = {}
    if folder is not None:
        for name, field in (("labels.npy", "labels"), ("indices.npy", "indices")):
            if (folder / name).is_file():
                meta[field] = np.asarray(_load_npy(folder / name))
        if (folder / "paths.txt").is_file():
            meta["paths"] = read_text(folder / "paths.txt").splitlines()
        if (folder / "meta.json").is_file():
            meta.update(parse_meta(read_text(folder / "meta.json"), str(folder / "meta.json")))
    return _Opened((features, meta))


def _read_parquet(source: Path, key: str | None) -> _Opened:
    pa = pyarrow_module()
    try:
        table = pa.parquet.read_table(source)
    except (pa.ArrowException, OSError) as exc:
        raise EmbeddingsError(f"cannot read parquet file {source}: {exc}") from None
    column = key or "embedding"
    if column not in table.column_names:
        raise EmbeddingsError(f"{source}: no column {column!r} (columns: {', '.join(table.column_names)})")
    embedding = table.column(column).combine_chunks()
    if not pa.types.is_fixed_size_list(embedding.type) and not pa.types.is_list(embedding.type):
        raise EmbeddingsError(f"{source}: column {column!r} must be a list of floats, got {embedding.type}")
    features = parquet_rows(embedding, source, column)
    meta: dict[str, Any] = {}
    for name, field in (("label", "labels"), ("index", "indices")):
        if name in table.column_names:
            meta[field] = column_labels(table.column(name).combine_chunks(), source, name)
    if "path" in table.column_names:
        meta["paths"] = table.column("path").to_pylist()
    stored = (table.schema.metadata or {}).get(b"isdretrieve")
    if stored:
        meta.update(parse_meta(stored, f"{source}: parquet metadata 'isdretrieve'"))
    return _Opened((features, meta))


def _read_h5(source: Path, key: str | None) -> _Opened:
    try:
        f = h5py.File(source, "r")
    except OSError as exc:
        raise EmbeddingsError(f"cannot read {source}: not an HDF5, npy or parquet file ({exc})") from None
    try:
        features = _h5_dataset(f, source, key)
        meta: dict[str, Any] = {}
        n = features.shape[0] if len(features.shape) == 2 else -1
        for name, field in (("labels", "labels"), ("indices", "indices")):
            if isinstance(f.get(name), h5py.Dataset) and f[name].shape[:1] == (n,):
                meta[field] = f[name][...]  # checked whole by check_import: type, shape, range
        if isinstance(f.get("paths"), h5py.Dataset) and f["paths"].shape == (n,):
            meta["paths"] = [_text(p) for p in f["paths"][...]]
        if attr_value(f.attrs.get("format")) == BANK_FORMAT:
            with FeatureBank.open(source) as bank:
                meta.update(fingerprint=bank.fingerprint, data_spec=bank.data_spec, classes=bank.classes)
    except BaseException:
        f.close()
        raise
    return _Opened((features, meta), f.close)


def _text(value: Any) -> Any:
    """An HDF5 string as str (bytes that are not UTF-8 keep their surrogates, for the check to name)."""
    return value.decode("utf-8", errors="surrogateescape") if isinstance(value, bytes) else value


def _h5_dataset(f: h5py.File, source: Path, key: str | None) -> h5py.Dataset:
    """``key``, else ``features``, else the only 2-D numeric dataset in the file."""
    if key is not None:
        if not isinstance(f.get(key), h5py.Dataset):
            raise EmbeddingsError(f"{source}: no dataset {key!r}")
        return f[key]
    if isinstance(f.get("features"), h5py.Dataset):
        return f["features"]
    found: list[str] = []
    f.visititems(
        lambda name, obj: (
            found.append(name)
            if isinstance(obj, h5py.Dataset) and len(obj.shape) == 2 and obj.dtype.kind in "fiu"
            else None
        )
    )
    if len(found) != 1:
        what = "no 2-D numeric dataset" if not found else f"several 2-D datasets ({', '.join(found)})"
        raise EmbeddingsError(f"{source}: {what}; name the one to use with --key")
    return f[found[0]]
