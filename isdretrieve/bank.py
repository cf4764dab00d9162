"""HDF5 feature banks: export a frozen encoder's features over a dataset (resumable, sharded), and read them.

Layout of ``bank.h5`` (``format = "isdretrieve.bank/1"``):

| dataset    | shape  | type                                   |
|------------|--------|----------------------------------------|
| `features` | [N, D] | float32 or float16, L2-normalised rows, chunked (about 1 MiB a chunk) |
| `labels`   | [N]    | int64, -1 where unknown                |
| `indices`  | [N]    | int64, the dataset index of each row   |
| `paths`    | [N]    | variable-length UTF-8, the dataset's ``path(i)`` |

Attributes: one typed record, :class:`~isdretrieve.bank_file.BankAttrs` (the encoder's fingerprint and
header, transform, data SPEC, classes, provenance, and the export's progress: ``rows_done`` /
``complete``, the shard, the items consumed and their file-list hash, skipped images); it is the only
code that writes or reads them. Features come from :class:`~isdretrieve.frozen_encoder.FrozenEncoder`.

An export writes ``out`` in place, flushing and advancing ``rows_done`` after every batch, and sets
``complete`` only after the last row is on disk; :meth:`FeatureBank.open` refuses a bank that is not
complete. Shards are contiguous blocks: rank r of w exports dataset indices ``[r*N//w, (r+1)*N//w)``, so
:func:`join_shards` is a plain concatenation in rank order.

Webdataset data (``wds:PATTERN``) is exported shard by shard instead: rank r of w takes the contiguous
block of tar shards ``[r*S//w, (r+1)*S//w)`` (so joining stays a concatenation). The tar headers give
the sample count up front, so the layout is fixed: a shard's rows start at its first sample's position
and loader workers may finish shards in any order. The bank records ``shard_files`` (JSON ``[name,
bytes, samples]`` of each tar of the block, in order: a resume refuses any other list) and
``shards_done`` (JSON positions in that list, written after the shard's rows are flushed); a rerun
skips finished shards and re-encodes only unfinished ones, from their start. Rows of images skipped by
``on_bad_image="skip"`` are dropped at the end by rewriting the bank (atomically).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from isdretrieve import __version__
from isdretrieve.atomic import atomic_path, fsync_path, names_file
from isdretrieve.bank_file import (  # noqa: F401  (re-exported: reading banks is part of this API)
    BANK_FORMAT,
    BankAttrs,
    FeatureBank,
    attr_value,
    open_h5,
)
from isdretrieve.data import ArrayDataset, ImageDataset, items_sha256, open_dataset
from isdretrieve.data.augment import SMALL_SIDE
from isdretrieve.data.shards import ShardDataset, ShardStream, rank_shards
from isdretrieve.data.specs import DataSpec, parse_spec
from isdretrieve.encoder_header import EncoderHeader
from isdretrieve.errors import BankError, DataError, InvalidArgument
from isdretrieve.frozen_encoder import FrozenEncoder

DTYPES = ("float32", "float16")
ON_BAD_IMAGE = ("error", "skip")
MAX_SKIPPED_PATHS = 1000
_CHUNK_BYTES = 1 << 20
_COPY_ROWS = 1 << 16
_DELETE_HINT = "delete it or choose another --out"


# ------------------------------------------------------------------------------------------ layout
def shard_path(out: str | Path, rank: int, world: int) -> Path:
    """Where rank ``rank`` of ``world`` writes under torchrun: ``bank.h5`` -> ``bank.shard0-of-2.h5``."""
    out = Path(out)
    return out.with_name(f"{out.stem}.shard{rank}-of-{world}.h5")


# ------------------------------------------------------------------------------------- file helpers
def _versions() -> dict[str, str]:
    return {
        "isdretrieve": __version__,
        "torch": torch.__version__,
        "h5py": h5py.__version__,
        "numpy": np.__version__,
    }


@contextlib.contextmanager
def _atomic_h5(path: Path) -> Iterator[h5py.File]:
    """An HDF5 file written as a temp file next to ``path``, fsynced and renamed over it on success."""
    with atomic_path(path) as tmp, h5py.File(tmp, "w") as f:
        yield f


def _create_layout(f: h5py.File, n: int, dim: int, dtype: str) -> None:
    """The four datasets, N rows each, resizable along the rows (an export trims skipped rows at the end)."""
    itemsize = np.dtype(dtype).itemsize
    rows = max(1, min(max(n, 1), _CHUNK_BYTES // (dim * itemsize)))
    flat = max(1, min(max(n, 1), _CHUNK_BYTES // 8))
    f.create_dataset("features", (n, dim), dtype=dtype, maxshape=(None, dim), chunks=(rows, dim))
    f.create_dataset("labels", (n,), dtype=np.int64, maxshape=(None,), chunks=(flat,), fillvalue=-1)
    f.create_dataset("indices", (n,), dtype=np.int64, maxshape=(None,), chunks=(flat,), fillvalue=-1)
    f.create_dataset("paths", (n,), dtype=h5py.string_dtype(), maxshape=(None,), chunks=(min(flat, 4096),))


def _identity(
    *,
    fingerprint: str,
    encoder: EncoderHeader | dict | None,
    transform: str,
    data_spec: str,
    classes: Sequence[str],
    normalized: bool,
) -> BankAttrs:
    """The attributes a new bank starts with (no progress yet)."""
    if isinstance(encoder, dict):
        encoder = EncoderHeader.from_dict(encoder)
    return BankAttrs(
        fingerprint=str(fingerprint),
        encoder=encoder,
        transform=str(transform),
        data_spec=str(data_spec),
        classes=tuple(str(c) for c in classes),
        normalized=bool(normalized),
        created=datetime.now(UTC).isoformat(timespec="seconds"),
        versions=_versions(),
    )


# --------------------------------------------------------------------------------------- writing
def write_bank(
    path: str | Path,
    features: np.ndarray | torch.Tensor,
    *,
    labels: Sequence[int] | np.ndarray | torch.Tensor,
    indices: Sequence[int] | np.ndarray | torch.Tensor | None = None,
    paths: Sequence[str] | None = None,
    fingerprint: str,
    encoder: EncoderHeader | dict | None = None,
    transform: str = "",
    data_spec: str = "",
    classes: Sequence[str] = (),
    dtype: str = "float32",
    normalize: bool = True,
) -> Path:
    """Write a complete bank from in-memory arrays, atomically (temp file, fsync, rename).

    ``indices`` default to ``0..N-1`` and ``paths`` to the indices as strings; rows are L2-normalised in
    float32 before the cast to ``dtype`` unless ``normalize`` is False (then ``normalized`` is False).
    """
    path = Path(path)
    if dtype not in DTYPES:
        raise InvalidArgument(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    feats = torch.as_tensor(features).detach().cpu().float()
    if feats.ndim != 2:
        raise ValueError(f"features must be [N, D], got shape {tuple(feats.shape)}")
    if normalize:
        feats = F.normalize(feats, dim=1)
    n, dim = feats.shape
    label_array = np.asarray(torch.as_tensor(labels).cpu(), dtype=np.int64).reshape(-1)
    index_array = (
        np.arange(n, dtype=np.int64)
        if indices is None
        else np.asarray(torch.as_tensor(indices).cpu(), dtype=np.int64).reshape(-1)
    )
    path_list = [str(int(i)) for i in index_array] if paths is None else [str(p) for p in paths]
    for name, length in (
        ("labels", len(label_array)),
        ("indices", len(index_array)),
        ("paths", len(path_list)),
    ):
        if length != n:
            raise ValueError(f"{name} has {length} entries for {n} feature rows")
    with _atomic_h5(path) as f:
        _create_layout(f, n, dim, dtype)
        f["features"][...] = feats.numpy().astype(dtype, copy=False)
        finish_complete_bank(
            f,
            label_array,
            index_array,
            path_list,
            fingerprint=fingerprint,
            encoder=encoder,
            transform=transform,
            data_spec=data_spec,
            classes=classes,
            normalized=normalize,
        )
    return path


def finish_complete_bank(
    f: h5py.File, labels: np.ndarray, indices: np.ndarray, paths: Sequence[str], **base: Any
) -> None:
    """Write the per-row metadata and the attributes (identity of ``base``, complete) of a bank whose
    features are written (``write_bank``, ``embeddings_io.write_bank_blocks``)."""
    n = len(labels)
    f["labels"][...] = labels
    f["indices"][...] = indices
    f["paths"][...] = np.array(list(paths), dtype=object)
    done = {"items_done": n, "items_total": n, "rows_done": n, "complete": True}
    dataclasses.replace(_identity(**base), **done).write(f)


# --------------------------------------------------------------------------------------- export
@dataclass
class ExportResult:
    path: Path
    rows: int  # rows in the finished bank
    skipped: int  # unreadable images skipped (whole bank)
    seconds: float  # this call
    images_per_s: float  # images processed by this call per second (0 when there was nothing to do)
    resumed_from: int = 0  # rows found already written by an interrupted export


class _SafeItems(Dataset):
    """Items ``start..stop-1`` of a dataset; an unreadable image becomes a zero image and its error text."""

    def __init__(self, dataset: ImageDataset, start: int, stop: int) -> None:
        self.dataset, self.start, self.stop = dataset, start, stop

    def __len__(self) -> int:
        return self.stop - self.start

    def __getitem__(self, k: int) -> tuple[torch.Tensor, int, int, str]:
        i = self.start + int(k)
        try:
            image, label, index = self.dataset[i]
            return image, label, index, ""
        except DataError as exc:
            h, w = self.dataset.image_size
            return torch.zeros((3, h, w), dtype=torch.uint8), int(self.dataset.labels[i]), i, str(exc)


def _batches(
    dataset: ImageDataset, start: int, stop: int, batch_size: int, workers: int, pin: bool
) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[str] | None]]:
    """(uint8 images, labels, dataset indices, error texts or None) for items start..stop-1, in order."""
    if isinstance(dataset, ArrayDataset):  # in memory: slice the tensor, no loader
        for a in range(start, stop, batch_size):
            b = min(a + batch_size, stop)
            yield dataset.images[a:b], dataset.labels[a:b], torch.arange(a, b), None
        return
    loader = DataLoader(
        _SafeItems(dataset, start, stop),
        batch_size=batch_size,
        shuffle=False,
        num_workers=max(0, workers),
        pin_memory=pin,
    )
    for images, labels, indices, errors in loader:
        yield images, labels, indices, list(errors)


def _open_data(data: str | DataSpec | ImageDataset, encoder: FrozenEncoder) -> ImageDataset:
    """The data set; files for an encoder larger than CIFAR's are decoded at its decode side (256 for
    224 px), smaller ones at their own size."""
    if isinstance(data, ImageDataset):
        return data
    spec = parse_spec(data)
    large = encoder.image_size > SMALL_SIDE
    if large and spec.kind in ("folder", "list", "wds") and spec.size is None:
        spec = dataclasses.replace(spec, size=encoder.decode_side)
    return open_dataset(spec)


def _shard_files(dataset: ShardDataset, block: Sequence[int]) -> list[list]:
    """``[name, bytes, samples]`` of each tar of a rank's block: the fingerprint a resume must match."""
    return [[dataset.shards[s].name, dataset.shards[s].nbytes, len(dataset.shards[s])] for s in block]


