"""``auto`` against an oracle: every index of a grid built on the whole bank under the same memory budget,
each tuned to the same recall target and timed the same way; the grid's fastest is the oracle.

Each grid row is ``build_index(bank, factory=F, memory_budget=B, recall_target=T, k=10, queries=1000)``:
trained, filled and tuned by the library's own loop (held-out recall@10 on 1,000 bank rows, seed 0). A
row fits when its estimated memory (``estimate_bytes``) is within the budget, checked after the build
against the written index's size. Queries/s: the same 1,000 held-out queries searched as one batch
for the top 10, the least of 5 runs, one FAISS thread, per CPU second of the process (``qps``: with one
thread the same as wall time on an idle machine, and on a shared one free of the other jobs' share of
the cores; ``qps_wall`` is wall time). The ``auto`` row is ``build_index(factory="auto")``
with the same settings: its time is planning + building + tuning. At the end auto's index and the
grid's fastest are timed again, alternately, 5 times each (the ratio quoted is the median of the pairs),
because one machine's speed drifts during a long run.

Rows are written to ``runs/oracle/NAME-rows.json`` as they finish, so a rerun continues; the result goes
to ``benchmarks/results/index_oracle_NAME.json``. The banks: ``benchmarks/oracle_banks.py``.

    python benchmarks/index_oracle.py cifar60k-smallcnn --budget 40MB
    python benchmarks/index_oracle.py cifar50k-resnet18 --budget 40MB
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import faiss
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _harness import REPO, machine_info, write_result  # noqa: E402
from oracle_banks import BANKS, OUT  # noqa: E402

from isdretrieve.files.bank import FeatureBank
from isdretrieve.files.manifest import INDEX_FILE, IndexManifest
from isdretrieve.index.build import build_index
from isdretrieve.index.faiss_ops import set_params
from isdretrieve.index.plan import MIN_POINTS_PER_CENTROID, estimate_bytes, mib
from isdretrieve.index.recall import heldout_queries
from isdretrieve.util.sizes import parse_size

K, TARGET, QUERIES, SEED, REPEATS, ROUNDS = 10, 0.95, 1000, 0, 5, 5
HNSW_DEGREES = (8, 16, 32, 48, 64)


def grid(n: int, dim: int) -> list[str]:
    """The factories tried: Flat; HNSW of 5 degrees over raw and SQ8 vectors; IVF with 64 ... 4,096 lists
    (at least 39 rows a list) over Flat and SQ8 codes, the largest list count over PQ codes of dim/2 and
    dim/4 bytes (a PQ trains for minutes on a CPU), and from 512 lists with an HNSW coarse quantizer; all
    in the grammar of ``isdretrieve.index.plan``."""
    factories = ["Flat"]
    factories += [f"HNSW{m}{code}" for code in ("", ",SQ8") for m in HNSW_DEGREES]
    lists = [2**i for i in range(6, 13) if 2**i * MIN_POINTS_PER_CENTROID <= n]
    for code in ("Flat", "SQ8"):
        factories += [f"IVF{c},{code}" for c in lists]
    factories += [f"IVF{lists[-1]},PQ{dim // m}" for m in (2, 4)]  # slow to train: one list count
    factories += [f"IVF{c}_HNSW32,SQ8" for c in lists if c >= 512]
    return factories


def search_seconds(index: faiss.Index, queries: np.ndarray) -> tuple[float, float]:
    """The least CPU and wall seconds of REPEATS batched top-K searches of ``queries`` (after a warm-up):
    other jobs on the machine can only add to a run's time, so the least is the closest to the index's."""
    index.search(queries, K)
    cpu, wall = [], []
    for _ in range(REPEATS):
        started, started_cpu = time.perf_counter(), time.process_time()
        index.search(queries, K)
        cpu.append(time.process_time() - started_cpu)
        wall.append(time.perf_counter() - started)
    return min(cpu), min(wall)


def open_built(directory: Path, manifest: IndexManifest) -> faiss.Index:
    index = faiss.read_index(str(directory / INDEX_FILE))
    set_params(index, manifest.params, gpu=False)
    return index


def measure(bank: Path, factory: str, budget: int, work: Path, queries: np.ndarray) -> dict[str, Any]:
    """Build, tune and time one index; the row of the result."""
    with FeatureBank.open(bank) as opened:
        n, dim = len(opened), opened.dim
    row: dict[str, Any] = {"factory": factory}
    if factory != "auto":
        row["estimated_bytes"] = estimate_bytes(factory, n, dim)
        if row["estimated_bytes"] > budget:
            return row | {"status": "over budget"}
    directory = work / factory.replace(",", "-")
    shutil.rmtree(directory, ignore_errors=True)
    started = time.perf_counter()
    manifest = build_index(
        bank, directory, factory=factory, memory_budget=budget, recall_target=TARGET, k=K, queries=QUERIES
    )
    row["total_seconds"] = round(time.perf_counter() - started, 2)
    cpu, wall = search_seconds(open_built(directory, manifest), queries)
    row |= {
        "status": "ok" if manifest.recall >= TARGET else "below target",
        "chosen": manifest.factory,
        "params": manifest.params,
        "recall": manifest.recall,
        "qps": round(len(queries) / cpu, 1),
        "qps_wall": round(len(queries) / wall, 1),
        "index_bytes": manifest.index_bytes,
        "build_seconds": manifest.build_seconds,
        "tune_seconds": manifest.tune_seconds,
        "train_rows": manifest.train_rows,
    }
    if factory == "auto":
        row |= {"estimated_bytes": manifest.estimated_bytes, "reason": manifest.reason, "plan": manifest.plan}
    if row["index_bytes"] > budget:
        row["status"] = "over budget (written size)"
    return row


def run_rows(name: str, bank: Path, budget: int, queries: np.ndarray) -> list[dict[str, Any]]:
    """Every grid row and the auto row, continuing from ``runs/oracle/NAME-rows.json``."""
    with FeatureBank.open(bank) as opened:
        factories = [*grid(len(opened), opened.dim), "auto"]
    state = OUT / f"{name}-rows.json"
    done = json.loads(state.read_text()) if state.is_file() else {}
    if done.get("budget") != budget:
        done = {"budget": budget, "rows": {}}
    work = OUT / f"{name}-indices"
    for factory in factories:
        if factory in done["rows"]:
            continue
        print(f"{name}: {factory} ...", flush=True)
        row = measure(bank, factory, budget, work, queries)
        keep = work / "auto" if factory == "auto" else None
        for directory in work.iterdir() if work.exists() else ():
            if directory != keep and directory.name != "best":
                shutil.rmtree(directory)
        done["rows"][factory] = row
        state.write_text(json.dumps(done, indent=1))
        print(f"  {json.dumps({k: v for k, v in row.items() if k != 'plan'})}", flush=True)
    return [done["rows"][f] for f in factories]


def rematch(bank: Path, best: str, budget: int, queries: np.ndarray, name: str) -> dict[str, Any]:
    """Rebuild the grid's fastest, then time it and auto's index alternately ROUNDS times each."""
    work = OUT / f"{name}-indices"
    best_dir = work / "best"
    shutil.rmtree(best_dir, ignore_errors=True)
    best_manifest = build_index(
        bank, best_dir, factory=best, memory_budget=budget, recall_target=TARGET, k=K, queries=QUERIES
    )
    auto_manifest = IndexManifest.from_json((work / "auto" / "manifest.json").read_text())
    indices = {"auto": open_built(work / "auto", auto_manifest), "best": open_built(best_dir, best_manifest)}
    qps: dict[str, list[float]] = {"auto": [], "best": []}
    for _ in range(ROUNDS):
        for key, index in indices.items():
            qps[key].append(round(len(queries) / search_seconds(index, queries)[0], 1))
    ratios = [a / b for a, b in zip(qps["auto"], qps["best"], strict=True)]
    return {
        "auto_factory": auto_manifest.factory,
        "auto_params": auto_manifest.params,
        "best_factory": best,
        "best_params": best_manifest.params,
        "auto_qps": qps["auto"],
        "best_qps": qps["best"],
        "ratio_median": round(statistics.median(ratios), 3),
        "ratios": [round(r, 3) for r in ratios],
    }


def predictions(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """auto's sample predictions next to what the grid measured for the same factory on the whole bank."""
    auto = rows[-1]
    measured = {row["factory"]: row for row in rows[:-1] if row.get("status") == "ok"}
    out = []
    for trial in auto.get("plan", {}).get("trials", []):
        full = measured.get(trial["factory"])
        if trial["status"] != "ok" or full is None:
            continue
        out.append(
            {
                "factory": trial["factory"],
                "sample_params": trial["sample_params"],
                "full_params": full["params"],
                "predicted_qps": trial["predicted_qps"],
                "measured_qps": full["qps"],
                "predicted_over_measured": round(trial["predicted_qps"] / full["qps"], 3),
            }
        )
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("name", choices=BANKS)
    parser.add_argument("--budget", default="40MB", help="memory budget (powers of 1024: 40MB = 40 MiB)")
    args = parser.parse_args()
    os.chdir(REPO)
    torch.set_num_threads(1)
    faiss.omp_set_num_threads(1)
    budget, bank = parse_size(args.budget), OUT / f"{args.name}.h5"
    if not bank.is_file():
        raise SystemExit(f"{bank} is missing: run benchmarks/oracle_banks.py {args.name} first")
    begun, machine_at_start = time.perf_counter(), machine_info()
    with FeatureBank.open(bank) as opened:
        n, dim, spec, encoder = len(opened), opened.dim, opened.data_spec, opened.encoder
        queries = heldout_queries(opened, QUERIES, SEED)[1]
    rows = run_rows(args.name, bank, budget, queries)
    fitting = [row for row in rows[:-1] if row["status"] == "ok"]
    best = max(fitting, key=lambda row: row["qps"])
    auto = rows[-1]
    grid_seconds = sum(row.get("total_seconds", 0) for row in rows[:-1])
    result = {
        "protocol": (
            f"held-out recall@{K} >= {TARGET} on {QUERIES} bank rows (seed {SEED}), each index tuned by "
            f"build_index's loop; queries/s = {QUERIES} queries as one batch, top {K}, least of {REPEATS} "
            "runs, 1 FAISS thread, per CPU second of the process (qps_wall: per wall second); "
            "fits = estimated memory <= budget (and the written index too)"
        ),
        "bank": {
            "name": args.name,
            "count": n,
            "dim": dim,
            "data": spec,
            "encoder": encoder.arch if encoder else "",
            "flat_bytes": n * dim * 4,
        },
        "memory_budget_bytes": budget,
        "memory_budget": f"{mib(budget)} ({budget / (n * dim * 4):.2f}x the raw float32 vectors)",
        "rows": rows,
        "grid_best": {"factory": best["factory"], "qps": best["qps"], "params": best["params"]},
        "auto": {
            "factory": auto["chosen"],
            "qps": auto["qps"],
            "recall": auto["recall"],
            "plan_seconds": auto["plan"].get("seconds", 0.0),
            "build_seconds": auto["build_seconds"],
            "tune_seconds": auto["tune_seconds"],
            "total_seconds": auto["total_seconds"],
        },
        "qps_ratio_in_sweep": round(auto["qps"] / best["qps"], 3),
        "rematch": rematch(bank, best["factory"], budget, queries, args.name),
        "grid_total_seconds": round(grid_seconds, 1),
        "grid_best_total_seconds": best["total_seconds"],
        "predictions": predictions(rows),
        "machine_at_start": machine_at_start,
        "total_seconds": round(time.perf_counter() - begun, 1),
    }
    print(write_result(f"index_oracle_{args.name}", result))


if __name__ == "__main__":
    main()
