"""The ``auto`` index: which FAISS index fits a bank of n x dim vectors within a memory budget, and why."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

from isdretrieve.errors import IsdError
from isdretrieve.index.ondisk import ondisk_factory, resident_bytes

FLAT_MAX_ROWS = 1_000_000  # above this, exact search costs too much per query on a CPU
HNSW_MAX_ROWS = 2_000_000  # above this, building an HNSW graph on a CPU takes too long
HNSW_M = 32  # graph degree; level 0 keeps 2*M int32 links per vector
MIN_POINTS_PER_CENTROID = 39  # FAISS k-means warns below this


@dataclass(frozen=True)
class IndexPlan:
    """A FAISS factory string, why it was chosen, and the memory it should take."""

    factory: str
    reason: str
    estimated_bytes: int  # memory the index takes in the process
    on_disk: bool = False  # inverted lists in index.ivfdata, memory-mapped
    disk_bytes: int = 0  # size of index.ivfdata (on-disk plans)


def default_memory_budget() -> int:
    """Half of the machine's physical memory, in bytes."""
    return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") // 2


def ivf_lists(n: int) -> int:
    """Number of IVF lists for ``n`` vectors: 4·sqrt(n) rounded to a power of two, clamped to 256..65536.

    About 4·sqrt(n) lists balances the cost of scanning the centroids against the cost of scanning the
    lists. The count is lowered further when ``n`` is too small to give k-means 39 points per centroid.
    """
    lists = 2 ** round(math.log2(4 * math.sqrt(n)))
    lists = min(max(lists, 256), 65_536)
    enough_points = 2 ** int(math.log2(max(n // MIN_POINTS_PER_CENTROID, 1)))
    return min(lists, enough_points)


def mib(nbytes: int) -> str:
    return f"{nbytes / 2**20:,.0f} MiB"


def choose_index(n: int, dim: int, *, memory_budget: int | None = None) -> IndexPlan:
    """Pick the index for ``n`` vectors of ``dim`` floats whose memory stays within ``memory_budget`` bytes.

    The rule keeps as much of each vector as the budget allows:

    1. ``Flat`` (exact) when ``n`` <= 1M and the raw vectors (n·dim·4 bytes) fit. At this scale exact
       search is one matrix product per query batch and needs neither training nor tuning.
    2. ``HNSW32`` when ``n`` <= 2M and vectors plus graph links (about n·(4·dim + 256) bytes) fit: the
       fastest queries at high recall on a CPU, but slow to build beyond a couple of million vectors.
    3. ``IVF{c},Flat`` when the raw vectors plus 8-byte ids in inverted lists fit (only possible above 1M
       rows, where Flat is ruled out by speed rather than memory): recall limited only by ``nprobe``.
    4. ``IVF{c},SQ8``: one byte per dimension. On unit vectors 8-bit scalar quantisation loses little, so
       this keeps recall high at a quarter of the memory.
    5. ``IVF{c},PQ{m}``: ``m`` bytes per vector, ``m`` the largest divisor of ``dim`` with m <= dim/2 that
       fits. Residuals to the IVF centroid are product-quantised, which is what makes it accurate enough.
    6. ``IVF{c},SQ8`` on disk (``on_disk=True``): when nothing fits in RAM, the inverted lists go to
       ``index.ivfdata`` (memory-mapped) and only the centroids and the list directory stay resident.

    ``c`` comes from :func:`ivf_lists`. The default budget is half the physical memory. Raises
    :class:`IsdError` if not even the on-disk index's centroids fit.
    """
    if n <= 0 or dim <= 0:
        raise ValueError(f"n and dim must be positive, got n={n}, dim={dim}")
    budget = default_memory_budget() if memory_budget is None else int(memory_budget)
    within = f"within the {mib(budget)} budget"
    flat = n * dim * 4
    if n <= FLAT_MAX_ROWS and flat <= budget:
        return IndexPlan("Flat", f"exact search: {n:,} x {dim} float32 ({mib(flat)}) fits {within}", flat)
    why_not_flat = (
        f"{n:,} rows > {FLAT_MAX_ROWS:,} make exact search slow"
        if n > FLAT_MAX_ROWS
        else f"Flat needs {mib(flat)}, over the {mib(budget)} budget"
    )
    hnsw = n * (4 * dim + 2 * HNSW_M * 4)
    if n <= HNSW_MAX_ROWS and hnsw <= budget:
        return IndexPlan(f"HNSW{HNSW_M}", f"{why_not_flat}; HNSW{HNSW_M} needs {mib(hnsw)}, {within}", hnsw)
    lists = ivf_lists(n)
    centroids = lists * dim * 4
    candidates = [("Flat", 4 * dim), ("SQ8", dim)]
    candidates += [(f"PQ{m}", m) for m in range(dim // 2, 0, -1) if dim % m == 0]
    for code, code_bytes in candidates:
        need = n * (code_bytes + 8) + centroids + (256 * dim * 4 if code.startswith("PQ") else 0)
        if need <= budget:
            factory = f"IVF{lists},{code}"
            return IndexPlan(factory, f"{why_not_flat}; {factory} needs {mib(need)}, {within}", need)
    resident, factory = resident_bytes(lists, dim), ondisk_factory(lists)
    if resident <= budget:
        disk = n * (dim + 8)
        reason = (
            f"{why_not_flat}; no in-RAM index fits (IVF{lists},PQ1 needs {mib(n * 9 + centroids)}): "
            f"{factory} on disk, {mib(disk)} of lists memory-mapped, {mib(resident)} resident, {within}"
        )
        return IndexPlan(factory, reason, resident, on_disk=True, disk_bytes=disk)
    raise IsdError(f"no index of {n:,} x {dim} vectors fits a memory budget of {mib(budget)}")
