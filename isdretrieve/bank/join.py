"""Join the shard banks of a torchrun export into one bank, in rank order."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from isdretrieve.bank.job import MAX_SKIPPED_PATHS
from isdretrieve.errors import BankError
from isdretrieve.files.bank import BankAttrs, FeatureBank
from isdretrieve.files.bank_writer import BankWriter


def join_shards(shards: Sequence[str | Path], out: str | Path) -> Path:
    """Concatenate the complete shard banks of one export, in rank order, into the bank ``out`` (whole).

    All shards must share fingerprint, data spec, transform, dtype and dimension, and be ranks 0..w-1 of
    the same w; the joined rows are in dataset-index order.
    """
    if not shards:
        raise BankError("join_shards needs at least one shard bank")
    banks: list[FeatureBank] = []
    try:
        for path in shards:
            banks.append(FeatureBank.open(path))
        banks = _in_rank_order(banks)
        return _concatenate(banks, Path(out))
    finally:
        for bank in banks:
            bank.close()


def _in_rank_order(banks: list[FeatureBank]) -> list[FeatureBank]:
    """The shards sorted by rank; BankError unless they are one export's ranks 0..w-1, once each."""
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
    ordered = sorted(banks, key=lambda bank: bank.shard[0])
    index = np.concatenate([bank.indices() for bank in ordered])
    if np.any(np.diff(index) <= 0):
        raise BankError("shard rows overlap or are out of dataset-index order")
    return ordered


def _concatenate(banks: list[FeatureBank], out: Path) -> Path:
    """Write the rows of ``banks`` one after another into ``out``."""
    first = banks[0]
    n = sum(len(bank) for bank in banks)
    skipped_paths = [p for bank in banks for p in bank.skipped_paths]
    items = sum(bank.info.items_total or len(bank) for bank in banks)
    fresh = BankAttrs.identity(fingerprint=first.fingerprint)
    attrs = dataclasses.replace(
        first.info,
        skipped=sum(bank.skipped for bank in banks),
        skipped_paths=tuple(skipped_paths[:MAX_SKIPPED_PATHS]),
        shard=(0, 1),
        created=fresh.created,
        versions=fresh.versions,
        items_done=0,
        items_total=items,
        items_sha256="",
        rows_done=0,
        complete=False,
        shard_files=None,
        shards_done=None,
    )
    with BankWriter.create(out, rows=n, dim=first.dim, dtype=str(first.dtype), attrs=attrs) as writer:
        for bank in banks:
            labels, indices, paths = bank.labels(), bank.indices(), bank.paths()
            for start, x in bank.blocks():
                stop = start + len(x)
                writer.append(x, labels[start:stop], indices[start:stop], paths[start:stop])
        return writer.finish(items_done=items)
