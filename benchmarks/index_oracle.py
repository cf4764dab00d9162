"""``auto`` against an oracle: every index of a grid built on the whole bank under the same memory budget,
each tuned to the same recall target and timed the same way; the grid's fastest is the oracle.

Each grid row is ``build_index(bank, factory=F, memory_budget=B, recall_target=T, k=10, queries=1000)``:
trained, filled and tuned by the library's own loop (held-out recall@10 on 1,000 bank rows, seed 0). A
row fits when its estimated memory (``estimate_bytes``) is within the budget, checked after the build
against the written index's size. Queries/s: the same 1,000 held-out queries searched as one batch
for the top 10, the least of 5 runs, one FAISS thread, per CPU second of the process (``qps``: with one
thread the same as wall time on an idle machine, and on a shared one free of the other jobs' share of
the cores; ``qps_wall`` is wall time). The ``auto`` row is ``build_index(factory="auto")``
with the same settings: its time is planning + building + tuning. At the end every index that reached
the target, auto's too, is timed again in 5 rounds, each round all of them in turn, and each index's
figure is its median over the rounds: a shared machine's speed drifts during a long run, and the rounds
put every index through the same drift. The grid's best and auto's ratio to it come from these medians.

Rows are written to ``runs/oracle/NAME-BUDGET-rows.json`` as they finish, so a rerun continues; the
result goes to ``benchmarks/results/index_oracle_NAME-BUDGET.json`` (BUDGET in MiB, e.g. ``40MiB``).
The banks: ``benchmarks/oracle_banks.py``.

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
from isdretrieve.files.manifest import INDEX_FILE, KIND_ONDISK, IndexManifest
from isdretrieve.index.build import build_index
from isdretrieve.index.faiss_ops import set_params
from isdretrieve.index.ondisk import read_ondisk
from isdretrieve.index.plan import MIN_POINTS_PER_CENTROID, estimate_bytes, mib
from isdretrieve.index.recall import heldout_queries
from isdretrieve.util.sizes import parse_size

K, TARGET, QUERIES, SEED, REPEATS, ROUNDS = 10, 0.95, 1000, 0, 5, 5
HNSW_DEGREES = (8, 16, 32, 48, 64)


def grid(n: int, dim: int) -> list[str]:
    """The factories tried: Flat; HNSW of 5 degrees over raw and SQ8 vectors; IVF with 64 ... 4,096 lists
    (at least 39 rows a list) over Flat and SQ8 codes, and from 512 lists with an HNSW coarse quantizer;
    all in the grammar of ``isdretrieve.index.plan``. No PQ: ``auto`` only tries it when no SQ8 code fits
    (not the case at the budgets measured), and FAISS takes minutes of CPU to train one here."""
    factories = ["Flat"]
    factories += [f"HNSW{m}{code}" for code in ("", ",SQ8") for m in HNSW_DEGREES]
    lists = [2**i for i in range(6, 13) if 2**i * MIN_POINTS_PER_CENTROID <= n]
    for code in ("Flat", "SQ8"):
        factories += [f"IVF{c},{code}" for c in lists]
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


def built_dir(work: Path, factory: str) -> Path:
    return work / factory.replace(",", "-")


def open_built(directory: Path, manifest: IndexManifest) -> faiss.Index:
    """The FAISS index of a built directory (lists memory-mapped for kind "ondisk"), params set."""
    if manifest.kind == KIND_ONDISK:
        index = read_ondisk(directory / INDEX_FILE)
    else:
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
    directory = built_dir(work, factory)
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
        "kind": manifest.kind,
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


def run_name(name: str, budget: int) -> str:
    """``NAME-40MiB``: the bank and the budget, naming the run's state, indices and result."""
    return f"{name}-{budget / 2**20:g}MiB"


def run_rows(name: str, bank: Path, budget: int, queries: np.ndarray) -> list[dict[str, Any]]:
    """Every grid row and the auto row, continuing from ``runs/oracle/NAME-BUDGET-rows.json``."""
    with FeatureBank.open(bank) as opened:
        factories = [*grid(len(opened), opened.dim), "auto"]
    state = OUT / f"{run_name(name, budget)}-rows.json"
    done = json.loads(state.read_text()) if state.is_file() else {}
    if done.get("budget") != budget:
        done = {"budget": budget, "rows": {}}
    work = OUT / f"{run_name(name, budget)}-indices"
    for factory in factories:
        if factory in done["rows"]:
            continue
        print(f"{name}: {factory} ...", flush=True)
        done["rows"][factory] = row = measure(bank, factory, budget, work, queries)
        state.write_text(json.dumps(done, indent=1))
        print(f"  {json.dumps({k: v for k, v in row.items() if k != 'plan'})}", flush=True)
    return [done["rows"][f] for f in factories]


