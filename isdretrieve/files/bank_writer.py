"""The one writer of ``bank.h5`` (layout in :mod:`isdretrieve.files.bank`).

Two ways to write, one object:

- **Whole** (``resumable=False``): the bank is written under a temporary name beside ``path`` and renamed
  over it by :meth:`BankWriter.finish`, so ``path`` never holds a half-written bank (banks built from
  arrays, imported embeddings, joined shards).
- **Resumable** (``resumable=True``, an export): ``path`` is created at once, incomplete, and
  :meth:`BankWriter.append` advances ``rows_done`` after every flushed block (the rows first, then the
  marker that covers them), so :meth:`BankWriter.resume` continues after a crash.

:meth:`BankWriter.finish` trims the datasets to the rows written, sets ``complete`` last and returns the
path; a writer left by an exception closes its file (and removes a whole write's temporary file).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from isdretrieve.errors import BankError, InvalidArgument
from isdretrieve.files.atomic import atomic_path, commit, fsync_path, names_file, temp_path
from isdretrieve.files.bank import DATASETS, DTYPES, BankAttrs

CHUNK_BYTES = 1 << 20  # a features chunk holds about this many bytes


def create_layout(f: h5py.File, n: int, dim: int, dtype: str) -> None:
    """The four datasets, ``n`` rows each, resizable along the rows (an export trims skipped rows)."""
    if dtype not in DTYPES:
        raise InvalidArgument(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    itemsize = np.dtype(dtype).itemsize
    rows = max(1, min(max(n, 1), CHUNK_BYTES // (dim * itemsize)))
    flat = max(1, min(max(n, 1), CHUNK_BYTES // 8))
    f.create_dataset("features", (n, dim), dtype=dtype, maxshape=(None, dim), chunks=(rows, dim))
    f.create_dataset("labels", (n,), dtype=np.int64, maxshape=(None,), chunks=(flat,), fillvalue=-1)
    f.create_dataset("indices", (n,), dtype=np.int64, maxshape=(None,), chunks=(flat,), fillvalue=-1)
    f.create_dataset("paths", (n,), dtype=h5py.string_dtype(), maxshape=(None,), chunks=(min(flat, 4096),))


class BankWriter:
    """Writes one bank: :meth:`create` or :meth:`resume`, then :meth:`append` / :meth:`put`, then
    :meth:`finish`. Use it as a context manager so that a failure closes (and cleans up) the file."""

    def __init__(self, h5: h5py.File, path: Path, temp: Path | None) -> None:
        self._h5, self.path, self._temp = h5, path, temp
        self.info = BankAttrs.read(h5, path)
        self.dtype = str(h5["features"].dtype)

    @classmethod
    def create(
        cls, path: str | Path, *, rows: int, dim: int, dtype: str, attrs: BankAttrs, resumable: bool = False
    ) -> BankWriter:
        """A new bank of ``rows`` x ``dim`` rows with the attributes ``attrs`` (progress zero)."""
        path = Path(path)
        if resumable:
            with atomic_path(path) as tmp, h5py.File(tmp, "w") as f:  # the layout lands whole or not at all
                create_layout(f, rows, dim, dtype)
                attrs.write(f)
            return cls.resume(path)
        temp = temp_path(path)
        f = h5py.File(temp, "w")
        try:
            create_layout(f, rows, dim, dtype)
            attrs.write(f)
        except BaseException:
            f.close()
            temp.unlink(missing_ok=True)
            raise
        return cls(f, path, temp)

    @classmethod
    def resume(cls, path: str | Path) -> BankWriter:
        """Reopen an incomplete bank written resumably; its ``info`` tells where it stopped."""
        path = Path(path)
        try:
            f = h5py.File(path, "r+")
        except OSError as exc:
            raise BankError(f"cannot open {path} for writing (another export writing it?): {exc}") from None
        try:
            return cls(f, path, None)
        except BaseException:
            f.close()
            raise

    @property
    def rows_done(self) -> int:
        return self.info.rows_done

    @property
    def dim(self) -> int:
        return int(self._h5["features"].shape[1])

    def put(
        self, start: int, features: np.ndarray, labels: np.ndarray, indices: np.ndarray, paths: Sequence[str]
    ) -> None:
        """Write rows at ``start`` (an export filling a fixed layout out of order); no progress marker."""
        stop = start + len(features)
        with names_file(self.path):
            self._h5["features"][start:stop] = np.asarray(features).astype(self.dtype, copy=False)
            self._h5["labels"][start:stop] = np.asarray(labels, dtype=np.int64)
            self._h5["indices"][start:stop] = np.asarray(indices, dtype=np.int64)
            self._h5["paths"][start:stop] = np.array(list(paths), dtype=object)
            self._h5.flush()

    def append(
        self,
        features: np.ndarray,
        labels: np.ndarray,
        indices: np.ndarray,
        paths: Sequence[str],
        **progress: Any,
    ) -> None:
        """Write rows after the last one written, then advance ``rows_done`` (and any other progress
        attribute given, such as ``items_done``) once the rows are on disk."""
        self.put(self.rows_done, features, labels, indices, paths)
        self.mark(rows_done=self.rows_done + len(features), **progress)

    def mark(self, **progress: Any) -> None:
        """Record progress attributes (rows flushed first)."""
        with names_file(self.path):
            self._h5.flush()
            BankAttrs.update(self._h5, **progress)
            self._h5.flush()
        self.info = dataclasses.replace(self.info, **progress)

    def finish(self, rows: int | None = None, **attrs: Any) -> Path:
        """Trim to ``rows`` (default: the rows written), set ``attrs`` and ``complete`` last, close."""
        rows = self.rows_done if rows is None else rows
        with names_file(self.path):
            for name in DATASETS:
                self._h5[name].resize(rows, axis=0)
            self._h5.flush()
            fsync_path(self._temp or self.path)
            self.mark(rows_done=rows, **attrs, complete=True)
            self._h5.close()
            if self._temp is not None:
                commit(self._temp, self.path)
            else:
                fsync_path(self.path)
        return self.path

    def close(self) -> None:
        """Close without finishing: a resumable bank stays resumable; a whole write is discarded."""
        if self._h5.id.valid:
            self._h5.close()
        if self._temp is not None:
            self._temp.unlink(missing_ok=True)

    def __enter__(self) -> BankWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
