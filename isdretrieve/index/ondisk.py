"""An IVF index whose inverted lists stay on disk: for banks whose index does not fit the RAM budget.

The build never holds the whole index in memory:

1. the coarse quantizer (and the SQ8 code ranges) are trained once on a sample of the bank and saved;
2. the bank is cut into shards of ``shard_rows`` rows; each is added to a copy of the trained index (in
   RAM, one shard at a time) and written to ``ondisk.partial/shard-NNNNN.faiss``;
3. FAISS's ``merge_ondisk`` merges the shards' lists into ``OnDiskInvertedLists`` backed by the file
   ``index.ivfdata``, and ``index.faiss`` (quantizer + list directory, small) is written beside it.

An interrupted build resumes: the trained index and the finished shards are kept in ``ondisk.partial/``
(with the settings they were made with, and each file's size and CRC-32, in ``build.json``:
:mod:`isdretrieve.index.partial_build`) until the merge has landed, and a rerun with the same settings
reuses those that are intact. The index is opened with ``IO_FLAG_ONDISK_SAME_DIR``: the lists are
memory-mapped from the ``index.ivfdata`` next to ``index.faiss``, so the directory can be moved, and the
operating system's page cache, not the process, holds the parts of the lists that queries touch.

Codes are SQ8 (one byte per dimension): on unit vectors its recall is close to uncompressed vectors
(``indices/README.md``), and a query that probes cold lists reads a quarter of the bytes Flat codes would.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import faiss
import numpy as np
from faiss.contrib.ondisk import merge_ondisk

from isdretrieve.errors import DamagedFile, IsdError
from isdretrieve.files.atomic import atomic_path, fsync_path
from isdretrieve.files.bank import FeatureBank
from isdretrieve.files.manifest import IVFDATA_FILE, MANIFEST_FILE, check_size
from isdretrieve.index.partial_build import PartialBuild

ONDISK_CODE = "SQ8"
LIST_OVERHEAD_BYTES = 24  # per list, OnDiskInvertedLists keeps (size, capacity, offset) in memory
MIN_SHARD_ROWS = 10_000


def ondisk_factory(lists: int) -> str:
    """The factory string of the on-disk index with ``lists`` inverted lists."""
    return f"IVF{lists},{ONDISK_CODE}"


def resident_bytes(lists: int, dim: int) -> int:
    """Memory an opened on-disk index keeps in the process: the centroids and the list directory."""
    return lists * (dim * 4 + LIST_OVERHEAD_BYTES)


def code_bytes(index: faiss.Index) -> int:
    """Bytes a vector takes in the inverted lists: its code plus its 8-byte id."""
    return int(faiss.extract_index_ivf(index).code_size) + 8


def shard_rows_for(index: faiss.Index, n: int, memory_budget: int) -> int:
    """Rows of one shard: half of what the budget leaves after the centroids, at least 10,000."""
    ivf = faiss.extract_index_ivf(index)
    free = memory_budget - resident_bytes(ivf.nlist, ivf.d)
    return int(min(n, max(MIN_SHARD_ROWS, free // 2 // code_bytes(index))))


@contextlib.contextmanager
def _quiet_faiss() -> Iterator[None]:
    """Silence FAISS's C-level progress lines ("resizing ...", "updating ondisk filename ...")."""
    sys.stdout.flush()
    try:
        saved = os.dup(1)
    except OSError:
        yield
        return
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 1)
            yield
    finally:
        os.dup2(saved, 1)
        os.close(saved)


def is_ondisk(index: faiss.Index) -> bool:
    """True when ``index`` is an IVF whose inverted lists are ``OnDiskInvertedLists``."""
    try:
        ivf = faiss.extract_index_ivf(index)
    except RuntimeError:
        return False
    return isinstance(faiss.downcast_InvertedLists(ivf.invlists), faiss.OnDiskInvertedLists)


def read_ondisk(path: Path) -> faiss.Index:
    """Open ``index.faiss`` with its lists memory-mapped, read-only, from ``index.ivfdata`` beside it.

    Callers check the file's size against the manifest first (:class:`ListsFile`); this also refuses
    lists that reach past the file's end, which FAISS would map and fault on (SIGBUS) at the first
    search."""
    data = path.parent / IVFDATA_FILE
    if not data.is_file():
        raise DamagedFile(f"{path.parent} is not a finished index directory: {IVFDATA_FILE} is missing")
    try:
        with _quiet_faiss():
            index = faiss.read_index(str(path), faiss.IO_FLAG_ONDISK_SAME_DIR | faiss.IO_FLAG_READ_ONLY)
    except RuntimeError as exc:
        raise IsdError(f"cannot read on-disk index {path}: {str(exc).strip().splitlines()[-1]}") from exc
    lists = faiss.downcast_InvertedLists(faiss.extract_index_ivf(index).invlists)
    # FAISS's list prefetch threads read the mapping on their own after a search has returned: a file
    # truncated then would end the process (SIGBUS) though every search checks the file first
    lists.prefetch_nthread = 0
    size = data.stat().st_size
    if lists.totsize > size:
        raise DamagedFile(
            f"{data} is damaged (truncated: {size:,} bytes, its lists need {lists.totsize:,}): "
            "rebuild the index"
        )
    return index