def _shard_list_change(out: Path, was: list[list], now: list[list]) -> str:
    """One line naming the first difference between the shard lists of a bank and of this export."""
    for k in range(max(len(was), len(now))):
        a = tuple(was[k]) if k < len(was) else None
        b = tuple(now[k]) if k < len(now) else None
        if a != b:
            old = "none" if a is None else f"'{a[0]}' ({a[1]} bytes, {a[2]} samples)"
            new = "none" if b is None else f"'{b[0]}' ({b[1]} bytes, {b[2]} samples)"
            break
    return (
        f"{out} was exported from another shard list ({len(was)} shards, now {len(now)}; shard {k} was "
        f"{old}, now {new}): {_DELETE_HINT}"
    )


def _check_existing(out: Path, expect: dict[str, Any], shard_files: list[list] | None = None) -> bool:
    """Whether ``out`` holds a complete matching bank (False: a partial one to resume); else BankError."""
    try:
        h5 = h5py.File(out, "r")
    except OSError as exc:
        if "lock" in str(exc).lower():
            raise BankError(f"{out} is locked: is another export still writing it? ({exc})") from None
        raise BankError(
            f"{out} exists but cannot be opened as an HDF5 file ({exc}); {_DELETE_HINT}"
        ) from None
    with h5:
        if attr_value(h5.attrs.get("format")) != BANK_FORMAT:
            raise BankError(f"{out} exists and is not a feature bank: {_DELETE_HINT}")
        if any(name not in h5 for name in ("features", "labels", "indices", "paths")):
            raise BankError(f"{out} is a corrupt feature bank (datasets missing): {_DELETE_HINT}")
        info = BankAttrs.read(h5, out)
        found = {
            "fingerprint": info.fingerprint,
            "data": info.data_spec,
            "dtype": str(h5["features"].dtype),
            "shard": f"{info.shard[0]}/{info.shard[1]}",
            "dim": int(h5["features"].shape[1]),
        }
        if "items_total" in h5.attrs:
            found["images"] = info.items_total
        if info.items_sha256:  # not in joined banks
            found["file list sha256"] = info.items_sha256
    was_shards = None if info.shard_files is None else [list(s) for s in info.shard_files]
    if shard_files is not None and was_shards is not None and was_shards != shard_files:
        raise BankError(_shard_list_change(out, was_shards, shard_files))
    diffs = [
        f"{key} {found[key]} (wanted {want})"
        for key, want in expect.items()
        if key in found and found[key] != want
    ]
    if diffs:
        state = "complete" if info.complete else "partial"
        raise BankError(f"{out} holds a {state} bank of another export ({'; '.join(diffs)}): {_DELETE_HINT}")
    return info.complete


