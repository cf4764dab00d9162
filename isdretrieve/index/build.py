"""Build an index directory over a feature bank: choose the index, fill it, tune it, save it.

The metric is always the inner product; on the L2-normalised rows of a bank that is cosine similarity.
Approximate indices are tuned after building: the search knob (``nprobe`` for IVF, ``efSearch`` for HNSW)
is raised until held-out recall@k (:mod:`isdretrieve.index.recall`) reaches the target, and that recall
is recorded in ``manifest.json`` (the directory's files: :mod:`isdretrieve.files.manifest`).
"""

from __future__ import annotations

import contextlib
import math
import os
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import faiss
import numpy as np

from isdretrieve.bank.arrays import bank_from_array
from isdretrieve.errors import IsdError
from isdretrieve.files.atomic import atomic_path, link_or_copy
from isdretrieve.files.bank import BLOCK_BYTES, FeatureBank
from isdretrieve.files.manifest import (
    BACKEND_FAISS,
    BACKEND_MILVUS,
    BANK_FILE,
    INDEX_FILE,
    KIND_ONDISK,
    KIND_RAM,
    MANIFEST_FILE,
    RECALL_PROTOCOL,
    IndexManifest,
    file_sizes,
    write_manifest,
)
from isdretrieve.index.exact import GPU_MAX_K, cuda_available
from isdretrieve.index.faiss_ops import faiss_message, is_exact, make_index, search_knob, to_gpu
from isdretrieve.index.ondisk import IVFDATA_FILE, build_ondisk, shard_rows_for
from isdretrieve.index.plan import choose_index, default_memory_budget, estimate_bytes
from isdretrieve.index.planner import plan_index
from isdretrieve.index.recall import heldout_recall, heldout_truth, sample_rows
from isdretrieve.index.tuning import raise_knob
from isdretrieve.util.progress import reporter

if TYPE_CHECKING:
    from isdretrieve.index.milvus.connect import MilvusTarget


@dataclass(frozen=True)
class _Choice:
    """The index to build: its factory, why, whether its lists go on disk, the memory budget, the memory
    the index should take, and for ``auto`` the trials that chose it."""

    factory: str
    reason: str
    on_disk: bool
    budget: int
    estimated_bytes: int = 0
    plan: dict = field(default_factory=dict)


