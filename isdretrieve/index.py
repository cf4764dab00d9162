"""FAISS index over a feature bank: choose, build, tune, save, load, search, and recall against exact search.

An index directory holds three files (four for an on-disk index):

- ``bank.h5``: the feature bank the index was built from (a hard link or a copy of it),
- ``index.faiss``: the FAISS index, whose ids are the bank's row numbers,
- ``index.ivfdata``: (kind "ondisk" only) the inverted lists, memory-mapped (:mod:`isdretrieve.index_ondisk`),
- ``manifest.json``: what was built and how well it does (factory, search parameters, bank fingerprint,
  measured recall@k against exact search, timings, sizes). It is written last, so a directory without
  it is an unfinished build.

The metric is always the inner product; on the L2-normalised rows of a bank that is cosine similarity.
Approximate indices are tuned after building: the search knob (``nprobe`` for IVF, ``efSearch`` for HNSW)
is raised until recall@k on held-out queries reaches the target, and that recall is recorded. The
queries are rows sampled from the bank, each searched for k+1 hits with its own row then dropped from the
hits and from the exact answer: what is measured is how well the index finds a query's *other*
neighbours, which is what a fresh query (one not in the bank) gets.
"""

from __future__ import annotations

import math
import os
import re
import shutil
import sys
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import faiss
import numpy as np

from isdretrieve.atomic import atomic_path
from isdretrieve.bank_file import FeatureBank
from isdretrieve.errors import BankError, IsdError
from isdretrieve.index_manifest import (  # noqa: F401  (re-exported: the manifest is part of this API)
    BANK_FILE,
    INDEX_FILE,
    INDEX_FORMAT,
    KIND_ONDISK,
    KIND_RAM,
    MANIFEST_FILE,
    METRIC,
    RECALL_PROTOCOL,
    IndexManifest,
    check_bank_fingerprint,
    read_manifest,
)
from isdretrieve.knn import drop_self_matches

if TYPE_CHECKING:
    import torch  # imported only on the CUDA paths: searching on a CPU needs FAISS and NumPy alone

FLAT_MAX_ROWS = 1_000_000  # above this, exact search costs too much per query on a CPU
HNSW_MAX_ROWS = 2_000_000  # above this, building an HNSW graph on a CPU takes too long
HNSW_M = 32  # graph degree; level 0 keeps 2*M int32 links per vector
EF_SEARCH = (16, 32, 64, 128, 256, 512, 1024, 2048)
GPU_MAX_K = 2048  # FAISS GPU selection limit for k and nprobe
BLOCK_BYTES = 64 << 20  # bank rows are read about this many float32 bytes at a time
MIN_POINTS_PER_CENTROID = 39  # FAISS k-means warns below this


# ------------------------------------------------------------------------------------------- choice
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


