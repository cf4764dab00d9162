"""The ``auto`` index's rule and memory arithmetic: which FAISS index fits a bank of n x dim vectors within
a memory budget, and how many bytes an index of each kind takes.

The factory strings ``auto`` produces (here and in :mod:`isdretrieve.index.planner`), with the search
parameter each is tuned by:

- ``Flat``: exact, no parameter;
- ``HNSW{M}`` and ``HNSW{M},SQ8``: a graph of degree M over raw or 8-bit vectors, ``efSearch``;
- ``IVF{c},Flat``, ``IVF{c},SQ8`` and ``IVF{c},PQ{m}``: c inverted lists of raw vectors, 8-bit vectors or
  m-byte product codes, ``nprobe``;
- ``IVF{c}_HNSW{M},SQ8``: the same with an HNSW graph over the c centroids, ``nprobe``.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass

from isdretrieve.errors import IsdError
from isdretrieve.index.ondisk import ONDISK_CODE, resident_bytes

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


_FACTORY = re.compile(
    r"^(?:(?P<flat>Flat)|HNSW(?P<m>\d+)(?P<hnsw_sq8>,SQ8)?"
    r"|IVF(?P<lists>\d+)(?:_HNSW(?P<qm>\d+))?,(?P<code>Flat|SQ8|PQ(?P<pq>\d+)))$"
)


def hnsw_graph_bytes(n: int, m: int) -> int:
    """Bytes of an HNSW graph of degree ``m`` over ``n`` vectors, without the vectors.

    Level 0 keeps 2·m int32 links per vector; a vector reaches each level above with probability 1/m and
    keeps m links there (m/(m-1) links expected in all); each vector also has its level (int32) and an
    offset into the links (int64).
    """
    return round(n * (4 * (2 * m + m / (m - 1)) + 4 + 8))


def estimate_bytes(factory: str, n: int, dim: int) -> int:
    """Memory of an index ``factory`` (the grammar in this module's docstring) over ``n`` x ``dim`` vectors.

    Codes (4·dim bytes for Flat, dim for SQ8, m for PQm) + 8-byte ids in inverted lists + the coarse
    quantizer (c·dim floats, plus its graph) + HNSW links + trained tables (SQ8 ranges, PQ centroids).
    It matches the size of the written index within a fraction of a percent
    (``tests/test_index.py::test_estimate_matches_written_index``); FAISS lists grown by repeated adds
    may hold spare capacity while building, and an index read from its file does not.
    """
    match = _FACTORY.match(factory)
    if match is None:
        raise ValueError(f"no memory estimate for factory {factory!r}")
    if match["flat"]:
        return n * dim * 4
    if match["m"]:
        sq8 = bool(match["hnsw_sq8"])
        return n * (dim if sq8 else 4 * dim) + (8 * dim if sq8 else 0) + hnsw_graph_bytes(n, int(match["m"]))
    lists, code = int(match["lists"]), match["code"]
    quantizer = lists * dim * 4 + (hnsw_graph_bytes(lists, int(match["qm"])) if match["qm"] else 0)
    per_vector = {"Flat": 4 * dim, "SQ8": dim}.get(code) or int(match["pq"])
    tables = 8 * dim if code == "SQ8" else 256 * dim * 4 if match["pq"] else 0
    return quantizer + n * (per_vector + 8) + lists * 8 + tables


def mib(nbytes: int) -> str:
    return f"{nbytes / 2**20:,.0f} MiB"


def choose_index(n: int, dim: int, *, memory_budget: int | None = None) -> IndexPlan:
    """Pick the index for ``n`` vectors of ``dim`` floats whose memory stays within ``memory_budget`` bytes.

    The rule keeps as much of each vector as the budget allows:

    1. ``Flat`` (exact) when ``n`` <= 1M and the raw vectors (n·dim·4 bytes) fit. At this scale exact
       search is one matrix product per query batch and needs neither training nor tuning.
    2. ``HNSW32`` when ``n`` <= 2M and vectors plus graph links (about n·(4·dim + 272) bytes) fit: the
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
    hnsw = estimate_bytes(f"HNSW{HNSW_M}", n, dim)
    if n <= HNSW_MAX_ROWS and hnsw <= budget:
        return IndexPlan(f"HNSW{HNSW_M}", f"{why_not_flat}; HNSW{HNSW_M} needs {mib(hnsw)}, {within}", hnsw)
    lists = ivf_lists(n)
    codes = ["Flat", "SQ8", *(f"PQ{m}" for m in range(dim // 2, 0, -1) if dim % m == 0)]
    for code in codes:
        factory = f"IVF{lists},{code}"
        need = estimate_bytes(factory, n, dim)
        if need <= budget:
            return IndexPlan(factory, f"{why_not_flat}; {factory} needs {mib(need)}, {within}", need)
    smallest = estimate_bytes(f"IVF{lists},PQ1", n, dim)
    plan = ondisk_plan(
        n, dim, budget, f"{why_not_flat}; no in-RAM index fits (IVF{lists},PQ1 needs {mib(smallest)})"
    )
    if plan is None:
        raise IsdError(f"no index of {n:,} x {dim} vectors fits a memory budget of {mib(budget)}")
    return plan


def ondisk_plan(n: int, dim: int, budget: int, why: str, code: str = ONDISK_CODE) -> IndexPlan | None:
    """The on-disk ``IVF{c},SQ8`` (or ``code``: Flat) for ``n`` x ``dim`` vectors if its resident part fits
    ``budget``, else None; ``why`` (why nothing in RAM will do) starts its reason."""
    lists = ivf_lists(n)
    resident, factory = resident_bytes(lists, dim), f"IVF{lists},{code}"
    if resident > budget:
        return None
    disk = n * ((4 * dim if code == "Flat" else dim) + 8)
    reason = (
        f"{why}: {factory} on disk, {mib(disk)} of lists memory-mapped, {mib(resident)} resident, "
        f"within the {mib(budget)} budget"
    )
    return IndexPlan(factory, reason, resident, on_disk=True, disk_bytes=disk)
