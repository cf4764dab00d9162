"""Export a frozen encoder's features over a data set into ``bank.h5`` (:mod:`isdretrieve.files.bank`).

An export writes ``out`` in place through a resumable
:class:`~isdretrieve.files.bank_writer.BankWriter`, advancing ``rows_done`` after every flushed batch, and
sets ``complete`` only after the last row is on disk. Shards are contiguous blocks: rank r of w exports
dataset indices ``[r*N//w, (r+1)*N//w)``, so :func:`~isdretrieve.bank.join.join_shards` is a plain
concatenation in rank order. Webdataset data (``wds:PATTERN``) is exported tar shard by tar shard
instead (:mod:`isdretrieve.bank.export_shards`). Features come from
:class:`~isdretrieve.encoder.FrozenEncoder`.
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from isdretrieve.bank.export_shards import export_shards, shard_files, shard_list_change
from isdretrieve.bank.job import (
    DELETE_HINT,
    MAX_SKIPPED_PATHS,
    ExportJob,
    ExportResult,
    check_finite,
    progress_bar,
)
from isdretrieve.data.augment import SMALL_SIDE
from isdretrieve.data.datasets import ArrayDataset, ImageDataset, items_sha256
from isdretrieve.data.open import open_dataset
from isdretrieve.data.shards import ShardDataset, rank_shards
from isdretrieve.data.specs import DataSpec, parse_spec
from isdretrieve.encoder import FrozenEncoder
from isdretrieve.errors import BankError, DataError, InvalidArgument
from isdretrieve.files.bank import BANK_FORMAT, DATASETS, DTYPES, BankAttrs, FeatureBank
from isdretrieve.files.bank_writer import BankWriter
from isdretrieve.files.h5 import attr_value

ON_BAD_IMAGE = ("error", "skip")


def shard_path(out: str | Path, rank: int, world: int) -> Path:
    """Where rank ``rank`` of ``world`` writes under torchrun: ``bank.h5`` -> ``bank.shard0-of-2.h5``."""
    out = Path(out)
    return out.with_name(f"{out.stem}.shard{rank}-of-{world}.h5")


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
    ``wds:`` data is exported and resumed tar shard by tar shard.
    """
    started = time.perf_counter()
    _check_options(dtype, on_bad_image, batch_size)
    out, (rank, world) = _rank_output(Path(out), shard)
    frozen = FrozenEncoder.load(encoder, which=which, device=device, batch_size=batch_size)
    options = dict(dtype=dtype, on_bad_image=on_bad_image, batch_size=batch_size, workers=workers)
    job = _plan(frozen, _open_data(data, frozen), out, rank, world, progress, started, **options)
    expect = _identity_checks(job, rank, world)
    if out.exists() and _check_existing(out, expect, _shard_list(job)):
        with FeatureBank.open(out) as bank:
            rows, skipped = len(bank), bank.skipped
        return job.result(rows, skipped, 0, rows)
    writer = BankWriter.resume(out) if out.exists() else _create(job, rank, world, expect)
    with writer:
        if job.shard_block is not None:
            return export_shards(writer, job)
        return _export_rows(writer, job)