def _mib(nbytes: int) -> str:
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
    within = f"within the {_mib(budget)} budget"
    flat = n * dim * 4
    if n <= FLAT_MAX_ROWS and flat <= budget:
        return IndexPlan("Flat", f"exact search: {n:,} x {dim} float32 ({_mib(flat)}) fits {within}", flat)
    why_not_flat = (
        f"{n:,} rows > {FLAT_MAX_ROWS:,} make exact search slow"
        if n > FLAT_MAX_ROWS
        else f"Flat needs {_mib(flat)}, over the {_mib(budget)} budget"
    )
    hnsw = n * (4 * dim + 2 * HNSW_M * 4)
    if n <= HNSW_MAX_ROWS and hnsw <= budget:
        return IndexPlan(f"HNSW{HNSW_M}", f"{why_not_flat}; HNSW{HNSW_M} needs {_mib(hnsw)}, {within}", hnsw)
    lists = ivf_lists(n)
    centroids = lists * dim * 4
    candidates = [("Flat", 4 * dim), ("SQ8", dim)]
    candidates += [(f"PQ{m}", m) for m in range(dim // 2, 0, -1) if dim % m == 0]
    for code, code_bytes in candidates:
        need = n * (code_bytes + 8) + centroids + (256 * dim * 4 if code.startswith("PQ") else 0)
        if need <= budget:
            factory = f"IVF{lists},{code}"
            return IndexPlan(factory, f"{why_not_flat}; {factory} needs {_mib(need)}, {within}", need)
    from isdretrieve.index_ondisk import ondisk_factory, resident_bytes

    resident, factory = resident_bytes(lists, dim), ondisk_factory(lists)
    if resident <= budget:
        disk = n * (dim + 8)
        reason = (
            f"{why_not_flat}; no in-RAM index fits (IVF{lists},PQ1 needs {_mib(n * 9 + centroids)}): "
            f"{factory} on disk, {_mib(disk)} of lists memory-mapped, {_mib(resident)} resident, {within}"
        )
        return IndexPlan(factory, reason, resident, on_disk=True, disk_bytes=disk)
    raise IsdError(f"no index of {n:,} x {dim} vectors fits a memory budget of {_mib(budget)}")


# ------------------------------------------------------------------------------------- exact search
def cuda_available() -> bool:
    """Whether torch sees a CUDA device; on a Linux machine without an NVIDIA driver, answered without
    importing torch (an import costs a CPU-only ``isd-knn`` about a second and most of its memory)."""
    if "torch" not in sys.modules and sys.platform.startswith("linux"):
        if not any(os.path.exists(p) for p in ("/proc/driver/nvidia", "/dev/nvidiactl", "/dev/dxg")):
            return False
    import torch

    return torch.cuda.is_available()


def faiss_has_gpu() -> bool:
    """True when the installed FAISS has GPU support and sees at least one GPU."""
    return hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0


_gpu_resources: Any = None


def _gpu_res() -> Any:
    global _gpu_resources
    if _gpu_resources is None:
        _gpu_resources = faiss.StandardGpuResources()
    return _gpu_resources


def exact_search_torch(
    bank_features: torch.Tensor, queries: torch.Tensor, k: int, *, chunk: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Exact inner-product top-k with chunked fp32 matmul + ``topk`` on the bank tensor's device.

    ``chunk`` query rows are scored at a time (default: enough for a 2^28-element score block).
    """
    import torch

    bank = bank_features.to(torch.float32)
    queries = queries.to(bank.device, torch.float32)
    chunk = chunk or max(1, (1 << 28) // max(1, bank.shape[0]))
    precision = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")  # no TF32: this is ground truth
    try:
        with torch.no_grad():
            parts = [
                torch.topk(queries[s : s + chunk] @ bank.T, k, dim=1) for s in range(0, len(queries), chunk)
            ]
    finally:
        torch.set_float32_matmul_precision(precision)
    scores = torch.cat([p.values for p in parts]) if parts else torch.zeros(0, k)
    rows = torch.cat([p.indices for p in parts]) if parts else torch.zeros(0, k, dtype=torch.int64)
    return scores.cpu().numpy().astype(np.float32), rows.cpu().numpy().astype(np.int64)


def exact_search(
    bank_features: np.ndarray | torch.Tensor,
    queries: np.ndarray | torch.Tensor,
    k: int,
    *,
    device: str = "auto",
    chunk: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Exact inner-product top-k: (scores [Q,k] float32, rows [Q,k] int64 into ``bank_features``).

    ``device`` "auto" means CUDA when torch sees one. On CUDA: GPU FAISS when installed (and k <= 2048),
    else :func:`exact_search_torch`. On the CPU: FAISS's brute-force ``knn`` (BLAS).
    """
    if not 1 <= k <= len(bank_features):
        raise IsdError(f"k must be between 1 and {len(bank_features)} (the number of bank rows), got {k}")
    cuda = cuda_available() if device == "auto" else str(device).split(":")[0] == "cuda"
    if cuda and not (faiss_has_gpu() and k <= GPU_MAX_K):
        import torch

        return exact_search_torch(
            torch.as_tensor(bank_features, device="cuda"), torch.as_tensor(queries), k, chunk=chunk
        )
    xb, xq = _as_float32(bank_features), _as_float32(queries)
    if cuda:
        scores, rows = faiss.knn_gpu(_gpu_res(), xq, xb, k, metric=faiss.METRIC_INNER_PRODUCT)
    else:
        scores, rows = faiss.knn(xq, xb, k, metric=faiss.METRIC_INNER_PRODUCT)
    return scores.astype(np.float32, copy=False), rows.astype(np.int64, copy=False)


def _as_float32(x: np.ndarray | torch.Tensor) -> np.ndarray:
    torch = sys.modules.get("torch")  # without torch imported, x cannot be a tensor
    if torch is not None and isinstance(x, torch.Tensor):
        x = x.detach().cpu().to(torch.float32).numpy()
    return np.ascontiguousarray(x, dtype=np.float32)


# ----------------------------------------------------------------------------------- bank helpers
def _block_rows(dim: int) -> int:
    return max(1, BLOCK_BYTES // (4 * dim))


def _blocks(bank: FeatureBank) -> Iterator[tuple[int, np.ndarray]]:
    """(first row, float32 features) of consecutive blocks of about 64 MiB."""
    step = _block_rows(bank.dim)
    for start in range(0, len(bank), step):
        yield start, bank.features(start, min(start + step, len(bank)))


def _row_blocks(bank: FeatureBank, start: int, stop: int) -> Iterator[tuple[int, np.ndarray]]:
    """(first row, float32 features) of consecutive blocks of rows ``start:stop``."""
    step = _block_rows(bank.dim)
    for first in range(start, stop, step):
        yield first, bank.features(first, min(first + step, stop))


def _sample_rows(n: int, size: int, seed: int) -> np.ndarray:
    """``size`` distinct sorted row numbers out of ``n``, fixed by ``seed``."""
    return np.sort(np.random.default_rng(seed).choice(n, size=min(size, n), replace=False))


def _read_rows(bank: FeatureBank, rows: np.ndarray) -> np.ndarray:
    """Features of sorted ``rows``, read block by block."""
    parts = []
    for start, x in _blocks(bank):
        inside = rows[(rows >= start) & (rows < start + len(x))]
        parts.append(x[inside - start])
    return np.ascontiguousarray(np.concatenate(parts))


def bank_exact_search(bank: FeatureBank, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-k over the whole bank, one block at a time, keeping the best k seen so far."""
    scores = np.full((len(queries), k), -np.inf, dtype=np.float32)
    rows = np.full((len(queries), k), -1, dtype=np.int64)
    for start, x in _blocks(bank):
        s, r = exact_search(x, queries, min(k, len(x)))
        scores, rows = np.concatenate([scores, s], axis=1), np.concatenate([rows, r + start], axis=1)
        best = np.argsort(-scores, axis=1, kind="stable")[:, :k]
        scores, rows = np.take_along_axis(scores, best, 1), np.take_along_axis(rows, best, 1)
    return scores, rows


def heldout_queries(bank: FeatureBank, count: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(rows, features) of ``count`` bank rows sampled with ``seed``, the held-out recall queries."""
    rows = _sample_rows(len(bank), count, seed)
    return rows, _read_rows(bank, rows)


def heldout_search(
    search: Any, queries: np.ndarray, rows: np.ndarray, k: int
) -> tuple[np.ndarray, np.ndarray]:
    """``search(queries, k + 1)`` with each query's own bank row dropped: the top-k *other* rows."""
    scores, found = search(queries, k + 1)
    return drop_self_matches(scores, found, rows)


def heldout_recall(search: Any, queries: np.ndarray, rows: np.ndarray, truth: np.ndarray) -> float:
    """recall@k of ``search`` on held-out queries against ``truth`` (exact, own rows dropped too)."""
    return recall_at_k(heldout_search(search, queries, rows, truth.shape[1])[1], truth)


def recall_at_k(found: np.ndarray, truth: np.ndarray) -> float:
    """Mean fraction of each query's true top-k rows that appear among its found top-k rows."""
    hits = [len(np.intersect1d(f, t)) for f, t in zip(found, truth, strict=True)]
    return float(np.mean(hits) / truth.shape[1])


# ----------------------------------------------------------------------------------- faiss helpers
def _faiss_message(exc: BaseException) -> str:
    """The useful part of a FAISS C++ error, on one line."""
    text = str(exc).strip()
    match = re.search(r"failed: (.*)", text) or re.search(r"Error: (.*)", text)
    lines = (match.group(1) if match else text).strip().splitlines()
    return lines[0] if lines else type(exc).__name__


def make_index(factory: str, dim: int) -> faiss.Index:
    """``faiss.index_factory`` with the inner-product metric; a bad string is an IsdError."""
    try:
        return faiss.index_factory(dim, factory, faiss.METRIC_INNER_PRODUCT)
    except RuntimeError as exc:
        raise IsdError(f"invalid index factory {factory!r}: {_faiss_message(exc)}") from exc


def _innermost(index: faiss.Index) -> faiss.Index:
    """The index under pre-transforms and refinement wrappers."""
    index = faiss.downcast_index(index)
    while isinstance(index, faiss.IndexPreTransform | faiss.IndexRefine):
        inner = index.index if isinstance(index, faiss.IndexPreTransform) else index.base_index
        index = faiss.downcast_index(inner)
    return index


def _is_exact(index: faiss.Index) -> bool:
    return isinstance(faiss.downcast_index(index), faiss.IndexFlat)


def _search_knob(index: faiss.Index) -> tuple[str, list[int]] | None:
    """The parameter that trades speed for recall, with the values to try, or None."""
    try:
        lists = faiss.extract_index_ivf(index).nlist
    except RuntimeError:
        lists = 0
    if lists:
        return "nprobe", sorted({min(2**i, lists) for i in range(lists.bit_length() + 1)})
    if isinstance(_innermost(index), faiss.IndexHNSW):
        return "efSearch", list(EF_SEARCH)
    return None


def _set_params(index: faiss.Index, params: dict[str, int], gpu: bool) -> None:
    space = faiss.GpuParameterSpace() if gpu else faiss.ParameterSpace()
    for name, value in params.items():
        space.set_index_parameter(index, name, value)


def _to_gpu(index: faiss.Index) -> faiss.Index | None:
    """A GPU copy of a Flat/IVF index when GPU FAISS is usable, else None (HNSW stays on the CPU)."""
    from isdretrieve.index_ondisk import is_ondisk

    if not faiss_has_gpu() or isinstance(_innermost(index), faiss.IndexHNSW) or is_ondisk(index):
        return None
    try:
        return faiss.index_cpu_to_gpu(_gpu_res(), 0, index)
    except RuntimeError:  # a layout the GPU does not support (e.g. some PQ sizes)
        return None


def _read_index(path: Path) -> faiss.Index:
    try:
        return faiss.read_index(str(path))
    except RuntimeError as exc:
        raise IsdError(f"cannot read FAISS index {path}: {_faiss_message(exc)}") from exc


def _place_bank(source: Path, target: Path) -> None:
    """Make ``target`` the bank at ``source``: a hard link where possible, else a copy.

    A link is safe: a complete bank is never written in place (exports only resume incomplete ones).
    """
    if target.exists() and os.path.samefile(source, target):
        return
    with atomic_path(target) as tmp:
        try:
            os.link(source, tmp)
        except OSError:
            shutil.copyfile(source, tmp)


def _say(progress: bool, message: str) -> None:
    if progress:
        from rich.console import Console

        Console(stderr=True).log(message)


# ------------------------------------------------------------------------------------------ build
def _train(index: faiss.Index, bank: FeatureBank, train_size: int | None, seed: int, progress: bool) -> int:
    """Train on min(n, train_size) sampled rows (default max(40·nlist, 50k)); returns the row count."""
    if index.is_trained:
        return 0
    if train_size is None:
        try:
            lists = faiss.extract_index_ivf(index).nlist
        except RuntimeError:
            lists = 0
        train_size = max(40 * lists, 50_000)
    x = _read_rows(bank, _sample_rows(len(bank), train_size, seed + 1))
    _say(progress, f"training on {len(x):,} rows")
    try:
        index.train(x)
    except RuntimeError as exc:
        raise IsdError(f"cannot train the index: {_faiss_message(exc)}") from exc
    return len(x)


def _add(index: faiss.Index, bank: FeatureBank, progress: bool) -> None:
    from rich.console import Console
    from rich.progress import track

    total = math.ceil(len(bank) / _block_rows(bank.dim))
    blocks = track(_blocks(bank), "adding", total=total, disable=not progress, console=Console(stderr=True))
    for _, x in blocks:
        index.add(x)


def _tune(
    index: faiss.Index,
    gpu_index: faiss.Index | None,
    queries: np.ndarray,
    query_rows: np.ndarray,
    truth: np.ndarray,
    target: float,
    progress: bool,
) -> tuple[dict[str, int], float]:
    """Raise the index's search knob until held-out recall@k reaches ``target``; returns (params, recall).

    Searches run on ``gpu_index`` when given; the chosen parameters are set on both copies.
    """
    searcher, k = index if gpu_index is None else gpu_index, truth.shape[1]
    knob = _search_knob(index)
    if knob is None:
        return {}, heldout_recall(searcher.search, queries, query_rows, truth)
    name, values = knob
    if gpu_index is not None:
        values = [v for v in values if v <= GPU_MAX_K]
    for value in values:
        params = {name: value}
        _set_params(index, params, gpu=False)
        if gpu_index is not None:
            _set_params(gpu_index, params, gpu=True)
        recall = heldout_recall(searcher.search, queries, query_rows, truth)
        _say(progress, f"{name}={value}: recall@{k} = {recall:.4f}")
        if recall >= target:
            break
    else:
        warnings.warn(f"{name}={value} reaches only recall@{k} = {recall:.4f} < {target}", stacklevel=3)
    return params, recall


def build_index(
    bank: str | Path | np.ndarray,
    out_dir: str | Path,
    *,
    factory: str = "auto",
    recall_target: float = 0.95,
    k: int = 10,
    memory_budget: int | None = None,
    train_size: int | None = None,
    queries: int = 1000,
    seed: int = 0,
    on_disk: bool = False,
    shard_rows: int | None = None,
    progress: bool = False,
) -> IndexManifest:
    """Build, tune and save an index over ``bank`` (a bank.h5 path, or an [N, D] array) into ``out_dir``.

    ``factory`` is "auto" (:func:`choose_index` under ``memory_budget``) or any FAISS factory string;
    ``on_disk`` (or an on-disk plan of "auto") keeps an IVF's lists in ``index.ivfdata``, filled in shards
    of ``shard_rows`` rows (default: what half the budget holds) and merged (:mod:`index_ondisk`).
    Untrained indices are trained on ``train_size`` rows sampled with ``seed``. Tuning measures held-out
    recall@k on ``queries`` bank rows (own rows dropped, see the module docstring) against exact search
    and raises nprobe/efSearch until ``recall_target`` is met; Flat is exact (recall 1.0). A bank with
    fewer rows than ``k`` (+1 for the held-out queries) lowers k, noted in the manifest.
    An array is checked (2-D, finite, no zero rows), normalised and written as ``out_dir/bank.h5``.
    Writes ``index.faiss``, places the bank at ``out_dir/bank.h5`` (hard link or copy) and writes
    ``manifest.json`` last.
    """
    out_dir = Path(out_dir)
    if not 0 < recall_target <= 1 or queries < 1 or k < 1:
        raise IsdError(
            f"need 0 < recall_target <= 1, queries >= 1 and k >= 1, got {recall_target}, {queries} and {k}"
        )
    if isinstance(bank, np.ndarray):
        from isdretrieve.embeddings_io import bank_from_array

        (out_dir / MANIFEST_FILE).unlink(missing_ok=True)
        bank = bank_from_array(bank, out_dir / BANK_FILE)
    bank_path = Path(bank)
    with FeatureBank.open(bank_path) as bank:
        n, dim, fingerprint = len(bank), bank.dim, bank.fingerprint
        budget = default_memory_budget() if memory_budget is None else int(memory_budget)
        if factory == "auto":
            plan = choose_index(n, dim, memory_budget=budget)
            factory, reason, on_disk = plan.factory, plan.reason, on_disk or plan.on_disk
            _say(progress, f"auto: {factory}{' on disk' if on_disk else ''} ({reason})")
        else:
            reason = "given"
        index = make_index(factory, dim)
        exact = _is_exact(index)
        if on_disk and _search_knob(index) is None or on_disk and _search_knob(index)[0] != "nprobe":
            raise IsdError(f"an on-disk index must be an IVF (e.g. IVF1024,SQ8), got {factory!r}")
        if exact and on_disk:
            raise IsdError("a Flat index has no inverted lists to keep on disk")
        recall_k = min(k, n) if exact else min(k, n - 1)
        if not exact and recall_k < 1:
            raise IsdError(f"an approximate index needs at least 2 bank rows, the bank has {n}")
        notes = [f"k lowered from {k} to {recall_k}: the bank has {n:,} rows"] if recall_k < k else []
        started = time.perf_counter()
        shards = 0
        if on_disk:
            from isdretrieve.index_ondisk import build_ondisk, shard_rows_for

            rows_per_shard = shard_rows or shard_rows_for(index, n, budget)
            out_dir.mkdir(parents=True, exist_ok=True)
            (out_dir / MANIFEST_FILE).unlink(missing_ok=True)  # index.faiss is replaced by the merge
            index, train_rows, shards = build_ondisk(
                index,
                bank,
                out_dir,
                factory=factory,
                train=lambda untrained: _train(untrained, bank, train_size, seed, progress),
                shard_rows=rows_per_shard,
                read_blocks=lambda start, stop: _row_blocks(bank, start, stop),
                progress=lambda message: _say(progress, message),
                settings=dict(fingerprint=fingerprint, count=n, dim=dim, seed=seed, train=train_size),
            )
        else:
            train_rows = _train(index, bank, train_size, seed, progress)
            _add(index, bank, progress)
        build_seconds = time.perf_counter() - started

        started = time.perf_counter()
        gpu_index = _to_gpu(index)
        if exact:
            params, recall, recall_queries = {}, 1.0, 0
        else:
            query_rows, xq = heldout_queries(bank, queries, seed)  # as SearchIndex.recall(seed=seed)
            truth = heldout_search(lambda q, kk: bank_exact_search(bank, q, kk), xq, query_rows, recall_k)[1]
            params, recall = _tune(index, gpu_index, xq, query_rows, truth, recall_target, progress)
            recall_queries = len(xq)
        tune_seconds = time.perf_counter() - started

    out_dir.mkdir(parents=True, exist_ok=True)
    if not on_disk:
        from isdretrieve.index_ondisk import IVFDATA_FILE

        (out_dir / MANIFEST_FILE).unlink(missing_ok=True)  # unfinished until the new manifest lands
        with atomic_path(out_dir / INDEX_FILE) as tmp:
            faiss.write_index(index, str(tmp))
        (out_dir / IVFDATA_FILE).unlink(missing_ok=True)  # from an earlier on-disk build
        ivfdata_bytes = 0
    else:
        from isdretrieve.index_ondisk import IVFDATA_FILE

        ivfdata_bytes = (out_dir / IVFDATA_FILE).stat().st_size
    _place_bank(bank_path, out_dir / BANK_FILE)
    manifest = IndexManifest(
        factory=factory,
        params=params,
        bank_fingerprint=fingerprint,
        count=n,
        dim=dim,
        recall_k=recall_k,
        recall=recall,
        recall_queries=recall_queries,
        recall_target=recall_target,
        build_seconds=round(build_seconds, 3),
        tune_seconds=round(tune_seconds, 3),
        index_bytes=(out_dir / INDEX_FILE).stat().st_size + ivfdata_bytes,
        gpu=gpu_index is not None or (exact and cuda_available()),
        reason=reason,
        train_rows=train_rows,
        kind=KIND_ONDISK if on_disk else KIND_RAM,
        memory_budget=memory_budget,
        ivfdata_bytes=ivfdata_bytes,
        shards=shards,
        recall_protocol="exact" if exact else RECALL_PROTOCOL,
        notes=notes,
    )
    with atomic_path(out_dir / MANIFEST_FILE) as tmp:
        tmp.write_text(manifest.to_json())
    return manifest


# ----------------------------------------------------------------------------------------- search
def clamp_k(k: int, most: int) -> int:
    """``k``, or ``most`` with a warning when k is larger (a bank smaller than the k asked for)."""
    if k > most:
        warnings.warn(f"k={k} lowered to {most}: the bank has too few rows", stacklevel=3)
        return most
    return k


class SearchIndex:
    """A built index directory, opened for search: ``manifest``, ``bank`` and ``search``."""

    def __init__(self, directory: Path, manifest: IndexManifest, index: faiss.Index, bank: FeatureBank):
        self.directory = directory
        self.manifest = manifest
        self.bank = bank
        self._index = index
        self._gpu_index = _to_gpu(index)
        if self._gpu_index is not None:
            _set_params(self._gpu_index, manifest.params, gpu=True)
        self._torch_exact = self._gpu_index is None and _is_exact(index) and cuda_available()
        self._cuda_features: torch.Tensor | None = None

    @classmethod
    def open(cls, index_dir: str | Path) -> SearchIndex:
        """Open ``index_dir``; a bank whose fingerprint differs from the manifest's is a BankError."""
        directory = Path(index_dir)
        manifest = read_manifest(directory)
        bank = FeatureBank.open(directory / BANK_FILE)
        try:
            check_bank_fingerprint(directory, manifest, bank.fingerprint)
            if manifest.kind == KIND_ONDISK:
                from isdretrieve.index_ondisk import read_ondisk

                index = read_ondisk(directory / INDEX_FILE)
            else:
                index = _read_index(directory / INDEX_FILE)
            if not len(bank) == index.ntotal == manifest.count or bank.dim != index.d:
                raise BankError(
                    f"bank {directory / BANK_FILE} has {len(bank):,} x {bank.dim} rows but the index holds "
                    f"{index.ntotal:,} x {index.d}: rebuild the index"
                )
            _set_params(index, manifest.params, gpu=False)
        except BaseException:
            bank.close()
            raise
        return cls(directory, manifest, index, bank)

    def __len__(self) -> int:
        return self.manifest.count

    def search(self, queries: np.ndarray | torch.Tensor, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Top-k bank rows for each query: (scores [Q,k] float32, rows [Q,k] int64).

        Queries ([Q,D] or [D]) are L2-normalised first, so on a normalised bank scores are cosines.
        An approximate index may return fewer than k hits; missing ones have row -1. A k above the
        bank's size is lowered to it, with a warning.
        """
        if k < 1:
            raise IsdError(f"k must be at least 1, got {k}")
        k = clamp_k(k, len(self))
        x = _as_float32(queries)
        x = x[None] if x.ndim == 1 else x
        if x.ndim != 2 or x.shape[1] != self.manifest.dim:
            raise IsdError(f"queries must have shape [Q, {self.manifest.dim}], got {list(x.shape)}")
        x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
        if self._torch_exact:
            import torch

            return exact_search_torch(self._features_on_cuda(), torch.from_numpy(x), k)
        index = self._gpu_index if self._gpu_index is not None and k <= GPU_MAX_K else self._index
        scores, rows = index.search(x, k)
        return scores.astype(np.float32, copy=False), rows.astype(np.int64, copy=False)

    def _features_on_cuda(self) -> torch.Tensor:
        """The bank's features on the GPU (loaded on first use), for Flat search without GPU FAISS."""
        if self._cuda_features is None:
            import torch

            features = torch.empty(len(self), self.manifest.dim, device="cuda")
            for start, x in _blocks(self.bank):
                features[start : start + len(x)] = torch.from_numpy(x)
            self._cuda_features = features
        return self._cuda_features

    def recall(self, k: int = 10, queries: int = 1000, seed: int = 0) -> float:
        """Re-measure held-out recall@k (the build's protocol) on ``queries`` bank rows sampled with ``seed``.

        A k of at least the bank's size is lowered to its size - 1 (the other rows), with a warning.
        """
        if k < 1:
            raise IsdError(f"k must be at least 1, got {k}")
        if len(self) < 2:
            raise IsdError("recall needs at least 2 bank rows (each query's own row is left out)")
        k = clamp_k(k, len(self) - 1)
        rows, xq = heldout_queries(self.bank, queries, seed)
        truth = heldout_search(lambda q, kk: bank_exact_search(self.bank, q, kk), xq, rows, k)[1]
        return heldout_recall(self.search, xq, rows, truth)

    def close(self) -> None:
        self._cuda_features = None
        self.bank.close()

    def __enter__(self) -> SearchIndex:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