@dataclass
class _Outcome:
    """What filling and tuning the index measured, for the manifest."""

    train_rows: int = 0
    shards: int = 0
    build_seconds: float = 0.0
    params: dict[str, int] = field(default_factory=dict)
    recall: float = 1.0
    recall_k: int = 0
    recall_queries: int = 0
    tune_seconds: float = 0.0
    gpu: bool = False
    notes: list[str] = field(default_factory=list)


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
    backend: str = BACKEND_FAISS,
    milvus: MilvusTarget | None = None,
) -> IndexManifest:
    """Build, tune and save an index over ``bank`` (a bank.h5 path, or an [N, D] array) into ``out_dir``.

    ``factory`` is "auto" (the fastest index at ``recall_target`` under ``memory_budget``, measured on a
    sample of the bank by :func:`~isdretrieve.index.planner.plan_index`) or any FAISS factory string;
    ``on_disk`` (or an on-disk plan of "auto") keeps an IVF's lists in ``index.ivfdata``, filled in shards
    of ``shard_rows`` rows (default: what half the budget holds).
    Untrained indices are trained on ``train_size`` rows sampled with ``seed``. Tuning measures held-out
    recall@k on ``queries`` bank rows against exact search and raises nprobe/efSearch until
    ``recall_target`` is met; Flat is exact (recall 1.0). A bank with fewer rows than ``k`` (+1 for the
    held-out queries) lowers k, noted in the manifest. An array is checked (2-D, finite, no zero rows),
    normalised and written as ``out_dir/bank.h5``. Writes ``index.faiss``, places the bank at
    ``out_dir/bank.h5`` (hard link or copy) and writes ``manifest.json`` last.

    ``backend="milvus"`` puts the rows in the collection ``milvus`` names instead of ``index.faiss``
    (:func:`~isdretrieve.index.milvus.build.build_milvus_index`: same plan, same tuning, resumable).
    ``out_dir/bank.h5`` (hard link or copy) and writes ``manifest.json`` last; an index already in
    ``out_dir`` stays whole until then, so a refused input or a failed build leaves it as it was.
    """
    out_dir = Path(out_dir)
    if not 0 < recall_target <= 1 or queries < 1 or k < 1:
        raise IsdError(
            f"need 0 < recall_target <= 1, queries >= 1 and k >= 1, got {recall_target}, {queries} and {k}"
        )
    _check_backend(backend, milvus, on_disk or bool(shard_rows))
    with contextlib.ExitStack() as stack:
        if isinstance(bank, np.ndarray):
            bank = bank_from_array(bank, stack.enter_context(staged_bank(out_dir)))
        bank_path = Path(bank)
        if backend == BACKEND_MILVUS:
            from isdretrieve.index.milvus.build import build_milvus_index

            return build_milvus_index(
                bank_path, out_dir, milvus, factory=factory, recall_target=recall_target, k=k,
                memory_budget=memory_budget, queries=queries, seed=seed, progress=progress,
            )  # fmt: skip
        with FeatureBank.open(bank_path) as opened:
            planning = dict(recall_target=recall_target, k=k, seed=seed)
            choice = _choose(opened, factory, memory_budget, on_disk, progress, planning)
            index = make_index(choice.factory, opened.dim)
            outcome = _Outcome(recall_k=_recall_k(index, choice, len(opened), k))
            if outcome.recall_k < k:
                outcome.notes.append(
                    f"k lowered from {k} to {outcome.recall_k}: the bank has {len(opened):,} rows"
                )
            index = _fill(index, opened, out_dir, choice, outcome, train_size, seed, shard_rows, progress)
            _tune(index, opened, outcome, recall_target, queries, seed, progress)
            fingerprint, count, dim = opened.fingerprint, len(opened), opened.dim
        return _save(
            index, bank_path, out_dir, choice, outcome, recall_target, memory_budget, fingerprint, count, dim
        )


@contextlib.contextmanager
def staged_bank(out_dir: Path) -> Iterator[Path]:
    """A hidden path in ``out_dir`` for a new bank to index: :func:`build_index` places it as
    ``bank.h5`` only when the index is saved, so a bank refused while it is written (or a failed build)
    leaves an index already in the folder untouched. The staged file is removed afterwards (and a folder
    made for it, when nothing else landed there)."""
    made = not out_dir.exists()
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f".{BANK_FILE}.staged-{os.getpid()}"
    try:
        yield path
    finally:
        path.unlink(missing_ok=True)
        if made and not any(out_dir.iterdir()):
            out_dir.rmdir()


def _check_backend(backend: str, milvus: MilvusTarget | None, faiss_only: bool) -> None:
    """IsdError unless ``backend`` is FAISS, or Milvus with a collection to fill and no FAISS options."""
    if backend not in (BACKEND_FAISS, BACKEND_MILVUS):
        raise IsdError(f"backend must be {BACKEND_FAISS} or {BACKEND_MILVUS}, got {backend!r}")
    if backend == BACKEND_MILVUS and milvus is None:
        raise IsdError("a Milvus build needs the collection to fill (a MilvusTarget)")
    if backend == BACKEND_MILVUS and faiss_only:
        raise IsdError("--on-disk and --shard-rows are FAISS options: Milvus keeps its own segments")