def rematch(name: str, bank: Path, rows: list[dict[str, Any]], budget: int, queries: np.ndarray) -> dict:
    """Time auto's index and every grid index that reached the target again, in ROUNDS rounds, each
    round all of them one after the other; an index whose directory is gone is rebuilt (the builds are
    seeded: the same index). Each index's figure is its median over the rounds."""
    work, indices = OUT / f"{run_name(name, budget)}-indices", {}
    for row in rows:
        if row["status"] != "ok" and row["factory"] != "auto":
            continue
        directory = built_dir(work, row["factory"])
        if not (directory / "manifest.json").is_file():
            print(f"{name}: rebuilding {row['factory']} for the rematch", flush=True)
            build_index(bank, directory, factory=row["factory"], memory_budget=budget, k=K, queries=QUERIES)
        manifest = IndexManifest.from_json((directory / "manifest.json").read_text())
        if manifest.params != row["params"]:
            raise SystemExit(
                f"{directory} has {manifest.params}, its row {row['params']}: remove it and rerun"
            )
        indices[row["factory"]] = open_built(directory, manifest)
    qps: dict[str, list[float]] = {factory: [] for factory in indices}
    for _ in range(ROUNDS):
        for factory, index in indices.items():
            qps[factory].append(round(len(queries) / search_seconds(index, queries)[0], 1))
    median = {factory: statistics.median(values) for factory, values in qps.items()}
    best = max((f for f in median if f != "auto"), key=median.get, default=None)
    if best is None:
        return {"qps_by_round": qps, "qps_median": median, "best_factory": None, "auto_over_best": None}
    per_round = [qps["auto"][r] / max(v[r] for f, v in qps.items() if f != "auto") for r in range(ROUNDS)]
    return {
        "qps_by_round": qps,
        "qps_median": median,
        "best_factory": best,
        "auto_factory": rows[-1]["chosen"],
        "auto_over_best": round(median["auto"] / median[best], 3),
        "auto_over_fastest_of_each_round": [round(r, 3) for r in per_round],
    }


def predictions(rows: list[dict[str, Any]], qps_median: dict[str, float]) -> list[dict[str, Any]]:
    """auto's sample predictions next to what the same factory measured on the whole bank (the grid's
    row, queries/s from the rematch)."""
    measured = {row["factory"]: row for row in rows[:-1] if row.get("status") == "ok"}
    out = []
    for trial in rows[-1].get("plan", {}).get("trials", []):
        full = measured.get(trial["factory"])
        if trial["status"] != "ok" or full is None:
            continue
        qps = qps_median[trial["factory"]]
        out.append(
            {
                "factory": trial["factory"],
                "sample_params": trial["sample_params"],
                "predicted_params": trial["predicted_params"],
                "nprobe_exponent": trial.get("nprobe_exponent", 0.0),
                "full_params": full["params"],
                "predicted_qps": trial["predicted_qps"],
                "measured_qps": qps,
                "predicted_over_measured": round(trial["predicted_qps"] / qps, 3),
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
    timed = rematch(args.name, bank, rows, budget, queries)
    best = next((row for row in rows if row["factory"] == timed["best_factory"]), None)
    auto = rows[-1]
    result = {
        "protocol": (
            f"held-out recall@{K} >= {TARGET} on {QUERIES} bank rows (seed {SEED}), each index tuned by "
            f"build_index's loop; queries/s = {QUERIES} queries as one batch, top {K}, least of {REPEATS} "
            "runs, 1 FAISS thread, per CPU second of the process (qps_wall: per wall second); "
            f"then {ROUNDS} rounds timing every index in turn, each index's median over the rounds "
            "(rematch); fits = estimated memory <= budget (and the written index too)"
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
        "rematch": timed,
        "grid_best": None
        if best is None
        else {
            "factory": best["factory"],
            "params": best["params"],
            "qps": timed["qps_median"][best["factory"]],
            "total_seconds": best["total_seconds"],
        },
        "grid_note": "" if best else f"no index of the grid reaches recall@{K} >= {TARGET} within the budget",
        "auto": {
            "factory": auto["chosen"],
            "kind": auto.get("kind", "ram"),
            "reason": auto["reason"],
            "params": auto["params"],
            "recall": auto["recall"],
            "qps": timed["qps_median"]["auto"],
            "plan_seconds": auto["plan"].get("seconds", 0.0),
            "build_seconds": auto["build_seconds"],
            "tune_seconds": auto["tune_seconds"],
            "total_seconds": auto["total_seconds"],
        },
        "auto_over_grid_best_qps": timed["auto_over_best"],
        "grid_total_seconds": round(sum(row.get("total_seconds", 0) for row in rows[:-1]), 1),
        "predictions": predictions(rows, timed["qps_median"]),
        "machine_at_start": machine_at_start,
        "total_seconds": round(time.perf_counter() - begun, 1),
    }
    print(write_result(f"index_oracle_{run_name(args.name, budget)}", result))


if __name__ == "__main__":
    main()
