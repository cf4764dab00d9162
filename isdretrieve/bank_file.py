"""Reading feature banks (``bank.h5``): open a complete bank and read its rows and attributes, with h5py
and NumPy only, so that searching and evaluating banks need not import torch. ``isdretrieve.bank``
writes them and documents the layout."""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import h5py
import numpy as np

from isdretrieve.errors import BankError, CheckpointError

if TYPE_CHECKING:
    from isdretrieve.models import EncoderHeader

BANK_FORMAT = "isdretrieve.bank/1"


def attr_value(value: Any) -> Any:
    """An HDF5 attribute as a plain Python value (bytes decoded, NumPy scalars and arrays unwrapped)."""
    if isinstance(value, bytes):
        return value.decode()
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    return value


def open_h5(path: Path, mode: str = "r") -> h5py.File:
    """Open for reading without HDF5's file lock (so a running export can be inspected), or for writing."""
    if mode == "r":
        try:
            return h5py.File(path, "r", locking=False)
        except (TypeError, ValueError):  # an HDF5 library without the locking switch
            return h5py.File(path, "r")
    return h5py.File(path, mode)


class FeatureBank:
    """A complete feature bank, opened read-only. Use :meth:`open`; close it (or use ``with``)."""

    def __init__(self, path: Path, h5: h5py.File) -> None:
        self.path = path
        self._h5 = h5
        self.attrs: dict[str, Any] = {key: attr_value(value) for key, value in h5.attrs.items()}
        self.fingerprint: str = str(self.attrs.get("fingerprint", ""))
        self.transform: str = str(self.attrs.get("transform", ""))
        self.data_spec: str = str(self.attrs.get("data_spec", ""))
        self.skipped: int = int(self.attrs.get("skipped", 0))
        try:
            self.classes: list[str] = list(json.loads(self.attrs.get("classes", "[]")))
            self.skipped_paths: list[str] = list(json.loads(self.attrs.get("skipped_paths", "[]")))
            shard = json.loads(self.attrs.get("shard", "[0, 1]"))
            self.shard: tuple[int, int] = (int(shard[0]), int(shard[1]))
            self._header: dict | None = json.loads(self.attrs.get("encoder", "null"))
        except (ValueError, TypeError, IndexError) as exc:
            raise BankError(f"feature bank {path} has a malformed attribute: {exc}") from None

    @classmethod
    def open(cls, path: str | Path) -> FeatureBank:
        """Open a complete bank; BankError if it is missing, not a bank, corrupt or incomplete."""
        path = Path(path)
        if not path.exists():
            raise BankError(f"feature bank {path} not found")
        if path.is_dir():
            raise BankError(f"feature bank {path} is a directory, not an HDF5 file")
        try:
            h5 = open_h5(path)
        except OSError as exc:
            raise BankError(
                f"cannot read feature bank {path}: not an HDF5 file, or truncated ({exc})"
            ) from None
        try:
            check_complete(h5, path)
            return cls(path, h5)
        except BaseException:
            h5.close()
            raise

    def __len__(self) -> int:
        return int(self._h5["features"].shape[0])

    @functools.cached_property
    def encoder(self) -> EncoderHeader | None:
        """The encoder's header (architecture, input size, normalisation); None for outside features."""
        from isdretrieve.models import EncoderHeader  # torch: only when a caller needs the encoder

        try:
            return None if self._header is None else EncoderHeader.from_dict(self._header)
        except CheckpointError as exc:
            raise BankError(f"feature bank {self.path} has a malformed encoder attribute: {exc}") from None

    def __repr__(self) -> str:
        shape = f"n={len(self)}, dim={self.dim}, dtype={self.dtype}"
        return f"FeatureBank('{self.path}', {shape}, data='{self.data_spec}')"

    @property
    def dim(self) -> int:
        return int(self._h5["features"].shape[1])

    @property
    def dtype(self) -> np.dtype:
        """Stored feature type (float32 or float16)."""
        return self._h5["features"].dtype

    @property
    def normalized(self) -> bool:
        return bool(self.attrs.get("normalized", False))

    def features(self, start: int = 0, stop: int | None = None, dtype: Any = np.float32) -> np.ndarray:
        """Rows ``start:stop`` as ``dtype`` (float32 by default; None keeps the stored type)."""
        rows = self._h5["features"][start:stop]
        return rows if dtype is None else rows.astype(dtype, copy=False)

    def labels(self) -> np.ndarray:
        return self._h5["labels"][...]

    def indices(self) -> np.ndarray:
        return self._h5["indices"][...]

    def paths(self) -> list[str]:
        return self._h5["paths"].asstr()[...].tolist()

    def close(self) -> None:
        self._h5.close()

    def __enter__(self) -> FeatureBank:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def check_complete(h5: h5py.File, path: Path) -> None:
    fmt = attr_value(h5.attrs.get("format"))
    if fmt != BANK_FORMAT:
        what = "no format attribute" if fmt is None else f"format {fmt!r}"
        raise BankError(f"{path} is not a feature bank ({what}; expected {BANK_FORMAT})")
    missing = [name for name in ("features", "labels", "indices", "paths") if name not in h5]
    if missing:
        raise BankError(f"feature bank {path} is corrupt: missing dataset(s) {', '.join(missing)}")
    rows_done = int(h5.attrs.get("rows_done", 0))
    if not bool(h5.attrs.get("complete", False)):
        total = int(h5.attrs.get("items_total", h5["features"].shape[0]))
        raise BankError(
            f"bank {path} is incomplete ({rows_done} of {total} rows): rerun the export to finish it"
        )
    lengths = {name: int(h5[name].shape[0]) for name in ("features", "labels", "indices", "paths")}
    if any(n != rows_done for n in lengths.values()):
        raise BankError(
            f"feature bank {path} is corrupt: rows_done={rows_done} but dataset lengths {lengths}"
        )
