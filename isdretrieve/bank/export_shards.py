"""The export of webdataset data (``wds:PATTERN``), tar shard by tar shard.

Rank r of w takes the contiguous block of tar shards ``[r*S//w, (r+1)*S//w)`` (so joining stays a
concatenation). The tar headers give the sample count up front, so the layout is fixed: a shard's rows
start at its first sample's position and loader workers may finish shards in any order. The bank records
``shard_files`` (``[name, bytes, samples]`` of each tar of the block, in order: a resume refuses any
other list), ``shards_done`` (positions in that list, written after the shard's rows are flushed) and
``shard_sha256`` (each finished tar's content digest, SHA-256 over its index and image bytes, computed as
the stream reads them: no extra pass). A rerun first re-reads each finished tar (bytes only, no decoding)
and refuses one whose digest changed, then re-encodes only the unfinished ones, from their start. A
partial bank from before the digests starts over (its finished tars cannot be checked). Rows of images
skipped by ``on_bad_image="skip"`` are dropped at the end by rewriting the bank whole.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from isdretrieve.bank.job import (
    DELETE_HINT,
    MAX_SKIPPED_PATHS,
    ExportJob,
    ExportResult,
    check_finite,
    progress_bar,
)
from isdretrieve.data.shards import ShardBatch, ShardDataset, ShardStream, shard_sha256
from isdretrieve.errors import BankError, DataError
from isdretrieve.files.bank import BankAttrs
from isdretrieve.files.bank_writer import BankWriter
from isdretrieve.files.h5 import open_h5

COPY_ROWS = 1 << 16  # rows copied at a time when skipped rows are dropped


def shard_files(dataset: ShardDataset, block: Sequence[int]) -> list[list]:
    """``[name, bytes, samples]`` of each tar of a rank's block: the fingerprint a resume must match."""
    return [[dataset.shards[s].name, dataset.shards[s].nbytes, len(dataset.shards[s])] for s in block]


def shard_list_change(out: Path, was: list[list], now: list[list]) -> str:
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
        f"{old}, now {new}): {DELETE_HINT}"
    )


@dataclasses.dataclass
class _Progress:
    """Which of the block's shards are finished, and the images skipped so far."""

    done: set[int]
    skipped: int
    skipped_paths: list[str]
    digests: list[str]  # per position in the block: the finished tar's content digest, or ""
    pending: dict[int, list[str]] = dataclasses.field(default_factory=dict)  # skipped, shard unfinished


def export_shards(writer: BankWriter, job: ExportJob) -> ExportResult:
    """Export the job's tar shards that ``writer``'s bank has not finished, then finish the bank."""
    dataset, block = job.dataset, job.shard_block
    assert isinstance(dataset, ShardDataset) and block is not None
    state = _verified_progress(writer, job)
    counts = [len(dataset.shards[s]) for s in block]
    total, finished = sum(counts), sum(counts[k] for k in state.done)
    todo = [s for k, s in enumerate(block) if k not in state.done]
    resumed_from, processed = total - sum(len(dataset.shards[s]) for s in todo), 0
    stream = ShardStream(dataset, todo, job.batch_size).loader(job.workers, job.encoder.device.type == "cuda")
    with progress_bar(job.progress, total=total, done=finished) as advance, torch.inference_mode():
        for batch in stream:
            _write_batch(writer, job, batch, state)
            processed += len(batch.indices)
            if batch.last:  # the shard's rows are all on disk: mark it done
                finished += counts[block.index(batch.shard)]
                _finish_shard(writer, block, batch.shard, batch.sha256, finished, state)
            advance(len(batch.indices), job.rate(processed))
    if state.skipped == 0:
        writer.finish(rows=total)
    else:
        writer.close()
        _drop_skipped_rows(job.out)
    return job.result(total - state.skipped, state.skipped, processed, resumed_from)


def _verified_progress(writer: BankWriter, job: ExportJob) -> _Progress:
    """The bank's progress, its finished tars checked against their recorded content digests (a changed
    one is a BankError before anything is written); a bank without digests starts over."""
    info, block = writer.info, job.shard_block
    assert isinstance(job.dataset, ShardDataset) and block is not None
    if info.shard_sha256 is None:
        return _Progress(set(), 0, [], [""] * len(block))
    digests = list(info.shard_sha256)
    done = set(info.shards_done or ())
    for k in sorted(done):
        now = shard_sha256(job.dataset, block[k])
        if now != digests[k]:
            name = job.dataset.shards[block[k]].name
            raise BankError(
                f"{job.out}: finished shard {k} ('{name}') changed since it was exported (content sha256 "
                f"{digests[k][:12]}..., now {now[:12]}...): {DELETE_HINT}"
            )
    return _Progress(done, info.skipped, list(info.skipped_paths), digests)


def _write_batch(writer: BankWriter, job: ExportJob, batch: ShardBatch, state: _Progress) -> None:
    """Embed one batch and write its rows at their fixed positions (skipped images as index -1)."""
    bad = [k for k, text in enumerate(batch.errors) if text]
    if bad and job.on_bad_image == "error":
        raise DataError(batch.errors[bad[0]])
    state.pending.setdefault(batch.shard, []).extend(job.dataset.path(int(batch.indices[k])) for k in bad)
    feats = job.encoder.embed(batch.images)
    keep = torch.ones(len(batch.indices), dtype=torch.bool)
    keep[bad] = False
    check_finite(feats, keep, batch.indices)
    feats[~keep] = 0
    indices = np.where(keep.numpy(), batch.indices.numpy(), -1).astype(np.int64)
    labels = np.where(keep.numpy(), batch.labels.numpy(), -1).astype(np.int64)
    paths = [job.dataset.path(int(i)) if i >= 0 else "" for i in indices]
    writer.put(int(batch.indices[0]) - job.lo, feats.numpy(), labels, indices, paths)


def _finish_shard(
    writer: BankWriter, block: list[int], shard: int, digest: str, finished: int, state: _Progress
) -> None:
    """Record shard ``shard`` as done, with the images it skipped."""
    state.done.add(block.index(shard))
    state.digests[block.index(shard)] = digest
    lost = state.pending.pop(shard, [])
    state.skipped += len(lost)
    state.skipped_paths += lost[: max(0, MAX_SKIPPED_PATHS - len(state.skipped_paths))]
    writer.mark(
        shards_done=sorted(state.done),
        shard_sha256=state.digests,
        rows_done=finished - state.skipped,
        items_done=finished,
        skipped=state.skipped,
        skipped_paths=state.skipped_paths,
    )


def _drop_skipped_rows(out: Path) -> None:
    """Rewrite a finished shard export without the rows of skipped images (index -1), whole."""
    with open_h5(out) as src:
        keep = src["indices"][...] >= 0
        n, dim, dtype = int(keep.sum()), int(src["features"].shape[1]), str(src["features"].dtype)
        attrs = dataclasses.replace(BankAttrs.read(src, out), rows_done=0, complete=False)
        with BankWriter.create(out, rows=n, dim=dim, dtype=dtype, attrs=attrs) as writer:
            for a in range(0, len(keep), COPY_ROWS):
                b = min(a + COPY_ROWS, len(keep))
                mask = keep[a:b]
                columns = [src[name][a:b][mask] for name in ("features", "labels", "indices")]
                writer.append(*columns, src["paths"].asstr()[a:b][mask].tolist())
            writer.finish()