def export_bank(
    encoder: str | Path,
    data: str | DataSpec | ImageDataset,
    out: str | Path,
    *,
    which: str = "student",
    dtype: str = "float32",
    batch_size: int = 256,
    device: str = "auto",
    workers: int = 2,
    on_bad_image: str = "error",
    shard: tuple[int, int] | None = None,
    progress: bool = False,
) -> ExportResult:
    """Export the L2-normalised features of ``encoder`` over dataset ``data`` to the bank ``out``.

    Resumable: an incomplete ``out`` of the same encoder, data, dtype and shard is continued from its
    ``rows_done``; a complete matching one is returned as is; anything else at ``out`` is a BankError.
    ``on_bad_image="skip"`` skips (and records) unreadable images instead of raising DataError.
    ``shard=(rank, world)`` exports the contiguous block ``[rank*N//world, (rank+1)*N//world)``; without it,
    torchrun's RANK/WORLD_SIZE (when WORLD_SIZE > 1) pick the block and the file ``shard_path(out, ...)``.
    ``wds:`` data is exported and resumed tar shard by tar shard (see the module docstring).
    """
    started = time.perf_counter()
    if dtype not in DTYPES:
        raise InvalidArgument(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    if on_bad_image not in ON_BAD_IMAGE:
        raise InvalidArgument(f"on_bad_image must be one of {', '.join(ON_BAD_IMAGE)}, got {on_bad_image!r}")
    if batch_size < 1:
        raise InvalidArgument(f"batch_size must be positive, got {batch_size}")
    out = Path(out)
    if shard is None:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world > 1:
            shard = (int(os.environ.get("RANK", "0")), world)
            out = shard_path(out, *shard)
    rank, world = shard or (0, 1)
    if not (world >= 1 and 0 <= rank < world):
        raise InvalidArgument(f"shard must be (rank, world) with 0 <= rank < world, got {shard}")

    frozen = FrozenEncoder.load(encoder, which=which, device=device, batch_size=batch_size)
    dataset = _open_data(data, frozen)
    n = len(dataset)
    lo, hi = rank * n // world, (rank + 1) * n // world
    block, shard_files = None, None
    if isinstance(dataset, ShardDataset):
        block = rank_shards(len(dataset.shards), rank, world, contiguous=True)
        if not block:
            raise DataError(f"{len(dataset.shards)} shards cannot be split across {world} processes")
        lo, hi = int(dataset.shard_starts[block[0]]), int(dataset.shard_starts[block[-1] + 1])
        shard_files = _shard_files(dataset, block)
    dim = frozen.dim
    expect = {
        "fingerprint": frozen.fingerprint,
        "data": str(dataset.spec),
        "dtype": dtype,
        "shard": f"{rank}/{world}",
        "dim": dim,
        "images": hi - lo,
        "file list sha256": items_sha256(dataset, lo, hi),
    }
    if out.exists():
        if _check_existing(out, expect, shard_files):
            with FeatureBank.open(out) as bank:
                rows, skipped = len(bank), bank.skipped
            return ExportResult(out, rows, skipped, time.perf_counter() - started, 0.0, rows)
    else:
        with _atomic_h5(out) as f:
            _create_layout(f, hi - lo, dim, dtype)
            identity = _identity(
                fingerprint=frozen.fingerprint,
                encoder=frozen.header,
                transform=frozen.transform_name,
                data_spec=str(dataset.spec),
                classes=dataset.classes,
                normalized=True,
            )
            progress_attrs: dict[str, Any] = {"shard": (rank, world), "items_total": hi - lo}
            progress_attrs["items_sha256"] = expect["file list sha256"]
            if shard_files is not None:
                progress_attrs.update(shard_files=tuple(map(tuple, shard_files)), shards_done=())
            dataclasses.replace(identity, **progress_attrs).write(f)

    try:
        h5 = h5py.File(out, "r+")
    except OSError as exc:
        raise BankError(f"cannot open {out} for writing (another export writing it?): {exc}") from None
    pin = frozen.device.type == "cuda"
    job = _Job(frozen, dtype, on_bad_image, batch_size, workers, progress, started)
    if block is not None:
        assert isinstance(dataset, ShardDataset)
        return _export_shards(h5, out, dataset, block, lo, job)
    with h5, names_file(out):
        info = BankAttrs.read(h5, out)
        rows, resumed_from, items, skipped = info.rows_done, info.rows_done, info.items_done, info.skipped
        skipped_paths = list(info.skipped_paths)
        processed = 0
        with _progress_bar(progress, total=hi - lo, done=items) as advance, torch.inference_mode():
            batches = _batches(dataset, lo + items, hi, batch_size, workers, pin)
            for images, labels, indices, errors in batches:
                keep = np.ones(len(indices), dtype=bool)
                if errors is not None and any(errors):
                    bad = [k for k, text in enumerate(errors) if text]
                    if on_bad_image == "error":
                        raise DataError(errors[bad[0]])
                    keep[bad] = False
                    skipped += len(bad)
                    room = MAX_SKIPPED_PATHS - len(skipped_paths)
                    skipped_paths += [dataset.path(int(indices[k])) for k in bad[: max(0, room)]]
                feats = frozen.embed(images)
                if not torch.isfinite(feats[torch.from_numpy(keep)]).all():
                    a, b = int(indices[0]), int(indices[-1])
                    raise BankError(f"the encoder produced non-finite features for dataset items {a}..{b}")
                k = int(keep.sum())
                index_array = indices.numpy()[keep].astype(np.int64)
                h5["features"][rows : rows + k] = feats.numpy()[keep].astype(dtype, copy=False)
                h5["labels"][rows : rows + k] = labels.numpy()[keep].astype(np.int64)
                h5["indices"][rows : rows + k] = index_array
                h5["paths"][rows : rows + k] = np.array(
                    [dataset.path(int(i)) for i in index_array], dtype=object
                )
                h5.flush()  # rows first, then the marker that covers them
                rows, items, processed = rows + k, items + len(indices), processed + len(indices)
                BankAttrs.update(h5, rows_done=rows, items_done=items)
                if not keep.all():
                    BankAttrs.update(h5, skipped=skipped, skipped_paths=skipped_paths)
                h5.flush()
                advance(len(indices), processed / max(time.perf_counter() - started, 1e-9))
        for name in ("features", "labels", "indices", "paths"):
            h5[name].resize(rows, axis=0)
        h5.flush()
        fsync_path(out)
        BankAttrs.update(h5, complete=True)
        h5.flush()
    fsync_path(out)
    seconds = time.perf_counter() - started
    return ExportResult(
        out, rows, skipped, seconds, processed / seconds if seconds > 0 else 0.0, resumed_from
    )


@dataclass(frozen=True)
class _Job:
    """What every batch of an export needs."""

    encoder: FrozenEncoder
    dtype: str
    on_bad_image: str
    batch_size: int
    workers: int
    progress: bool
    started: float


def _export_shards(
    h5: h5py.File, out: Path, dataset: ShardDataset, block: list[int], lo: int, job: _Job
) -> ExportResult:
    """The shard-granular export loop (see the module docstring); ``h5`` is the open bank."""
    with h5, names_file(out):
        info = BankAttrs.read(h5, out)
        done, skipped, skipped_paths = set(info.shards_done or ()), info.skipped, list(info.skipped_paths)
        counts = [len(dataset.shards[s]) for s in block]
        finished = sum(counts[k] for k in done)
        todo = [s for k, s in enumerate(block) if k not in done]
        pending: dict[int, list[str]] = {}  # skipped items of shards not finished yet
        processed, total = 0, sum(counts)
        stream = ShardStream(dataset, todo, job.batch_size).loader(
            job.workers, job.encoder.device.type == "cuda"
        )
        with _progress_bar(job.progress, total=total, done=finished) as advance, torch.inference_mode():
            for batch in stream:
                bad = [k for k, text in enumerate(batch.errors) if text]
                if bad and job.on_bad_image == "error":
                    raise DataError(batch.errors[bad[0]])
                pending.setdefault(batch.shard, []).extend(dataset.path(int(batch.indices[k])) for k in bad)
                feats = job.encoder.embed(batch.images)
                keep = torch.ones(len(batch.indices), dtype=torch.bool)
                keep[bad] = False
                if not torch.isfinite(feats[keep]).all():
                    a, b = int(batch.indices[0]), int(batch.indices[-1])
                    raise BankError(f"the encoder produced non-finite features for dataset items {a}..{b}")
                feats[~keep] = 0
                index_array = np.where(keep.numpy(), batch.indices.numpy(), -1).astype(np.int64)
                r0 = int(batch.indices[0]) - lo
                r1 = r0 + len(index_array)
                h5["features"][r0:r1] = feats.numpy().astype(job.dtype, copy=False)
                h5["labels"][r0:r1] = np.where(keep.numpy(), batch.labels.numpy(), -1).astype(np.int64)
                h5["indices"][r0:r1] = index_array
                h5["paths"][r0:r1] = np.array(
                    [dataset.path(int(i)) if i >= 0 else "" for i in index_array], dtype=object
                )
                processed += len(index_array)
                h5.flush()  # every batch, so that a kill leaves consistent HDF5 metadata
                if batch.last:  # the shard's rows are all on disk: mark it done
                    k = block.index(batch.shard)
                    done.add(k)
                    finished += counts[k]
                    lost = pending.pop(batch.shard, [])
                    skipped += len(lost)
                    skipped_paths += lost[: max(0, MAX_SKIPPED_PATHS - len(skipped_paths))]
                    BankAttrs.update(
                        h5,
                        shards_done=sorted(done),
                        rows_done=finished - skipped,
                        items_done=finished,
                        skipped=skipped,
                        skipped_paths=skipped_paths,
                    )
                    h5.flush()
                elapsed = max(time.perf_counter() - job.started, 1e-9)
                advance(len(index_array), processed / elapsed)
        resumed_from = total - sum(len(dataset.shards[s]) for s in todo)
        if skipped == 0:
            fsync_path(out)
            BankAttrs.update(h5, rows_done=total, complete=True)
            h5.flush()
    if skipped:
        _drop_skipped_rows(out)
    fsync_path(out)
    seconds = time.perf_counter() - job.started
    return ExportResult(
        out, total - skipped, skipped, seconds, processed / seconds if seconds > 0 else 0.0, resumed_from
    )


def _drop_skipped_rows(out: Path) -> None:
    """Rewrite a finished shard export without the rows of skipped images (index -1), atomically."""
    with open_h5(out) as src:
        keep = src["indices"][...] >= 0
        n, dim, dtype = int(keep.sum()), int(src["features"].shape[1]), str(src["features"].dtype)
        with _atomic_h5(out) as f:
            _create_layout(f, n, dim, dtype)
            row = 0
            for a in range(0, len(keep), _COPY_ROWS):
                b = min(a + _COPY_ROWS, len(keep))
                mask = keep[a:b]
                k = int(mask.sum())
                for name in ("features", "labels", "indices"):
                    f[name][row : row + k] = src[name][a:b][mask]
                f["paths"][row : row + k] = src["paths"].asstr()[a:b][mask].astype(object)
                row += k
            dataclasses.replace(BankAttrs.read(src, out), rows_done=n, complete=True).write(f)


@contextlib.contextmanager
def _progress_bar(enabled: bool, *, total: int, done: int) -> Iterator[Any]:
    """A rich bar with images/s; yields ``advance(n_images, rate)``."""
    if not enabled:
        yield lambda n, rate: None
        return
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    columns = (
        TextColumn("export"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[rate]} img/s"),
        TimeRemainingColumn(),
    )
    with Progress(*columns, console=Console(stderr=True)) as bar:  # stdout is for results
        task = bar.add_task("export", total=total, completed=done, rate="-")
        yield lambda n, rate: bar.update(task, advance=n, rate=f"{rate:,.0f}")


# ----------------------------------------------------------------------------------------- join
def join_shards(shards: Sequence[str | Path], out: str | Path) -> Path:
    """Concatenate the complete shard banks of one export, in rank order, into the bank ``out`` (atomic).

    All shards must share fingerprint, data spec, transform, dtype and dimension, and be ranks 0..w-1 of
    the same w; the joined rows are in dataset-index order.
    """
    out = Path(out)
    if not shards:
        raise BankError("join_shards needs at least one shard bank")
    banks: list[FeatureBank] = []
    try:
        for path in shards:
            banks.append(FeatureBank.open(path))
        first = banks[0]
        for bank in banks[1:]:
            for what in ("fingerprint", "data_spec", "transform", "dtype", "dim"):
                if getattr(bank, what) != getattr(first, what):
                    raise BankError(
                        f"shard {bank.path} does not match {first.path}: {what} "
                        f"{getattr(bank, what)} vs {getattr(first, what)}"
                    )
        world = first.shard[1]
        ranks = sorted(bank.shard[0] for bank in banks)
        if any(bank.shard[1] != world for bank in banks) or ranks != list(range(world)):
            found = ", ".join(f"{b.shard[0]}/{b.shard[1]}" for b in banks)
            raise BankError(f"shards must be ranks 0..{world - 1} of {world} exactly once, got {found}")
        banks.sort(key=lambda bank: bank.shard[0])
        index = np.concatenate([bank.indices() for bank in banks])
        if np.any(np.diff(index) <= 0):
            raise BankError("shard rows overlap or are out of dataset-index order")
        n, skipped_paths = len(index), [p for bank in banks for p in bank.skipped_paths]
        with _atomic_h5(out) as f:
            _create_layout(f, n, first.dim, str(first.dtype))
            row = 0
            for bank in banks:
                size = len(bank)
                for a in range(0, size, _COPY_ROWS):
                    b = min(a + _COPY_ROWS, size)
                    f["features"][row + a : row + b] = bank.features(a, b, dtype=None)
                f["labels"][row : row + size] = bank.labels()
                f["paths"][row : row + size] = np.array(bank.paths(), dtype=object)
                row += size
            f["indices"][...] = index
            items = sum(bank.info.items_total or len(bank) for bank in banks)
            dataclasses.replace(
                first.info,
                skipped=sum(bank.skipped for bank in banks),
                skipped_paths=tuple(skipped_paths[:MAX_SKIPPED_PATHS]),
                shard=(0, 1),
                created=datetime.now(UTC).isoformat(timespec="seconds"),
                versions=_versions(),
                items_done=items,
                items_total=items,
                items_sha256="",
                rows_done=n,
                complete=True,
                shard_files=None,
                shards_done=None,
            ).write(f)
    finally:
        for bank in banks:
            bank.close()
    return out
