"""Index directories over Milvus collections: build one (fill the collection from the bank, resumably),
or attach one to a collection filled elsewhere (a Milvus bulk import of ``isd-index export --format
parquet``). Either way the index kind and size come from the same planner as FAISS
(:func:`~isdretrieve.index.plan.choose_index` through :func:`~isdretrieve.index.milvus.params.milvus_index`),
the search knob (nprobe, ef) is tuned on held-out queries searched through Milvus
(:mod:`isdretrieve.index.recall`), and ``manifest.json`` records the backend, the URI without secrets,
the collection, the index and the recall measured.
"""

from __future__ import annotations

import re
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from isdretrieve.errors import BankError, IsdError
from isdretrieve.files.atomic import link_or_copy
from isdretrieve.files.bank import FeatureBank
from isdretrieve.files.manifest import (
    BACKEND_MILVUS,
    BANK_FILE,
    MANIFEST_FILE,
    RECALL_PROTOCOL,
    IndexManifest,
    write_manifest,
)
from isdretrieve.files.versions import package_versions
from isdretrieve.index.backend import pad_hits
from isdretrieve.index.milvus.collection import FINGERPRINT, ROWS_DONE, BankCollection, bank_properties
from isdretrieve.index.milvus.connect import Connection, MilvusTarget, connect, pymilvus_module
from isdretrieve.index.milvus.fill import fill, open_for_fill
from isdretrieve.index.milvus.params import METRIC, MilvusIndexSpec, milvus_index
from isdretrieve.index.plan import choose_index, default_memory_budget, ivf_lists
from isdretrieve.index.recall import heldout_recall, heldout_truth, sample_rows
from isdretrieve.index.tuning import Tuned, raise_until
from isdretrieve.util.progress import reporter

KIND_MILVUS = "milvus"
CHECKED_ROWS = 64  # rows of an attached collection compared with the bank
SEGMENT_BYTES = 1 << 30  # Milvus's default largest segment (dataCoord.segment.maxSize, 1024 MB)


def segment_rows(dim: int) -> int:
    """Rows of ``dim`` float32 values in one full Milvus segment: what one IVF index is trained over."""
    return SEGMENT_BYTES // (4 * dim)


@dataclass
class _Build:
    """What one build or attach chose and measured, for the manifest."""

    factory: str
    reason: str
    spec: MilvusIndexSpec
    recall_k: int
    params: dict[str, int] = field(default_factory=dict)
    recall: float = 0.0
    recall_queries: int = 0
    build_seconds: float = 0.0
    tune_seconds: float = 0.0
    notes: list[str] = field(default_factory=list)


def build_milvus_index(
    bank: str | Path,
    out_dir: str | Path,
    target: MilvusTarget,
    *,
    attach: bool = False,
    factory: str = "auto",
    recall_target: float = 0.95,
    k: int = 10,
    memory_budget: int | None = None,
    queries: int = 1000,
    seed: int = 0,
    progress: bool = False,
) -> IndexManifest:
    """Fill ``target``'s collection from the bank at ``bank`` (resumable: rerun to continue), give it the
    planned index, tune it to ``recall_target`` on held-out queries, and write ``out_dir``.

    ``attach``: the collection exists already, filled elsewhere (e.g. a bulk import of the bank's parquet
    export); its rows are checked against the bank instead of inserted, then it is indexed and tuned.
    """
    out_dir, bank_path = Path(out_dir), Path(bank)
    if not 0 < recall_target <= 1 or queries < 1 or k < 1:
        raise IsdError(
            f"need 0 < recall_target <= 1, queries >= 1 and k >= 1, got {recall_target}, {queries} and {k}"
        )
    say = reporter(progress)
    with FeatureBank.open(bank_path) as opened:
        bank = opened
        build = _plan(bank, factory, memory_budget, k, say)
        conn = connect(target, Path.cwd())  # a relative milvus-lite file is relative to here
        try:
            out_dir.mkdir(parents=True, exist_ok=True)
            (out_dir / MANIFEST_FILE).unlink(missing_ok=True)  # unfinished until the new manifest lands
            started = time.perf_counter()
            collection = _attached(conn, bank, build.spec, seed) if attach else _filled(conn, bank, say)
            collection.ensure_index(build.spec)
            build.build_seconds = time.perf_counter() - started
            _tune(collection, bank, build, recall_target, queries, seed, say)
            server = _server_version(conn)
        finally:
            conn.close()
        identity = (bank.fingerprint, len(bank), bank.dim)
    link_or_copy(bank_path, out_dir / BANK_FILE)
    return _save(out_dir, target, build, identity, recall_target, memory_budget, server)


