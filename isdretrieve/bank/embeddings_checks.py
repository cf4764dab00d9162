"""Checks of embeddings made elsewhere, run on the whole input before a bank is written.

An import reads its source (:mod:`isdretrieve.bank.embeddings_in`) into features plus metadata, then
:func:`check_import` checks all of it at once: the features' shape and dtype (numbers, not text), and the
labels, indices, paths, fingerprint, data SPEC and class names, each against the row count and its
type. Every problem is one :class:`~isdretrieve.errors.EmbeddingsError` line naming the source and the
first bad row; nothing is cut, padded or converted to fit. The helpers below also read the parts of a
source that are text (``paths.txt``, ``meta.json``, parquet metadata) so that bad bytes are one line too.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from isdretrieve.errors import EmbeddingsError
from isdretrieve.files.bank import MAX_LABEL

META_KEYS = ("fingerprint", "data_spec", "classes")


def check_import(features: Any, meta: dict[str, Any], source: Path | str) -> None:
    """Check features and their metadata (labels, indices, paths, fingerprint, data_spec, classes)."""
    n = check_features(features, source)
    for key in ("fingerprint", "data_spec"):
        if key in meta and not isinstance(meta[key], str):
            raise EmbeddingsError(f"{source}: metadata {key!r} must be text, got {type(meta[key]).__name__}")
    classes = meta.get("classes")
    if classes is not None:
        check_classes(classes, source)
    if meta.get("labels") is not None:
        check_labels(meta["labels"], n, source, classes=classes)
    if meta.get("indices") is not None:
        check_whole_numbers(meta["indices"], n, source, "indices", low=0, high=np.iinfo(np.int64).max)
    if meta.get("paths") is not None:
        check_paths(meta["paths"], n, source)


def check_features(x: Any, source: Path | str) -> int:
    """The row count of a 2-D array-like of numbers; EmbeddingsError for text, objects or booleans."""
    shape = tuple(getattr(x, "shape", ()))
    if len(shape) != 2:
        raise EmbeddingsError(f"{source}: embeddings must be a 2-D array [N, D], got shape {list(shape)}")
    kind = np.dtype(x.dtype).kind
    if kind not in "fiu":
        what = {"U": "text", "S": "bytes", "O": "objects (text?)", "b": "booleans"}.get(kind, str(x.dtype))
        raise EmbeddingsError(f"{source}: embeddings must be numbers, got {what} (dtype {x.dtype})")
    return int(shape[0])


def check_classes(classes: Any, source: Path | str) -> None:
    if not isinstance(classes, (list, tuple)) or not all(isinstance(c, str) for c in classes):
        raise EmbeddingsError(f"{source}: metadata 'classes' must be a list of class names (text)")
    bad = next((c for c in classes if not _valid_text(c)), None)
    if bad is not None:
        raise EmbeddingsError(f"{source}: class name {bad!r} is not valid UTF-8 text")


def check_labels(labels: Any, n: int, source: Path | str, *, classes: Sequence[str] | None = None) -> None:
    """One whole-number label a row in [-1, MAX_LABEL] (-1: unlabelled), below ``len(classes)`` if named."""
    high = MAX_LABEL if not classes else len(classes) - 1
    check_whole_numbers(labels, n, source, "labels", low=-1, high=high)


def check_whole_numbers(values: Any, n: int, source: Path | str, what: str, *, low: int, high: int) -> None:
    """``values`` is a 1-D integer array of ``n`` entries within [low, high]."""
    array = np.asarray(values)
    if array.ndim != 1 or len(array) != n:
        raise EmbeddingsError(f"{source}: {what} has shape {list(array.shape)} for {n} embedding rows")
    if array.dtype.kind not in "iu":
        raise EmbeddingsError(f"{source}: {what} must be whole numbers, got {_dtype_words(array)}")
    if n == 0:
        return
    outside = (array < low) | (array > high)
    if outside.any():
        row = int(np.argmax(outside))
        raise EmbeddingsError(
            f"{source}: {what} must be in [{low}, {high}], row {row} holds {int(array[row])}"
        )


def check_paths(paths: Sequence[Any], n: int, source: Path | str) -> None:
    """``n`` paths, each text that is valid UTF-8 and holds no NUL."""
    if len(paths) != n:
        raise EmbeddingsError(f"{source}: paths has {len(paths)} entries for {n} embedding rows")
    for row, path in enumerate(paths):
        if not isinstance(path, str):
            raise EmbeddingsError(f"{source}: path of row {row} is {type(path).__name__}, not text")
        if not _valid_text(path):
            raise EmbeddingsError(f"{source}: path of row {row} ({path!r}) is not valid UTF-8 text")


def _valid_text(text: str) -> bool:
    if "\x00" in text:
        return False
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:  # lone surrogates: bytes that were not UTF-8
        return False
    return True


def _dtype_words(array: np.ndarray) -> str:
    kind = {"U": "text", "S": "bytes", "O": "objects", "f": "floats", "b": "booleans"}.get(array.dtype.kind)
    return f"{kind} (dtype {array.dtype})" if kind else f"dtype {array.dtype}"


def read_text(path: Path) -> str:
    """A UTF-8 text file; EmbeddingsError naming the file when it is not UTF-8."""
    try:
        return path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as exc:
        raise EmbeddingsError(
            f"{path} is not UTF-8 text (byte {exc.start} is {exc.object[exc.start]:#04x})"
        ) from None
    except OSError as exc:
        raise EmbeddingsError(f"cannot read {path}: {exc.strerror or exc}") from None


def parse_meta(text: str | bytes, where: str) -> dict[str, Any]:
    """Our metadata (fingerprint, data_spec, classes) from JSON text; one line when it is not JSON or
    not an object."""
    try:
        info = json.loads(text)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise EmbeddingsError(f"{where} is not valid JSON: {exc}") from None
    if not isinstance(info, dict):
        raise EmbeddingsError(f"{where} must be a JSON object, got {type(info).__name__}")
    return {key: info[key] for key in META_KEYS if key in info}


def parquet_rows(embedding: Any, source: Path | str, column: str) -> np.ndarray:
    """A parquet list column as [N, D] numbers: every row present and of one length, no null value."""
    import pyarrow as pa
    import pyarrow.compute as pc

    n = len(embedding)
    if embedding.null_count:
        row = int(np.argmax(np.asarray(embedding.is_null())))
        raise EmbeddingsError(f"{source}: column {column!r} row {row} is null (no embedding)")
    lengths = np.asarray(pc.list_value_length(embedding), dtype=np.int64)
    if n and (lengths != lengths[0]).any():
        row = int(np.argmax(lengths != lengths[0]))
        raise EmbeddingsError(
            f"{source}: rows of column {column!r} have different lengths (row 0 has {lengths[0]}, "
            f"row {row} has {lengths[row]})"
        )
    values = embedding.flatten()
    if not (pa.types.is_floating(values.type) or pa.types.is_integer(values.type)):
        raise EmbeddingsError(f"{source}: column {column!r} must be a list of numbers, got {embedding.type}")
    if values.null_count:
        where = int(np.argmax(np.asarray(values.is_null())))
        raise EmbeddingsError(
            f"{source}: column {column!r} row {where // int(lengths[0])} holds a null value"
        )
    dim = int(lengths[0]) if n else 0
    return values.to_numpy(zero_copy_only=False).reshape(n, dim)


def column_labels(column: Any, source: Path | str, name: str) -> np.ndarray:
    """A parquet label or index column as whole numbers; one line for nulls or another type."""
    if column.null_count:
        row = int(np.argmax(np.asarray(column.is_null())))
        raise EmbeddingsError(f"{source}: column {name!r} row {row} is null")
    import pyarrow as pa

    if not pa.types.is_integer(column.type):
        raise EmbeddingsError(f"{source}: column {name!r} must be whole numbers, got {column.type}")
    return column.to_numpy()
