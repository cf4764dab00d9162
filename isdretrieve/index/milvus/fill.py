"""Filling a bank's collection: rows streamed from the bank in blocks, one columnar insert a block, and
resumable.

After Milvus confirms a block, the collection's ``isdretrieve.rows_done`` property moves past it. A
rerun starts after the last confirmed block: the first block it sends is an upsert, which replaces any
rows of an insert that was cut off before it was confirmed (Milvus does not deduplicate primary keys), and
the blocks after it are plain inserts. The block size is kept in ``isdretrieve.block_rows``, so a rerun
cuts the bank at the same rows. A collection made from another bank is refused.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from isdretrieve.files.bank import FeatureBank
from isdretrieve.index.milvus.collection import BLOCK_ROWS, ROWS_DONE, BankCollection
from isdretrieve.index.milvus.connect import Connection, MilvusUnavailable

INSERT_BYTES = 16 << 20  # about this many bytes of vectors a block: well under Milvus's message limits


def block_rows_for(dim: int) -> int:
    """Rows of one insert block for ``dim``-wide float32 rows."""
    return max(1, INSERT_BYTES // (4 * dim))


def open_for_fill(
    conn: Connection, bank: FeatureBank, block_rows: int | None = None
) -> tuple[BankCollection, bool]:
    """(the collection to fill, whether it existed before): created for ``bank``, or an earlier one
    checked to hold this bank (same fields, fingerprint, rows and dimension)."""
    found = BankCollection.find(conn)
    if found is None:
        rows = block_rows or block_rows_for(bank.dim)
        return BankCollection.create(conn, bank, {ROWS_DONE: "0", BLOCK_ROWS: str(rows)}), False
    found.check_fields(bank.dim)
    found.check_holds(bank)
    return found, True


def fill(
    collection: BankCollection, bank: FeatureBank, existed: bool, progress: Callable[[str], None]
) -> int:
    """Insert the bank's rows the collection does not hold yet (see the module docstring); returns how
    many were sent in this run."""
    properties = collection.properties()
    n = len(bank)
    done = int(properties.get(ROWS_DONE, n))
    block = int(properties.get(BLOCK_ROWS, block_rows_for(bank.dim)))
    if done >= n:
        return 0
    labels, indices, paths = bank.labels(), bank.indices(), bank.paths()
    replace = existed  # the block after the last confirmed one may hold rows of a cut-off insert
    for start in range(done, n, block):
        stop = min(start + block, n)
        columns = [
            np.arange(start, stop, dtype=np.int64),
            bank.features(start, stop),
            labels[start:stop].astype(np.int64),
            indices[start:stop].astype(np.int64),
            paths[start:stop],
        ]
        confirmed = collection.insert(columns, replace)
        if confirmed != stop - start:
            raise MilvusUnavailable(
                f"Milvus confirmed {confirmed:,} of the {stop - start:,} rows {start:,}..{stop:,}: "
                "rerun to resume"
            )
        collection.set_properties({ROWS_DONE: str(stop)})
        replace = False
        progress(f"rows {start:,}..{stop:,} of {n:,} inserted")
    collection.flush()
    return n - done