def milvus_plan(n: int, dim: int, factory: str, memory_budget: int | None) -> tuple[str, str]:
    """(factory, why) of the index for ``n`` x ``dim`` rows in Milvus: ``factory`` as given, or the auto
    plan under the budget (the query nodes' memory) with an IVF's lists sized for one Milvus segment,
    since Milvus trains an index per segment rather than one over the whole collection."""
    if factory != "auto":
        return factory, "given"
    budget = default_memory_budget() if memory_budget is None else int(memory_budget)
    plan = choose_index(n, dim, memory_budget=budget)
    factory, reason = plan.factory, plan.reason
    if plan.on_disk:
        reason += "; in Milvus the query nodes hold the lists (on a cluster DISKANN keeps them on disk)"
    if milvus_index(factory).knob == "nprobe":
        rows = segment_rows(dim)
        factory = re.sub(r"^IVF\d+", f"IVF{ivf_lists(min(n, rows))}", factory)
        reason += f"; {factory.split(',')[0]} lists per Milvus segment of up to {rows:,} rows"
    return factory, reason


def _plan(
    bank: FeatureBank, factory: str, memory_budget: int | None, k: int, say: Callable[[str], None]
) -> _Build:
    """The index for this bank: the factory given, or the auto plan under the budget, as a Milvus index."""
    factory, reason = milvus_plan(len(bank), bank.dim, factory, memory_budget)
    spec = milvus_index(factory)
    reason = f"{reason}; {spec.note}" if spec.note else reason
    if len(bank) < 2:
        raise IsdError(
            f"a Milvus index needs at least 2 bank rows to measure its recall, the bank has {len(bank)}"
        )
    build = _Build(factory, reason, spec, recall_k=min(k, len(bank) - 1))
    if build.recall_k < k:
        build.notes.append(f"k lowered from {k} to {build.recall_k}: the bank has {len(bank):,} rows")
    say(f"milvus: {factory} as {spec.index_type} {spec.build} ({reason})")
    return build


def _filled(conn: Connection, bank: FeatureBank, say: Callable[[str], None]) -> BankCollection:
    """The target's collection holding every bank row: created, or resumed after its last confirmed block."""
    collection, existed = open_for_fill(conn, bank)
    sent = fill(collection, bank, existed, say)
    say(f"{sent:,} rows sent, {len(bank) - sent:,} already there")
    return collection


def _attached(conn: Connection, bank: FeatureBank, spec: MilvusIndexSpec, seed: int) -> BankCollection:
    """The target's existing collection, checked to hold exactly this bank's rows; it is claimed for the
    bank (its properties set) once the rows compare equal."""
    collection = BankCollection.open(conn)
    collection.check_fields(bank.dim)
    found = collection.properties()
    if FINGERPRINT in found:
        collection.check_holds(bank)
        if int(found.get(ROWS_DONE, len(bank))) < len(bank):
            raise IsdError(f"collection {collection.name!r} is an unfinished build: rerun isd-index build")
    collection.flush()
    collection.ensure_index(spec)  # loaded: the rows can be read back
    _check_rows(collection, bank, seed)
    if FINGERPRINT not in found:
        collection.set_properties(bank_properties(bank))
    return collection


