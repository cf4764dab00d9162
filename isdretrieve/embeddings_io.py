"""Embeddings in and out of feature banks: npy folders, parquet files and HDF5 banks written elsewhere.

Formats (see ``indices/README.md``):

- **npy**: a folder holding ``features.npy`` [N, D] float32 (L2-normalised), ``rows.npy`` [N] int64 (bank
  row numbers 0..N-1, which are the index's ids), ``indices.npy`` [N] int64 (dataset index of each row),
  ``labels.npy`` [N] int64 (-1: unlabelled), ``paths.txt`` (one image path a line) and ``meta.json``
  (fingerprint, data spec, class names). Reading needs only ``features.npy``; the rest is optional.
- **parquet**: one file with columns ``row`` int64, ``index`` int64, ``label`` int64, ``path`` string and
  ``embedding`` fixed_size_list<float32>[D]; the bank's fingerprint, data spec and classes are in the
  schema's metadata. Needs the optional ``parquet`` extra (pyarrow).
- **HDF5**: any file with a 2-D float dataset: ``--key`` names it, else ``features``, else the only 2-D
  float dataset in the file (more than one without ``--key`` is an error).

Imported features are checked block by block: a NaN or infinite value, or an all-zero row, is a one-line
:class:`EmbeddingsError` naming the first bad row (zero vectors have no direction to search by); the rest
is L2-normalised, as an exported bank is. Banks are streamed in blocks, never held whole in memory, and
every output is written to a temporary name and renamed into place.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from isdretrieve.atomic import atomic_path, fsync_path
from isdretrieve.bank import FeatureBank, _atomic_h5, _create_layout, finish_complete_bank
from isdretrieve.bank_file import BANK_FORMAT, attr_value
from isdretrieve.errors import BankError

FORMATS = ("h5", "npy", "parquet")
BLOCK_ROWS_BYTES = 64 << 20  # features are read and written about this many float32 bytes at a time
NPY_FILES = ("features.npy", "rows.npy", "indices.npy", "labels.npy", "paths.txt", "meta.json")


class EmbeddingsError(BankError):
    """An embeddings file is unreadable, of the wrong shape, or holds NaN / zero rows."""


def _block_rows(dim: int) -> int:
    return max(1, BLOCK_ROWS_BYTES // (4 * max(dim, 1)))


def _pyarrow() -> Any:
    try:
        import pyarrow
        import pyarrow.parquet  # noqa: F401
    except ImportError:
        raise EmbeddingsError("parquet needs pyarrow: pip install 'isdretrieve[parquet]'") from None
    return pyarrow


# ------------------------------------------------------------------------------------------ checks
def checked_block(x: np.ndarray, start: int, source: str) -> np.ndarray:
    """``x`` [B, D] as L2-normalised float32; NaN/inf values or all-zero rows are an EmbeddingsError."""
    x = np.asarray(x)
    if x.ndim != 2:
        raise EmbeddingsError(f"{source}: embeddings must be a 2-D array [N, D], got shape {list(x.shape)}")
    if not np.issubdtype(x.dtype, np.floating) and not np.issubdtype(x.dtype, np.integer):
        raise EmbeddingsError(f"{source}: embeddings must be numbers, got dtype {x.dtype}")
    x = x.astype(np.float32, copy=False)
    finite = np.isfinite(x).all(axis=1)
    if not finite.all():
        row = start + int(np.argmin(finite))
        raise EmbeddingsError(f"{source}: row {row} holds NaN or infinite values")
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    if (norms == 0).any():
        row = start + int(np.argmax(norms[:, 0] == 0))
        raise EmbeddingsError(f"{source}: row {row} is all zeros (a zero vector has no direction to search)")
    return np.ascontiguousarray(x / norms, dtype=np.float32)


# ----------------------------------------------------------------------------------- bank writing
def write_bank_blocks(
    path: str | Path,
    n: int,
    dim: int,
    blocks: Iterable[np.ndarray],
    *,
    labels: np.ndarray | None = None,
    indices: np.ndarray | None = None,
    paths: Sequence[str] | None = None,
    fingerprint: str,
    data_spec: str = "",
    classes: Sequence[str] = (),
    source: str = "embeddings",
) -> Path:
    """Write a complete float32 bank of ``n`` x ``dim`` rows from consecutive feature ``blocks``, atomically.

    Each block is checked and normalised with :func:`checked_block`. ``labels`` default to -1,
    ``indices`` to 0..n-1 and ``paths`` to the indices as strings.
    """
    path = Path(path)
    labels = np.full(n, -1, np.int64) if labels is None else np.asarray(labels, np.int64).reshape(-1)
    indices = np.arange(n, dtype=np.int64) if indices is None else np.asarray(indices, np.int64).reshape(-1)
    path_list = [str(int(i)) for i in indices] if paths is None else [str(p) for p in paths]
    for name, length in (("labels", len(labels)), ("indices", len(indices)), ("paths", len(path_list))):
        if length != n:
            raise EmbeddingsError(f"{source}: {name} has {length} entries for {n} embedding rows")
    if n < 1 or dim < 1:
        raise EmbeddingsError(f"{source}: no embeddings to import (shape [{n}, {dim}])")
    with _atomic_h5(path) as f:
        _create_layout(f, n, dim, "float32")
        done = 0
        for block in blocks:
            x = checked_block(block, done, source)
            if x.shape[1] != dim or done + len(x) > n:
                raise EmbeddingsError(f"{source}: block of shape {list(x.shape)} after {done} rows of {dim}")
            f["features"][done : done + len(x)] = x
            done += len(x)
        if done != n:
            raise EmbeddingsError(f"{source}: {done} rows read, {n} expected")
        finish_complete_bank(
            f,
            labels,
            indices,
            path_list,
            fingerprint=fingerprint,
            encoder=None,
            transform="",
            data_spec=data_spec,
            classes=classes,
            normalized=True,
        )
    return path


def array_blocks(x: Any, rows: int | None = None) -> Iterator[np.ndarray]:
    """Consecutive row blocks of an array-like with ``shape`` and slicing (ndarray, memmap, h5py)."""
    n, dim = x.shape
    step = rows or _block_rows(dim)
    for start in range(0, n, step):
        yield np.asarray(x[start : start + step])


def content_fingerprint(x: Any) -> str:
    """``sha256:...`` of an array's float32 bytes, block by block (the fingerprint of imported rows)."""
    digest = hashlib.sha256()
    digest.update(str(tuple(x.shape)).encode())
    for block in array_blocks(x):
        digest.update(np.ascontiguousarray(block, dtype=np.float32).tobytes())
    return f"sha256:{digest.hexdigest()[:32]}"