class ListsFile:
    """``index.ivfdata`` held open while its lists are mapped, with the size the manifest recorded.

    :meth:`check` compares the open file's size (``fstat``, no path lookup) with it: before the file is
    mapped, and before every search, so a file truncated under a running service is refused with a
    :class:`~isdretrieve.errors.DamagedFile` rather than read past its end (SIGBUS, the whole process).
    """

    def __init__(self, path: Path, expected: int) -> None:
        self.path, self.expected = path, expected
        self._fd = os.open(path, os.O_RDONLY)
        try:
            self.check()
        except BaseException:
            self.close()
            raise

    def check(self) -> None:
        check_size(self.path, self.expected, os.fstat(self._fd).st_size)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


def _write_index(index: faiss.Index, path: Path) -> None:
    with atomic_path(path) as tmp:
        faiss.write_index(index, str(tmp))


def build_ondisk(
    index: faiss.Index,
    bank: FeatureBank,
    out_dir: Path,
    *,
    factory: str,
    train: Callable[[faiss.Index], int],
    shard_rows: int,
    read_blocks: Callable[[int, int], Iterator[tuple[int, np.ndarray]]],
    progress: Callable[[str], None],
    settings: dict,
) -> tuple[faiss.Index, int, int]:
    """Train ``index`` (via ``train``), fill it shard by shard, merge into ``out_dir/index.ivfdata``.

    ``train(index) -> rows`` trains an untrained index; ``read_blocks(start, stop)`` yields the bank's
    rows ``start:stop`` in blocks; ``progress(message)`` reports. Writes ``index.faiss`` and
    ``index.ivfdata`` into ``out_dir`` and returns (the index opened on disk, training rows, shards).
    """
    n = len(bank)
    partial = PartialBuild(out_dir, {"factory": factory, "shard_rows": shard_rows, **settings})
    trained_path = partial.path("trained.faiss")
    if partial.intact(trained_path.name):
        train_rows = int(partial.state.get("train_rows", 0))
    else:
        partial.discard_files()
        train_rows = train(index)
        _write_index(index, trained_path)
        partial.record(trained_path.name, train_rows=train_rows)
    trained = faiss.read_index(str(trained_path))
    bounds = [(start, min(start + shard_rows, n)) for start in range(0, n, shard_rows)]
    shard_paths = [partial.path(f"shard-{s:05d}.faiss") for s in range(len(bounds))]
    for s, ((start, stop), path) in enumerate(zip(bounds, shard_paths, strict=True)):
        if partial.intact(path.name):
            continue
        progress(f"shard {s + 1}/{len(bounds)}: rows {start:,}..{stop:,}")
        shard = faiss.clone_index(trained)
        for first, x in read_blocks(start, stop):
            shard.add_with_ids(x, np.arange(first, first + len(x), dtype=np.int64))
        _write_index(shard, path)
        partial.record(path.name)
        del shard
    progress(f"merging {len(bounds)} shards into {IVFDATA_FILE}")
    merged = faiss.read_index(str(trained_path))
    tmp_data = out_dir / f".{IVFDATA_FILE}.tmp-{os.getpid()}"
    tmp_data.unlink(missing_ok=True)
    try:
        with _quiet_faiss():
            merge_ondisk(merged, [str(p) for p in shard_paths], str(tmp_data))
        lists = faiss.downcast_InvertedLists(faiss.extract_index_ivf(merged).invlists)
        lists.filename = IVFDATA_FILE  # opened with IO_FLAG_ONDISK_SAME_DIR: found beside index.faiss
        fsync_path(tmp_data)
        _write_index(merged, out_dir / f".{IVFDATA_FILE}.index")
        del lists, merged
        (out_dir / MANIFEST_FILE).unlink(missing_ok=True)  # unfinished from here until the new manifest
        os.replace(tmp_data, out_dir / IVFDATA_FILE)
        os.replace(out_dir / f".{IVFDATA_FILE}.index", out_dir / "index.faiss")
        fsync_path(out_dir)
    except BaseException:
        tmp_data.unlink(missing_ok=True)
        (out_dir / f".{IVFDATA_FILE}.index").unlink(missing_ok=True)
        raise
    partial.remove()
    return read_ondisk(out_dir / "index.faiss"), train_rows, len(bounds)


def load_in_ram(index: faiss.Index) -> faiss.Index:
    """Read the lists of an on-disk IVF ``index`` into memory (``ArrayInvertedLists``), in place."""
    ivf = faiss.extract_index_ivf(index)
    lists = ivf.invlists
    in_ram = faiss.ArrayInvertedLists(ivf.nlist, ivf.code_size)
    for number in range(ivf.nlist):
        size = lists.list_size(number)
        if size:
            in_ram.add_entries(number, size, lists.get_ids(number), lists.get_codes(number))
    ivf.replace_invlists(in_ram, True)
    in_ram.this.disown()
    return index