def _check_rows(collection: BankCollection, bank: FeatureBank, seed: int) -> None:
    """BankError unless the collection holds the bank's row count and, on sampled rows, its vectors and
    labels."""
    count = collection.count()
    if count != len(bank):
        raise BankError(f"collection {collection.name!r} holds {count:,} rows, the bank {len(bank):,}")
    rows = sample_rows(len(bank), CHECKED_ROWS, seed)
    stored, labels = collection.rows(rows), bank.labels()
    for row, x in zip(rows, bank.take(rows), strict=True):
        found = stored.get(int(row))
        if found is None or found[1] != int(labels[row]) or not np.allclose(found[0], x, atol=1e-5):
            raise BankError(
                f"collection {collection.name!r} row {row} differs from the bank's: not this bank"
            )


def _tune(
    collection: BankCollection,
    bank: FeatureBank,
    build: _Build,
    target: float,
    queries: int,
    seed: int,
    say: Callable[[str], None],
) -> None:
    """Held-out recall@k through Milvus, raising the knob (nprobe, ef) until ``target`` is met; FLAT is
    measured too (it is exact, so it should be 1.0)."""
    started = time.perf_counter()
    k, spec = build.recall_k, build.spec
    rows, xq, truth = heldout_truth(bank, queries, seed, k)  # as VectorIndex.recall(seed=seed)
    build.recall_queries = len(xq)

    def measure(params: dict[str, int]) -> float:
        search_params = spec.search_params(params)
        recall = heldout_recall(
            lambda q, kk: pad_hits(collection.search(q, kk, search_params, None), kk), xq, rows, truth
        )
        say(f"{params or 'exact'}: recall@{k} = {recall:.4f}")
        return recall

    if spec.knob:
        tuned = raise_until(spec.knob, spec.knob_values(k + 1), measure, target)
    else:  # FLAT: exact, measured once
        recall = measure({})
        tuned = Tuned({}, recall, recall >= target)
    build.params, build.recall = tuned.params, tuned.recall
    if not tuned.reached:
        warnings.warn(f"{build.params} reaches only recall@{k} = {build.recall:.4f} < {target}", stacklevel=4)
    build.tune_seconds = time.perf_counter() - started


def _server_version(conn: Connection) -> str:
    with conn.errors("asking its version"):
        return str(pymilvus_module().utility.get_server_version(using=conn.alias))


def _save(
    out_dir: Path,
    target: MilvusTarget,
    build: _Build,
    identity: tuple[str, int, int],
    recall_target: float,
    memory_budget: int | None,
    server: str,
) -> IndexManifest:
    """Write ``manifest.json`` (last): the backend, where the collection is (no secrets) and its index."""
    fingerprint, count, dim = identity
    manifest = IndexManifest(
        factory=build.factory,
        params=build.params,
        bank_fingerprint=fingerprint,
        count=count,
        dim=dim,
        recall_k=build.recall_k,
        recall=build.recall,
        recall_queries=build.recall_queries,
        recall_target=recall_target,
        build_seconds=round(build.build_seconds, 3),
        tune_seconds=round(build.tune_seconds, 3),
        index_bytes=0,  # held by the Milvus, not in this directory
        gpu=False,
        reason=build.reason,
        kind=KIND_MILVUS,
        memory_budget=memory_budget,
        recall_protocol=RECALL_PROTOCOL,
        notes=build.notes,
        backend=BACKEND_MILVUS,
        milvus={
            **target.recorded(out_dir),
            "index_type": build.spec.index_type,
            "metric_type": METRIC,
            "build_params": dict(build.spec.build),
            "server_version": server,
        },
        versions=package_versions("pymilvus", "milvus_lite", "faiss", "numpy"),
    )
    write_manifest(out_dir, manifest)
    return manifest
