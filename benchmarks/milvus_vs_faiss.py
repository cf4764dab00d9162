"""The same bank in FAISS and in milvus-lite: build time, recall@10 on held-out queries, and QPS.

Bank: the 50,000 CIFAR-10 train images (JPEG q75 copy) through the small CNN (``runs/cifar-small/
encoder.pt`` when it exists, else a seeded random-init one) at 32 px: 50,000 x 256, L2-normalised,
exported by ``export_bank``. Each index kind is built by ``build_index`` with ``backend="faiss"`` and
``backend="milvus"`` (an embedded milvus-lite file): the same factory, the same held-out tuning to
recall@10 >= 0.95 on 1,000 bank rows (each query's own row dropped), the knob and the recall read from
each ``manifest.json``. Kinds: ``Flat`` (exact), ``HNSW32``, and ``IVF1024,SQ8`` (what ``auto`` picks
for this bank under a 16 MiB budget).

QPS: the 1,000 held-out queries searched through the opened index directory (``open_index``) as one
batch (Milvus: batches of 1,024 a call), median of 3 runs; and the p50 latency of one query a call over
200 queries, the service's case. Build: inserting / adding plus building the index (FAISS: training +
adding); tuning separately. Both run in this one process on the same cores: milvus-lite serves
pymilvus's gRPC calls from threads in-process and searches with FAISS itself.

What the figures tell and do not: milvus-lite is an embedded engine, not a cluster. Its search runs the
same FAISS kernels behind a gRPC round trip, protobuf encoding and Python segment handling, so the ratio
here is the price of the Milvus protocol and the engine's bookkeeping on one machine; it says nothing
about a Milvus cluster's throughput (query nodes in parallel, Knowhere's own kernels, DISKANN, GPU
indices), nor about its capacity, which is why it exists. The recall columns do carry over: the same
index kinds and knobs reach the same recall.

    .venv/bin/python benchmarks/milvus_vs_faiss.py       # writes benchmarks/results/milvus_vs_faiss.json
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import faiss
import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

from _harness import CIFAR_TARBALL, cifar_root, machine_info, random_encoder, write_result

from isdretrieve.bank.export import export_bank
from isdretrieve.files.versions import package_versions
from isdretrieve.index.build import build_index
from isdretrieve.index.milvus.connect import MilvusTarget
from isdretrieve.index.open import open_index
from isdretrieve.index.recall import heldout_queries

ENCODER = REPO / "runs" / "cifar-small" / "encoder.pt"
KINDS = ("Flat", "HNSW32", "IVF1024,SQ8")
K, TARGET, QUERIES, REPEATS, SINGLE = 10, 0.95, 1000, 3, 200


def batch_qps(index, queries: np.ndarray) -> float:
    """Queries a second: all ``queries`` in one search, median of REPEATS runs after a warm-up."""
    index.search(queries[:10], K)
    runs = []
    for _ in range(REPEATS):
        started = time.perf_counter()
        index.search(queries, K)
        runs.append(time.perf_counter() - started)
    return len(queries) / statistics.median(runs)


def single_p50_ms(index, queries: np.ndarray) -> float:
    """Median milliseconds of one query a call over the first SINGLE queries."""
    runs = []
    for q in queries[:SINGLE]:
        started = time.perf_counter()
        index.search(q[None], K)
        runs.append(time.perf_counter() - started)
    return 1000 * statistics.median(runs)


def disk_bytes(path: Path) -> int:
    return (
        sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
        if path.is_dir()
        else path.stat().st_size
    )


def measure(bank: Path, work: Path, factory: str, backend: str) -> dict:
    """Build ``factory`` on ``backend`` over ``bank`` and measure it (see the module docstring)."""
    out = work / f"{backend}-{factory.replace(',', '_')}"
    options = {}
    if backend == "milvus":
        options = {"backend": "milvus", "milvus": MilvusTarget(str(out / "milvus.db"), "bench")}
    started = time.perf_counter()
    manifest = build_index(bank, out, factory=factory, recall_target=TARGET, k=K, queries=QUERIES, **options)
    total = time.perf_counter() - started
    with open_index(out) as index:
        queries = heldout_queries(index.bank, QUERIES, 0)[1]
        qps, p50 = batch_qps(index, queries), single_p50_ms(index, queries)
        recall_again = index.recall(K, QUERIES, 0)
    stored = out / "milvus.db" if backend == "milvus" else out / "index.faiss"
    row = {
        "backend": backend,
        "factory": factory,
        "milvus_index": manifest.milvus.get("index_type"),
        "params": manifest.params,
        "recall_at_10": round(manifest.recall, 4),
        "recall_rechecked": round(recall_again, 4),
        "build_seconds": manifest.build_seconds,
        "tune_seconds": manifest.tune_seconds,
        "wall_seconds": round(total, 2),
        "qps_batch": round(qps, 1),
        "single_query_p50_ms": round(p50, 2),
        "stored_bytes": disk_bytes(stored),
    }
    print(row, flush=True)
    shutil.rmtree(out)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2, help="torch and FAISS threads")
    parser.add_argument("--kinds", nargs="+", default=list(KINDS), help="factory strings")
    args = parser.parse_args()
    os.chdir(REPO)  # the data SPEC is relative to the repository
    torch.set_num_threads(args.threads)
    faiss.omp_set_num_threads(args.threads)
    root = cifar_root()
    if root is None:
        raise SystemExit(f"the shared CIFAR-10 copy is missing: {CIFAR_TARBALL}")
    machine_at_start, begun = machine_info(), time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="milvus-bench-", dir=REPO / ".cache") as tmp:
        work = Path(tmp)
        encoder = ENCODER if ENCODER.is_file() else random_encoder(work / "encoder.pt", "small_cnn", 32)
        which = str(ENCODER.relative_to(REPO)) if ENCODER.is_file() else "random-init small_cnn (seed 0)"
        spec = f"folder:{root.relative_to(REPO)},split=train"
        exported = export_bank(encoder, spec, work / "bank.h5", workers=2)
        extract_seconds = time.perf_counter() - begun
        kinds = args.kinds
        rows = [
            measure(exported.path, work, factory, backend)
            for factory in kinds
            for backend in ("faiss", "milvus")
        ]
    ratios = {}
    for factory in kinds:
        f, m = (
            next(r for r in rows if r["factory"] == factory and r["backend"] == b)
            for b in ("faiss", "milvus")
        )
        ratios[factory] = {
            "qps_batch_faiss_over_milvus": round(f["qps_batch"] / m["qps_batch"], 2),
            "single_p50_milvus_over_faiss": round(m["single_query_p50_ms"] / f["single_query_p50_ms"], 2),
            "build_milvus_over_faiss": round(m["build_seconds"] / max(f["build_seconds"], 1e-3), 2),
        }
    result = {
        "protocol": (
            f"CIFAR-10 (JPEG q75 copy) train split, 50,000 x 256, {which}; each index tuned to recall@{K} >= "
            f"{TARGET} on {QUERIES} held-out bank rows (own row dropped); QPS = {QUERIES} queries in one "
            f"batch, median of {REPEATS}; single = p50 of {SINGLE} one-query calls; {args.threads} threads; "
            "milvus-lite embedded in the same process"
        ),
        "milvus_versions": package_versions("pymilvus", "milvus_lite"),
        "bank": {
            "rows": exported.rows,
            "encoder": which,
            "data": spec,
            "extract_seconds": round(extract_seconds, 1),
        },
        "results": rows,
        "ratios": ratios,
        "machine_at_start": machine_at_start,
        "total_seconds": round(time.perf_counter() - begun, 1),
    }
    print(write_result("milvus_vs_faiss", result))


if __name__ == "__main__":
    main()
