"""Mining at scale: time and peak memory of ``mine_pairs`` against a dense N×N baseline.

Features: the first N rows of the 500k-view CIFAR-10 bank made by ``ann_auto.py`` or of ``--source`` (real
small-CNN features, 256-d), copied into a bank of their own. Each measurement runs in a fresh subprocess
so its peak RSS is its own (and, on a GPU, its peak GPU memory).

- ``ours``: ``mine_pairs(k=5, mutual, quantile 0.5)``, exact search in query chunks (never N×N).
- ``dense``: the obvious NumPy baseline at the same N: ``X @ X.T`` (float32), diagonal masked,
  ``argpartition`` top-k. Only run where N×N fits comfortably (``--dense-max``).

    .venv/bin/python benchmarks/mine_scale.py --rows 20000 --rows 200000   # writes results/mine_scale.json
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

from _harness import write_result  # noqa: E402

SOURCE = REPO / "indices" / "cifar10-views-500k" / "bank.h5"
WORK = REPO / "runs" / "bench-mine"
K = 5

CHILD = """
import json, resource, sys, time
import numpy as np
from isdretrieve.files.bank import FeatureBank
from isdretrieve.files.pairs import MiningParams
from isdretrieve.mine.mining import mine_pairs

kind, bank, out = sys.argv[1], sys.argv[2], sys.argv[3]
start = time.perf_counter()
if kind == "ours":
    pairs = mine_pairs(bank, out, MiningParams(k=5, mutual=True, quantile=0.5))
    result = {"pairs": pairs.num_pairs, "coverage": pairs.coverage}
else:
    with FeatureBank.open(bank) as b:
        x = b.features()
    sims = x @ x.T
    np.fill_diagonal(sims, -np.inf)
    top = np.argpartition(-sims, 5, axis=1)[:, :5]
    result = {"rows": int(top.shape[0])}
result["seconds"] = time.perf_counter() - start
result["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
import torch
if torch.cuda.is_available():  # ours searches on the GPU there
    result["peak_gpu_mib"] = torch.cuda.max_memory_allocated() / 2**20
print(json.dumps(result))
"""


def subset_bank(source: Path, rows: int) -> Path:
    from isdretrieve.bank.arrays import write_bank
    from isdretrieve.files.bank import FeatureBank

    out = WORK / f"bank-{rows}.h5"
    if not out.exists():
        with FeatureBank.open(source) as bank:
            if rows > len(bank):
                sys.exit(f"--rows {rows} is more than the {len(bank):,} rows of {source}")
            write_bank(
                out,
                bank.features(0, rows),
                labels=bank.labels()[:rows],
                fingerprint=bank.fingerprint,
                data_spec=f"first {rows} rows of {source.parent.name}/{source.name}",
            )
    return out


def measure(kind: str, bank: Path, rows: int) -> dict:
    out = WORK / f"pairs-{rows}.h5"
    out.unlink(missing_ok=True)
    done = subprocess.run(
        [sys.executable, "-c", CHILD, kind, str(bank), str(out)], capture_output=True, text=True, check=True
    )
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, action="append", help="bank sizes (default 20000, 200000)")
    parser.add_argument("--dense-max", type=int, default=30000, help="largest N for the dense baseline")
    parser.add_argument(
        "--source",
        type=Path,
        default=SOURCE,
        help="bank to take rows from (ann_auto.py --rows 1000000 writes indices/cifar10-views-1000k/bank.h5)",
    )
    args = parser.parse_args()
    if not args.source.exists():
        sys.exit(f"{args.source} is missing: run benchmarks/ann_auto.py first")
    WORK.mkdir(parents=True, exist_ok=True)
    results = []
    for rows in args.rows or [20000, 200000]:
        bank = subset_bank(args.source, rows)
        entry = {"rows": rows, "dim": 256, "dense_matrix_mib": rows * rows * 4 / 2**20}
        entry["ours"] = measure("ours", bank, rows)
        if rows <= args.dense_max:
            entry["dense"] = measure("dense", bank, rows)
            entry["time_ratio_ours_vs_dense"] = entry["ours"]["seconds"] / entry["dense"]["seconds"]
            entry["memory_ratio_ours_vs_dense"] = (
                entry["ours"]["peak_rss_mib"] / entry["dense"]["peak_rss_mib"]
            )
        print(json.dumps(entry))
        results.append(entry)
    write_result(
        "mine_scale",
        {
            "protocol": f"exact top-{K} of every row (self excluded), k={K}, mutual, quantile 0.5; real "
            "CIFAR-10 small-CNN view features; fresh subprocess per measurement, peak RSS from getrusage",
            "results": results,
            "self_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        },
    )


if __name__ == "__main__":
    main()