def _choose(
    bank: FeatureBank,
    factory: str,
    memory_budget: int | None,
    on_disk: bool,
    progress: bool,
    planning: dict,
) -> _Choice:
    """The factory asked for, or for "auto" the index :func:`plan_index` measures fastest under the budget
    (the rule of :func:`choose_index` when the lists are asked to go on disk).

    ``planning`` holds the build's recall_target, k and seed."""
    budget = default_memory_budget() if memory_budget is None else int(memory_budget)
    if factory != "auto":
        return _Choice(factory, "given", on_disk, budget, _estimate(factory, len(bank), bank.dim, on_disk))
    if on_disk:
        plan, record = choose_index(len(bank), bank.dim, memory_budget=budget), {}
    else:
        measured = plan_index(bank, memory_budget=budget, say=reporter(progress), **planning)
        plan = measured.plan
        record = {
            "seconds": round(measured.seconds, 3),
            "sample_rows": measured.sample_rows,
            "trials": [trial.as_dict() for trial in measured.trials],
        }
    choice = _Choice(plan.factory, plan.reason, on_disk or plan.on_disk, budget, plan.estimated_bytes, record)
    reporter(progress)(f"auto: {choice.factory}{' on disk' if choice.on_disk else ''} ({choice.reason})")
    return choice


def _estimate(factory: str, n: int, dim: int, on_disk: bool) -> int:
    """The memory ``factory`` should take over the bank (0: not a factory ``auto`` produces, or on disk)."""
    try:
        return 0 if on_disk else estimate_bytes(factory, n, dim)
    except ValueError:
        return 0


def _recall_k(index: faiss.Index, choice: _Choice, n: int, k: int) -> int:
    """The k recall is measured at (lowered for a small bank); refuses settings that cannot be built."""
    exact, knob = is_exact(index), search_knob(index)
    if choice.on_disk and (knob is None or knob[0] != "nprobe"):
        raise IsdError(f"an on-disk index must be an IVF (e.g. IVF1024,SQ8), got {choice.factory!r}")
    if exact and choice.on_disk:
        raise IsdError("a Flat index has no inverted lists to keep on disk")
    recall_k = min(k, n) if exact else min(k, n - 1)
    if not exact and recall_k < 1:
        raise IsdError(f"an approximate index needs at least 2 bank rows, the bank has {n}")
    return recall_k


def _fill(
    index: faiss.Index,
    bank: FeatureBank,
    out_dir: Path,
    choice: _Choice,
    outcome: _Outcome,
    train_size: int | None,
    seed: int,
    shard_rows: int | None,
    progress: bool,
) -> faiss.Index:
    """Train the index and add every bank row, in RAM or shard by shard into on-disk lists."""
    started = time.perf_counter()
    if choice.on_disk:
        out_dir.mkdir(parents=True, exist_ok=True)
        index, outcome.train_rows, outcome.shards = build_ondisk(
            index,
            bank,
            out_dir,
            factory=choice.factory,
            train=lambda untrained: _train(untrained, bank, train_size, seed, progress),
            shard_rows=shard_rows or shard_rows_for(index, len(bank), choice.budget),
            read_blocks=bank.blocks,
            progress=reporter(progress),
            settings=dict(
                fingerprint=bank.fingerprint, count=len(bank), dim=bank.dim, seed=seed, train=train_size
            ),
        )
    else:
        outcome.train_rows = _train(index, bank, train_size, seed, progress)
        _add(index, bank, progress)
    outcome.build_seconds = time.perf_counter() - started
    return index


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
    x = bank.take(sample_rows(len(bank), train_size, seed + 1))
    reporter(progress)(f"training on {len(x):,} rows")
    try:
        index.train(x)
    except RuntimeError as exc:
        raise IsdError(f"cannot train the index: {faiss_message(exc)}") from exc
    return len(x)