def _check_options(dtype: str, on_bad_image: str, batch_size: int) -> None:
    if dtype not in DTYPES:
        raise InvalidArgument(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    if on_bad_image not in ON_BAD_IMAGE:
        raise InvalidArgument(f"on_bad_image must be one of {', '.join(ON_BAD_IMAGE)}, got {on_bad_image!r}")
    if batch_size < 1:
        raise InvalidArgument(f"batch_size must be positive, got {batch_size}")


def _rank_output(out: Path, shard: tuple[int, int] | None) -> tuple[Path, tuple[int, int]]:
    """This process's (rank, world) and file: ``shard``, else torchrun's environment, else (0, 1)."""
    if shard is None:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world > 1:
            shard = (int(os.environ.get("RANK", "0")), world)
            out = shard_path(out, *shard)
    rank, world = shard or (0, 1)
    if not (world >= 1 and 0 <= rank < world):
        raise InvalidArgument(f"shard must be (rank, world) with 0 <= rank < world, got {shard}")
    return out, (rank, world)


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


def _plan(
    encoder: FrozenEncoder,
    dataset: ImageDataset,
    out: Path,
    rank: int,
    world: int,
    progress: bool,
    started: float,
    **options: Any,
) -> ExportJob:
    """This rank's block of the data set: items ``lo:hi`` (and its tar shards for ``wds:`` data)."""
    n = len(dataset)
    lo, hi, block = rank * n // world, (rank + 1) * n // world, None
    if isinstance(dataset, ShardDataset):
        block = rank_shards(len(dataset.shards), rank, world, contiguous=True)
        if not block:
            raise DataError(f"{len(dataset.shards)} shards cannot be split across {world} processes")
        lo, hi = int(dataset.shard_starts[block[0]]), int(dataset.shard_starts[block[-1] + 1])
    return ExportJob(
        encoder, dataset, out, lo, hi, progress=progress, started=started, shard_block=block, **options
    )


def _identity_checks(job: ExportJob, rank: int, world: int) -> dict[str, Any]:
    """What a bank already at ``out`` must match to be this export (finished, or to resume)."""
    return {
        "fingerprint": job.encoder.fingerprint,
        "data": str(job.dataset.spec),
        "dtype": job.dtype,
        "shard": f"{rank}/{world}",
        "dim": job.encoder.dim,
        "images": job.hi - job.lo,
        "file list sha256": items_sha256(job.dataset, job.lo, job.hi),
    }


def _shard_list(job: ExportJob) -> list[list] | None:
    if job.shard_block is None:
        return None
    assert isinstance(job.dataset, ShardDataset)
    return shard_files(job.dataset, job.shard_block)


def _create(job: ExportJob, rank: int, world: int, expect: dict[str, Any]) -> BankWriter:
    """A new resumable bank at ``out`` for this job."""
    attrs = BankAttrs.identity(
        fingerprint=job.encoder.fingerprint,
        encoder=job.encoder.header,
        transform=job.encoder.transform_name,
        data_spec=str(job.dataset.spec),
        classes=job.dataset.classes,
        normalized=True,
    )
    progress: dict[str, Any] = {"shard": (rank, world), "items_total": job.hi - job.lo}
    progress["items_sha256"] = expect["file list sha256"]
    listed = _shard_list(job)
    if listed is not None:
        progress.update(
            shard_files=tuple(map(tuple, listed)), shards_done=(), shard_sha256=("",) * len(listed)
        )
    attrs = dataclasses.replace(attrs, **progress)
    return BankWriter.create(
        job.out, rows=job.hi - job.lo, dim=job.encoder.dim, dtype=job.dtype, attrs=attrs, resumable=True
    )


def _check_existing(out: Path, expect: dict[str, Any], listed: list[list] | None = None) -> bool:
    """Whether ``out`` holds a complete matching bank (False: a partial one to resume); else BankError."""
    try:
        h5 = h5py.File(out, "r")
    except OSError as exc:
        if "lock" in str(exc).lower():
            raise BankError(f"{out} is locked: is another export still writing it? ({exc})") from None
        raise BankError(f"{out} exists but cannot be opened as an HDF5 file ({exc}); {DELETE_HINT}") from None
    with h5:
        if attr_value(h5.attrs.get("format")) != BANK_FORMAT:
            raise BankError(f"{out} exists and is not a feature bank: {DELETE_HINT}")
        if any(name not in h5 for name in DATASETS):
            raise BankError(f"{out} is a corrupt feature bank (datasets missing): {DELETE_HINT}")
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
    was_listed = None if info.shard_files is None else [list(s) for s in info.shard_files]
    if listed is not None and was_listed is not None and was_listed != listed:
        raise BankError(shard_list_change(out, was_listed, listed))
    diffs = [
        f"{key} {found[key]} (wanted {want})"
        for key, want in expect.items()
        if key in found and found[key] != want
    ]
    if diffs:
        state = "complete" if info.complete else "partial"
        raise BankError(f"{out} holds a {state} bank of another export ({'; '.join(diffs)}): {DELETE_HINT}")
    return info.complete


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
    job: ExportJob, start: int
) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[str] | None]]:
    """(uint8 images, labels, dataset indices, error texts or None) for items start..hi-1, in order."""
    dataset, stop, size = job.dataset, job.hi, job.batch_size
    if isinstance(dataset, ArrayDataset):  # in memory: slice the tensor, no loader
        for a in range(start, stop, size):
            b = min(a + size, stop)
            yield dataset.images[a:b], dataset.labels[a:b], torch.arange(a, b), None
        return
    pin = job.encoder.device.type == "cuda"
    loader = DataLoader(
        _SafeItems(dataset, start, stop),
        batch_size=size,
        shuffle=False,
        num_workers=max(0, job.workers),
        pin_memory=pin,
    )
    for images, labels, indices, errors in loader:
        yield images, labels, indices, list(errors)


def _export_rows(writer: BankWriter, job: ExportJob) -> ExportResult:
    """The row-by-row export loop, from where ``writer``'s bank stopped."""
    info = writer.info
    resumed_from, items, skipped = info.rows_done, info.items_done, info.skipped
    skipped_paths, processed = list(info.skipped_paths), 0
    with progress_bar(job.progress, total=job.hi - job.lo, done=items) as advance, torch.inference_mode():
        for images, labels, indices, errors in _batches(job, job.lo + items):
            keep = np.ones(len(indices), dtype=bool)
            if errors is not None and any(errors):
                bad = [k for k, text in enumerate(errors) if text]
                if job.on_bad_image == "error":
                    raise DataError(errors[bad[0]])
                keep[bad] = False
                skipped += len(bad)
                room = max(0, MAX_SKIPPED_PATHS - len(skipped_paths))
                skipped_paths += [job.dataset.path(int(indices[k])) for k in bad[:room]]
            feats = job.encoder.embed(images)
            check_finite(feats, torch.from_numpy(keep), indices)
            kept = indices.numpy()[keep].astype(np.int64)
            items, processed = items + len(indices), processed + len(indices)
            changes = {} if keep.all() else {"skipped": skipped, "skipped_paths": skipped_paths}
            writer.append(
                feats.numpy()[keep],
                labels.numpy()[keep],
                kept,
                [job.dataset.path(int(i)) for i in kept],
                items_done=items,
                **changes,
            )
            advance(len(indices), job.rate(processed))
    writer.finish()
    return job.result(writer.rows_done, skipped, processed, resumed_from)