def bank_from_array(features: np.ndarray, path: str | Path, *, labels: np.ndarray | None = None) -> Path:
    """A bank at ``path`` holding ``features`` [N, D] (checked, normalised), fingerprinted by content."""
    x = np.asarray(features) if not isinstance(features, np.ndarray) else features
    if x.ndim != 2:
        raise EmbeddingsError(f"embeddings must be a 2-D array [N, D], got shape {list(x.shape)}")
    return write_bank_blocks(
        path, *x.shape, array_blocks(x), labels=labels, fingerprint=content_fingerprint(x), source="array"
    )


# ------------------------------------------------------------------------------------------ import
def read_labels(path: str | Path) -> np.ndarray:
    """One int label a row from a .npy file or a text file with one integer a line."""
    path = Path(path)
    try:
        if path.suffix.lower() == ".npy":
            labels = np.load(path, allow_pickle=False)
        else:
            labels = np.array([int(line) for line in path.read_text().split()], dtype=np.int64)
    except (ValueError, OSError) as exc:
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
        n, dim = _shape2(features, source)
        meta = dict(meta)
        if labels is not None:
            meta["labels"] = labels
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
            meta["paths"] = (folder / "paths.txt").read_text().splitlines()
        if (folder / "meta.json").is_file():
            try:
                info = json.loads((folder / "meta.json").read_text())
            except json.JSONDecodeError as exc:
                raise EmbeddingsError(f"{folder / 'meta.json'} is not valid JSON: {exc}") from None
            meta.update({k: info[k] for k in ("fingerprint", "data_spec", "classes") if k in info})
    return _Opened((features, meta))