def _add(index: faiss.Index, bank: FeatureBank, progress: bool) -> None:
    """Add every bank row, block by block (ids are the row numbers)."""
    from rich.console import Console
    from rich.progress import track

    total = math.ceil(len(bank) / max(1, BLOCK_BYTES // (4 * bank.dim)))
    blocks = track(bank.blocks(), "adding", total=total, disable=not progress, console=Console(stderr=True))
    for _, x in blocks:
        index.add(x)


def _tune(
    index: faiss.Index,
    bank: FeatureBank,
    outcome: _Outcome,
    target: float,
    queries: int,
    seed: int,
    progress: bool,
) -> None:
    """Raise the index's search knob until held-out recall@k reaches ``target``, into ``outcome``.

    Searches run on a GPU copy when GPU FAISS is there; the chosen parameters are set on both copies.
    """
    started = time.perf_counter()
    gpu_index = to_gpu(index)
    outcome.gpu = gpu_index is not None or (is_exact(index) and cuda_available())
    if is_exact(index):
        outcome.tune_seconds = time.perf_counter() - started
        return
    k, say = outcome.recall_k, reporter(progress)
    query_rows, xq, truth = heldout_truth(bank, queries, seed, k)  # as SearchIndex.recall(seed=seed)
    searcher = index if gpu_index is None else gpu_index
    outcome.recall_queries = len(xq)
    tuned = raise_knob(
        index,
        lambda: heldout_recall(searcher.search, xq, query_rows, truth),
        target,
        gpu_index=gpu_index,
        max_value=GPU_MAX_K if gpu_index is not None else None,
        report=lambda name, value, recall: say(f"{name}={value}: recall@{k} = {recall:.4f}"),
    )
    outcome.params, outcome.recall = tuned.params, tuned.recall
    if not tuned.reached:
        setting = ", ".join(f"{name}={value}" for name, value in tuned.params.items()) or "the index"
        message = f"{setting} reaches only recall@{k} = {tuned.recall:.4f} < {target}"
        warnings.warn(message, stacklevel=3)
    outcome.tune_seconds = time.perf_counter() - started


def _save(
    index: faiss.Index,
    bank_path: Path,
    out_dir: Path,
    choice: _Choice,
    outcome: _Outcome,
    recall_target: float,
    memory_budget: int | None,
    fingerprint: str,
    count: int,
    dim: int,
) -> IndexManifest:
    """Write ``index.faiss`` (in-RAM kinds), place the bank, and write ``manifest.json`` last."""
    out_dir.mkdir(parents=True, exist_ok=True)
    if not choice.on_disk:
        (out_dir / MANIFEST_FILE).unlink(missing_ok=True)  # unfinished until the new manifest lands
        with atomic_path(out_dir / INDEX_FILE) as tmp:
            faiss.write_index(index, str(tmp))
        (out_dir / IVFDATA_FILE).unlink(missing_ok=True)  # from an earlier on-disk build
    ivfdata_bytes = (out_dir / IVFDATA_FILE).stat().st_size if choice.on_disk else 0
    link_or_copy(bank_path, out_dir / BANK_FILE)
    manifest = IndexManifest(
        factory=choice.factory,
        params=outcome.params,
        bank_fingerprint=fingerprint,
        count=count,
        dim=dim,
        recall_k=outcome.recall_k,
        recall=outcome.recall,
        recall_queries=outcome.recall_queries,
        recall_target=recall_target,
        build_seconds=round(outcome.build_seconds, 3),
        tune_seconds=round(outcome.tune_seconds, 3),
        index_bytes=(out_dir / INDEX_FILE).stat().st_size + ivfdata_bytes,
        gpu=outcome.gpu,
        reason=choice.reason,
        train_rows=outcome.train_rows,
        kind=KIND_ONDISK if choice.on_disk else KIND_RAM,
        memory_budget=memory_budget,
        ivfdata_bytes=ivfdata_bytes,
        shards=outcome.shards,
        recall_protocol="exact" if is_exact(index) else RECALL_PROTOCOL,
        notes=outcome.notes,
        file_bytes=file_sizes(out_dir, BACKEND_FAISS, KIND_ONDISK if choice.on_disk else KIND_RAM),
        estimated_bytes=choice.estimated_bytes,
        plan=choice.plan,
    )
    write_manifest(out_dir, manifest)
    return manifest
