"""Banks from arrays in memory or read block by block (NumPy, memory maps, HDF5 datasets, tensors).

Every block is checked before it is written: a NaN or infinite value, or (when rows are normalised) an
all-zero row, is a one-line :class:`~isdretrieve.errors.EmbeddingsError` naming the first bad row (a zero
vector has no direction to search by). Rows are L2-normalised in float32 before the cast to the bank's
dtype. The bank is written whole (:class:`~isdretrieve.files.bank_writer.BankWriter`): it appears at its
path only once complete.
"""

from __future__ import annotations

import hashlib
import sys
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from isdretrieve.errors import EmbeddingsError
from isdretrieve.files.bank import BLOCK_BYTES, BankAttrs
from isdretrieve.files.bank_writer import BankWriter
from isdretrieve.files.encoder_header import EncoderHeader


def checked_block(x: Any, start: int, source: str, *, normalize: bool = True) -> np.ndarray:
    """``x`` [B, D] as float32, L2-normalised unless ``normalize`` is False; NaN/inf values, or all-zero
    rows when normalising, are an EmbeddingsError naming the first bad row (``start`` numbers the first)."""
    x = as_array(x)
    if x.ndim != 2:
        raise EmbeddingsError(f"{source}: embeddings must be a 2-D array [N, D], got shape {list(x.shape)}")
    if not np.issubdtype(x.dtype, np.floating) and not np.issubdtype(x.dtype, np.integer):
        raise EmbeddingsError(f"{source}: embeddings must be numbers, got dtype {x.dtype}")
    x = x.astype(np.float32, copy=False)
    finite = np.isfinite(x).all(axis=1)
    if not finite.all():
        row = start + int(np.argmin(finite))
        raise EmbeddingsError(f"{source}: row {row} holds NaN or infinite values")
    if not normalize:
        return np.ascontiguousarray(x)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    if (norms == 0).any():
        row = start + int(np.argmax(norms[:, 0] == 0))
        raise EmbeddingsError(f"{source}: row {row} is all zeros (a zero vector has no direction to search)")
    return np.ascontiguousarray(x / norms, dtype=np.float32)


def as_array(x: Any) -> np.ndarray:
    """A NumPy array from an array-like or a torch tensor (torch is never imported for it)."""
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(x, torch.Tensor):
        return x.detach().cpu().float().numpy()
    return np.asarray(x)


def array_blocks(x: Any, rows: int | None = None) -> Iterator[np.ndarray]:
    """Consecutive row blocks of an array-like with ``shape`` and slicing (ndarray, memmap, h5py)."""
    n, dim = x.shape
    step = rows or max(1, BLOCK_BYTES // (4 * max(dim, 1)))
    for start in range(0, n, step):
        yield as_array(x[start : start + step])


def content_fingerprint(x: Any) -> str:
    """``sha256:...`` of an array's float32 bytes, block by block (the fingerprint of imported rows)."""
    digest = hashlib.sha256()
    digest.update(str(tuple(x.shape)).encode())
    for block in array_blocks(x):
        digest.update(np.ascontiguousarray(block, dtype=np.float32).tobytes())
    return f"sha256:{digest.hexdigest()[:32]}"


def write_bank_blocks(
    path: str | Path,
    n: int,
    dim: int,
    blocks: Iterable[Any],
    *,
    labels: Any = None,
    indices: Any = None,
    paths: Sequence[str] | None = None,
    fingerprint: str,
    encoder: EncoderHeader | dict | None = None,
    transform: str = "",
    data_spec: str = "",
    classes: Sequence[str] = (),
    dtype: str = "float32",
    normalize: bool = True,
    source: str = "embeddings",
) -> Path:
    """Write a complete bank of ``n`` x ``dim`` rows from consecutive feature ``blocks``, atomically.

    Each block is checked (and normalised) by :func:`checked_block`. ``labels`` default to -1, ``indices``
    to 0..n-1 and ``paths`` to the indices as strings; the bank's ``normalized`` is ``normalize``.
    """
    labels = np.full(n, -1, np.int64) if labels is None else as_array(labels).astype(np.int64).reshape(-1)
    indices = (
        np.arange(n, dtype=np.int64) if indices is None else as_array(indices).astype(np.int64).reshape(-1)
    )
    path_list = [str(int(i)) for i in indices] if paths is None else [str(p) for p in paths]
    for name, length in (("labels", len(labels)), ("indices", len(indices)), ("paths", len(path_list))):
        if length != n:
            raise EmbeddingsError(f"{source}: {name} has {length} entries for {n} embedding rows")
    if n < 1 or dim < 1:
        raise EmbeddingsError(f"{source}: no embeddings to import (shape [{n}, {dim}])")
    attrs = BankAttrs.identity(
        fingerprint=fingerprint,
        encoder=encoder,
        transform=transform,
        data_spec=data_spec,
        classes=classes,
        normalized=normalize,
    )
    with BankWriter.create(path, rows=n, dim=dim, dtype=dtype, attrs=attrs) as writer:
        for block in blocks:
            done = writer.rows_done
            x = checked_block(block, done, source, normalize=normalize)
            if x.shape[1] != dim or done + len(x) > n:
                raise EmbeddingsError(f"{source}: block of shape {list(x.shape)} after {done} rows of {dim}")
            stop = done + len(x)
            writer.append(x, labels[done:stop], indices[done:stop], path_list[done:stop], items_done=stop)
        if writer.rows_done != n:
            raise EmbeddingsError(f"{source}: {writer.rows_done} rows read, {n} expected")
        return writer.finish(items_total=n)


def write_bank(
    path: str | Path,
    features: Any,
    *,
    labels: Any,
    indices: Any = None,
    paths: Sequence[str] | None = None,
    fingerprint: str,
    encoder: EncoderHeader | dict | None = None,
    transform: str = "",
    data_spec: str = "",
    classes: Sequence[str] = (),
    dtype: str = "float32",
    normalize: bool = True,
) -> Path:
    """Write a complete bank from in-memory features [N, D] (an array or a tensor), atomically.

    ``indices`` default to ``0..N-1`` and ``paths`` to the indices as strings; rows are L2-normalised in
    float32 before the cast to ``dtype`` unless ``normalize`` is False (then ``normalized`` is False).
    """
    x = as_array(features)
    if x.ndim != 2:
        raise EmbeddingsError(f"features must be [N, D], got shape {list(x.shape)}")
    return write_bank_blocks(
        path,
        *x.shape,
        array_blocks(x),
        labels=labels,
        indices=indices,
        paths=paths,
        fingerprint=fingerprint,
        encoder=encoder,
        transform=transform,
        data_spec=data_spec,
        classes=classes,
        dtype=dtype,
        normalize=normalize,
        source="features",
    )


def bank_from_array(features: Any, path: str | Path, *, labels: Any = None) -> Path:
    """A bank at ``path`` holding ``features`` [N, D] (checked, normalised), fingerprinted by content."""
    x = as_array(features)
    if x.ndim != 2:
        raise EmbeddingsError(f"embeddings must be a 2-D array [N, D], got shape {list(x.shape)}")
    return write_bank_blocks(
        path, *x.shape, array_blocks(x), labels=labels, fingerprint=content_fingerprint(x), source="array"
    )