def _read_parquet(source: Path, key: str | None) -> _Opened:
    pa = _pyarrow()
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
    n = len(embedding)
    values = embedding.flatten().to_numpy(zero_copy_only=False)
    if n and len(values) % n:
        raise EmbeddingsError(f"{source}: rows of column {column!r} have different lengths")
    features = values.reshape(n, len(values) // n if n else 0)
    meta: dict[str, Any] = {}
    for name, field in (("label", "labels"), ("index", "indices")):
        if name in table.column_names:
            meta[field] = table.column(name).to_numpy()
    if "path" in table.column_names:
        meta["paths"] = [str(p) for p in table.column("path").to_pylist()]
    stored = (table.schema.metadata or {}).get(b"isdretrieve")
    if stored:
        info = json.loads(stored)
        meta.update({k: info[k] for k in ("fingerprint", "data_spec", "classes") if k in info})
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
            if isinstance(f.get(name), h5py.Dataset) and f[name].shape == (n,):
                meta[field] = f[name][...]
        if isinstance(f.get("paths"), h5py.Dataset) and f["paths"].shape == (n,):
            meta["paths"] = [p.decode() if isinstance(p, bytes) else str(p) for p in f["paths"][...]]
        if attr_value(f.attrs.get("format")) == BANK_FORMAT:
            with FeatureBank.open(source) as bank:
                meta.update(fingerprint=bank.fingerprint, data_spec=bank.data_spec, classes=bank.classes)
    except BaseException:
        f.close()
        raise
    return _Opened((features, meta), f.close)


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


# ------------------------------------------------------------------------------------------ export
def export_embeddings(bank_path: str | Path, out: str | Path, fmt: str) -> Path:
    """Write the bank at ``bank_path`` as ``fmt`` ("npy": a folder, "parquet": one file, "h5": a copy)."""
    if fmt not in FORMATS:
        raise EmbeddingsError(f"format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    out = Path(out)
    with FeatureBank.open(bank_path) as bank:
        if fmt == "h5":
            with atomic_path(out) as tmp:
                shutil.copyfile(bank.path, tmp)
        elif fmt == "npy":
            _write_npy(bank, out)
        else:
            _write_parquet(bank, out)
    return out


def _meta(bank: FeatureBank) -> dict[str, Any]:
    return {
        "format": "isdretrieve.embeddings/1",
        "fingerprint": bank.fingerprint,
        "data_spec": bank.data_spec,
        "classes": bank.classes,
        "count": len(bank),
        "dim": bank.dim,
    }


def _write_npy(bank: FeatureBank, out: Path) -> None:
    """The npy folder, built under a temporary name and renamed into place (an old one is replaced)."""
    if out.exists() and not out.is_dir():
        raise EmbeddingsError(f"{out} is a file: npy export writes a folder")
    tmp = out.with_name(f".{out.name}.tmp-npy")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        n, dim = len(bank), bank.dim
        features = np.lib.format.open_memmap(tmp / "features.npy", "w+", np.float32, (n, dim))
        for start in range(0, n, _block_rows(dim)):
            stop = min(start + _block_rows(dim), n)
            features[start:stop] = bank.features(start, stop)
        features.flush()
        del features
        np.save(tmp / "rows.npy", np.arange(n, dtype=np.int64))
        np.save(tmp / "indices.npy", bank.indices().astype(np.int64))
        np.save(tmp / "labels.npy", bank.labels().astype(np.int64))
        (tmp / "paths.txt").write_text("".join(f"{p}\n" for p in bank.paths()))
        (tmp / "meta.json").write_text(json.dumps(_meta(bank), indent=2) + "\n")
        for name in NPY_FILES:
            fsync_path(tmp / name)
        old = out.with_name(f".{out.name}.old-npy")
        if out.exists():
            out.replace(old)
        tmp.replace(out)
        shutil.rmtree(old, ignore_errors=True)
        fsync_path(out.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _write_parquet(bank: FeatureBank, out: Path) -> None:
    pa = _pyarrow()
    n, dim = len(bank), bank.dim
    schema = pa.schema(
        [
            ("row", pa.int64()),
            ("index", pa.int64()),
            ("label", pa.int64()),
            ("path", pa.string()),
            ("embedding", pa.list_(pa.float32(), dim)),
        ],
        metadata={"isdretrieve": json.dumps(_meta(bank))},
    )
    indices, labels, paths = bank.indices(), bank.labels(), bank.paths()
    with atomic_path(out) as tmp, pa.parquet.ParquetWriter(tmp, schema) as writer:
        for start in range(0, n, _block_rows(dim)):
            stop = min(start + _block_rows(dim), n)
            x = bank.features(start, stop)
            embedding = pa.FixedSizeListArray.from_arrays(pa.array(x.reshape(-1), pa.float32()), dim)
            columns = [
                pa.array(np.arange(start, stop, dtype=np.int64)),
                pa.array(indices[start:stop].astype(np.int64)),
                pa.array(labels[start:stop].astype(np.int64)),
                pa.array(paths[start:stop], pa.string()),
                embedding,
            ]
            writer.write_table(pa.Table.from_arrays(columns, schema=schema))
