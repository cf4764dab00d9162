"""Feature banks (``bank.h5``): the layout, its typed attributes and the reader, with h5py and NumPy only,
so that searching and evaluating banks need not import torch.
:class:`~isdretrieve.files.bank_writer.BankWriter` is the one writer.

Layout (``format = "isdretrieve.bank/1"``):

| dataset    | shape  | type                                   |
|------------|--------|----------------------------------------|
| `features` | [N, D] | float32 or float16, L2-normalised rows, chunked (about 1 MiB a chunk) |
| `labels`   | [N]    | int64, -1 where unknown                |
| `indices`  | [N]    | int64, the dataset index of each row   |
| `paths`    | [N]    | variable-length UTF-8, the dataset's ``path(i)`` |

Attributes: one typed record, :class:`BankAttrs`, the only code that encodes or decodes them. A bank is
usable once its ``complete`` attribute is set; :meth:`FeatureBank.open` refuses any other.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, fields
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from isdretrieve.errors import BankError, CheckpointError
from isdretrieve.files.encoder_header import EncoderHeader
from isdretrieve.files.h5 import attr_value, open_h5
from isdretrieve.files.versions import package_versions

BANK_FORMAT = "isdretrieve.bank/1"
DATASETS = ("features", "labels", "indices", "paths")
DTYPES = ("float32", "float16")
BLOCK_BYTES = 64 << 20  # rows are read about this many float32 bytes at a time
MAX_LABEL = 1 << 20  # the largest label a bank takes: labels index class names (about a million)


@dataclass(frozen=True)
class BankAttrs:
    """Every attribute of ``bank.h5``, typed: the one place that writes and reads them.

    Identity (written once): ``fingerprint`` (of the encoder, "" for outside features), ``encoder`` (its
    header, None for outside features), ``transform``, ``data_spec``, ``classes``, ``normalized``,
    ``created``, ``versions``. Progress of an export (rewritten as it goes): ``skipped`` and
    ``skipped_paths`` (unreadable images), ``shard`` (rank, world), ``items_done`` / ``items_total``
    (dataset items consumed / in the shard), ``items_sha256`` (over the shard's item names; "" in joined
    banks), ``rows_done``, ``complete``; for ``wds:`` data also ``shard_files`` ([name, bytes, samples]
    per tar), ``shards_done`` (positions in that list) and ``shard_sha256`` (the content digest of each
    finished tar, "" for the others: a resume refuses a finished tar whose content changed). On disk
    lists, tuples, dicts and the header are JSON strings, integers int64.
    """

    fingerprint: str = ""
    encoder: EncoderHeader | None = None
    transform: str = ""
    data_spec: str = ""
    classes: tuple[str, ...] = ()
    normalized: bool = False
    created: str = ""
    versions: dict[str, str] = field(default_factory=dict)
    skipped: int = 0
    skipped_paths: tuple[str, ...] = ()
    shard: tuple[int, int] = (0, 1)
    items_done: int = 0
    items_total: int = 0
    items_sha256: str = ""
    rows_done: int = 0
    complete: bool = False
    shard_files: tuple[tuple[str, int, int], ...] | None = None
    shards_done: tuple[int, ...] | None = None
    shard_sha256: tuple[str, ...] | None = None
    format: str = BANK_FORMAT

    @classmethod
    def identity(
        cls,
        *,
        fingerprint: str,
        encoder: EncoderHeader | dict | None = None,
        transform: str = "",
        data_spec: str = "",
        classes: Sequence[str] = (),
        normalized: bool = True,
    ) -> BankAttrs:
        """The attributes a new bank starts with: who made its rows, from what, when (no progress yet)."""
        if isinstance(encoder, dict):
            encoder = EncoderHeader.from_dict(encoder)
        return cls(
            fingerprint=str(fingerprint),
            encoder=encoder,
            transform=str(transform),
            data_spec=str(data_spec),
            classes=tuple(str(c) for c in classes),
            normalized=bool(normalized),
            created=datetime.now(UTC).isoformat(timespec="seconds"),
            versions=package_versions("torch", "h5py", "numpy"),
        )

    @classmethod
    def read(cls, h5: h5py.File, path: Path) -> BankAttrs:
        """The attributes of an open bank file; BankError naming the attribute that is malformed."""
        raw = {key: attr_value(value) for key, value in h5.attrs.items()}
        values: dict[str, Any] = {}
        for f in fields(cls):
            if f.name not in raw:
                continue
            try:
                values[f.name] = _decode(f.name, raw[f.name])
            except (ValueError, TypeError, IndexError, KeyError, CheckpointError) as exc:
                raise BankError(f"feature bank {path} has a malformed attribute {f.name!r}: {exc}") from None
        return cls(**values)

    def write(self, h5: h5py.File) -> None:
        """Write every attribute (``items_sha256``, ``shard_files`` and ``shards_done`` only when set)."""
        for f in fields(self):
            value = getattr(self, f.name)
            if value is None or (f.name == "items_sha256" and not value):
                continue
            h5.attrs[f.name] = _encode(f.name, value)

    @staticmethod
    def update(h5: h5py.File, **changes: Any) -> None:
        """Rewrite some progress attributes of a bank being exported, encoded as :meth:`write` does."""
        names = {f.name for f in fields(BankAttrs)}
        for name, value in changes.items():
            if name not in names:
                raise KeyError(f"no bank attribute {name!r}")
            h5.attrs.modify(name, _encode(name, value))


_JSON = frozenset(
    {"classes", "versions", "skipped_paths", "shard", "shard_files", "shards_done", "shard_sha256"}
)


def _encode(name: str, value: Any) -> Any:
    if name == "encoder":
        return json.dumps(None if value is None else value.to_dict())
    if name in _JSON:
        return json.dumps(_plain(value))
    if isinstance(value, bool):
        return np.bool_(value)
    if isinstance(value, int):
        return np.int64(value)
    return str(value)


def _plain(value: Any) -> Any:
    """Tuples as lists, recursively, for JSON."""
    if isinstance(value, (tuple, list)):
        return [_plain(v) for v in value]
    return value


def _decode(name: str, value: Any) -> Any:
    if name == "encoder":
        header = json.loads(value)
        return None if header is None else EncoderHeader.from_dict(header)
    if name in _JSON:
        data = json.loads(value)
        if name == "versions":
            return {str(k): str(v) for k, v in dict(data).items()}
        if name == "shard":
            rank, world = data
            return int(rank), int(world)
        if name == "shard_files":
            return tuple((str(n), int(b), int(c)) for n, b, c in data)
        if name == "shards_done":
            return tuple(int(k) for k in data)
        return tuple(str(v) for v in data)
    default = next(f.default for f in fields(BankAttrs) if f.name == name)
    if isinstance(default, bool):
        return bool(value)
    if isinstance(default, int):
        return int(value)
    return str(value)


class FeatureBank:
    """A complete feature bank, opened read-only. Use :meth:`open`; close it (or use ``with``).

    ``info`` holds its attributes (:class:`BankAttrs`); the most used ones are properties too."""

    def __init__(self, path: Path, h5: h5py.File, info: BankAttrs) -> None:
        self.path, self._h5, self.info = path, h5, info
        self._shape = tuple(int(n) for n in h5["features"].shape)  # complete and read-only: fixed

    @property
    def fingerprint(self) -> str:
        return self.info.fingerprint

    @property
    def transform(self) -> str:
        return self.info.transform

    @property
    def data_spec(self) -> str:
        return self.info.data_spec

    @property
    def skipped(self) -> int:
        return self.info.skipped

    @property
    def classes(self) -> list[str]:
        return list(self.info.classes)

    @property
    def skipped_paths(self) -> list[str]:
        return list(self.info.skipped_paths)

    @property
    def shard(self) -> tuple[int, int]:
        return self.info.shard

    @property
    def encoder(self) -> EncoderHeader | None:
        """The encoder's header (architecture, input size, normalisation); None for outside features."""
        return self.info.encoder

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
            return cls(path, h5, check_complete(h5, path))
        except BaseException:
            h5.close()
            raise

    def __len__(self) -> int:
        return self._shape[0]

    def __repr__(self) -> str:
        shape = f"n={len(self)}, dim={self.dim}, dtype={self.dtype}"
        return f"FeatureBank('{self.path}', {shape}, data='{self.data_spec}')"

    @property
    def dim(self) -> int:
        return self._shape[1]

    @property
    def dtype(self) -> np.dtype:
        """Stored feature type (float32 or float16)."""
        return self._h5["features"].dtype

    @property
    def normalized(self) -> bool:
        return self.info.normalized

    def features(self, start: int = 0, stop: int | None = None, dtype: Any = np.float32) -> np.ndarray:
        """Rows ``start:stop`` as ``dtype`` (float32 by default; None keeps the stored type)."""
        rows = self._h5["features"][start:stop]
        return rows if dtype is None else rows.astype(dtype, copy=False)

    def blocks(self, start: int = 0, stop: int | None = None) -> Iterator[tuple[int, np.ndarray]]:
        """(first row, float32 features) of consecutive blocks of rows ``start:stop``, about
        ``BLOCK_BYTES`` each: how every stage streams a bank that need not fit in memory."""
        stop = len(self) if stop is None else stop
        step = max(1, BLOCK_BYTES // (4 * self.dim))
        for first in range(start, stop, step):
            yield first, self.features(first, min(first + step, stop))

    def take(self, rows: np.ndarray) -> np.ndarray:
        """Float32 features of the sorted ``rows``, read block by block."""
        parts = []
        for start, x in self.blocks():
            inside = rows[(rows >= start) & (rows < start + len(x))]
            parts.append(x[inside - start])
        return np.ascontiguousarray(np.concatenate(parts)) if parts else np.zeros((0, self.dim), np.float32)

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


def check_complete(h5: h5py.File, path: Path) -> BankAttrs:
    """The attributes of a complete bank; BankError if ``h5`` is not a bank, is corrupt or incomplete."""
    fmt = attr_value(h5.attrs.get("format"))
    if fmt != BANK_FORMAT:
        what = "no format attribute" if fmt is None else f"format {fmt!r}"
        raise BankError(f"{path} is not a feature bank ({what}; expected {BANK_FORMAT})")
    missing = [name for name in DATASETS if name not in h5]
    if missing:
        raise BankError(f"feature bank {path} is corrupt: missing dataset(s) {', '.join(missing)}")
    info = BankAttrs.read(h5, path)
    if not info.complete:
        total = info.items_total or int(h5["features"].shape[0])
        raise BankError(
            f"bank {path} is incomplete ({info.rows_done} of {total} rows): rerun the export to finish it"
        )
    lengths = {name: int(h5[name].shape[0]) for name in DATASETS}
    if any(n != info.rows_done for n in lengths.values()):
        raise BankError(
            f"feature bank {path} is corrupt: rows_done={info.rows_done} but dataset lengths {lengths}"
        )
    return info
