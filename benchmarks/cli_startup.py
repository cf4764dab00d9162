"""Whole-process cost of the command-line tools, each run as a fresh process the way its console script
runs it (``from isdretrieve.cli.X import main; main()``), in one run on one machine:

1. start-up: median wall time and peak RSS of ``isd-train --help``, ``isd-index --help``, ``isd-knn --help``
   and ``isd-index info DIR`` against ``python -c pass``;
2. ``isd-knn --train A --test B -k 20 -T 0.07`` on two existing exact indices against a plain h5py + FAISS +
   NumPy script doing the same work (read the index, labels and queries, search, exp vote, top-1, top-5,
   per-class), whole process. Target: ratio <= 1.2.

Features: digits pixels (tiled) projected to 256-d with a fixed Gaussian matrix, as in knn_overhead.py:
50,000 bank rows and 10,000 queries by default (``--bank-rows``, ``--queries``).

    python benchmarks/cli_startup.py [--repeat 7] [--knn-repeat 3]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent)]
from _harness import write_result  # noqa: E402
from knn_overhead import projected  # noqa: E402

from isdretrieve.bank.arrays import write_bank
from isdretrieve.index.build import build_index

DIM, K, T, TARGET = 256, 20, 0.07, 1.2
ENV = {**os.environ, "PYTHONPATH": str(HERE.parent)}  # this checkout's code, not an installed copy

PLAIN = """\
import json, sys
import faiss, h5py, numpy as np
train, test, k, T = sys.argv[1], sys.argv[2], int(sys.argv[3]), float(sys.argv[4])
index = faiss.read_index(f"{train}/index.faiss")
with h5py.File(f"{train}/bank.h5", "r") as f:
    train_y = f["labels"][...]
with h5py.File(f"{test}/bank.h5", "r") as f:
    queries, test_y = f["features"][...].astype(np.float32), f["labels"][...]
queries /= np.maximum(np.linalg.norm(queries, axis=1, keepdims=True), 1e-12)
sims, rows = index.search(queries, k)
c = int(max(train_y.max(), test_y.max())) + 1
flat = (np.arange(len(queries))[:, None] * c + train_y[rows]).ravel()
scores = np.bincount(flat, np.exp(sims.astype(np.float64) / T).ravel(), len(queries) * c).reshape(-1, c)
ranked = np.argsort(-scores, axis=1, kind="stable")[:, :5]
hit1 = ranked[:, 0] == test_y
top5 = float((ranked == test_y[:, None]).any(axis=1).mean())
per_class = {int(y): float(hit1[test_y == y].mean()) for y in np.unique(test_y)}
print(json.dumps({"top1": float(hit1.mean()), "top5": top5, "per_class": per_class}))
"""


def console(module: str, name: str, *args: str) -> list[str]:
    """What the console script ``name`` runs, as a command line."""
    code = f"import sys; sys.argv[0] = {name!r}; from {module} import main; sys.exit(main())"
    return [sys.executable, "-c", code, *args]


def measure(commands: dict[str, list[str]], repeat: int) -> dict[str, dict]:
    """Each command ``repeat`` times, interleaved (so background load hits all alike)."""
    walls: dict[str, list[float]] = {name: [] for name in commands}
    cpus: dict[str, list[float]] = {name: [] for name in commands}
    rss: dict[str, list[float]] = {name: [] for name in commands}
    outputs: dict[str, str] = {}
    for _ in range(repeat):
        for name, cmd in commands.items():
            wall, cpu, peak, out = run(cmd)
            walls[name].append(round(wall, 4))
            cpus[name].append(round(cpu, 4))
            rss[name].append(round(peak, 1))
            outputs[name] = out
    return {
        name: {
            "median_s": statistics.median(walls[name]),
            "runs_s": walls[name],
            "median_cpu_s": statistics.median(cpus[name]),
            "peak_rss_mib": statistics.median(rss[name]),
            "stdout": outputs[name],
        }
        for name in commands
    }


def run(cmd: list[str]) -> tuple[float, float, float, str]:
    """Wall and CPU (user + system) seconds, peak RSS (MiB) and stdout of one process, measured by a small
    wrapper process (its RUSAGE_CHILDREN figures are that one child's); a failure stops the benchmark."""
    wrapper = (
        "import json, resource, subprocess, sys, time\n"
        "t = time.perf_counter()\n"
        "p = subprocess.run(sys.argv[1:], capture_output=True, text=True)\n"
        "wall = time.perf_counter() - t\n"
        "if p.returncode: sys.exit(p.stderr[-500:])\n"
        "ru = resource.getrusage(resource.RUSAGE_CHILDREN)\n"
        "cpu = ru.ru_utime + ru.ru_stime\n"
        "print(json.dumps({'wall': wall, 'cpu': cpu, 'rss': ru.ru_maxrss / 1024, 'out': p.stdout}))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", wrapper, *cmd], capture_output=True, text=True, env=ENV, cwd=HERE.parent
    )
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(cmd[:3])}... failed: {done.stderr.strip()[-500:]}")
    result = json.loads(done.stdout)
    return result["wall"], result["cpu"], result["rss"], result["out"]


def make_indices(root: Path, bank_rows: int, queries: int) -> tuple[Path, Path]:
    projection = torch.randn(3 * 32 * 32, DIM, generator=torch.Generator().manual_seed(0))
    for name, spec, rows in (("train", "digits", bank_rows), ("test", "digits,split=test", queries)):
        feats, labels, _ = projected(spec, rows, projection)
        write_bank(root / f"{name}.h5", feats, labels=labels, fingerprint="cli-benchmark")
        build_index(root / f"{name}.h5", root / name, factory="Flat")
    return root / "train", root / "test"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=7, help="runs of each start-up command")
    parser.add_argument("--knn-repeat", type=int, default=3, help="runs of each k-NN process")
    parser.add_argument("--bank-rows", type=int, default=50_000)
    parser.add_argument("--queries", type=int, default=10_000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        train, test = make_indices(Path(tmp), args.bank_rows, args.queries)
        startup = measure(
            {
                "python -c pass": [sys.executable, "-c", "pass"],
                "isd-train --help": console("isdretrieve.cli.train", "isd-train", "--help"),
                "isd-index --help": console("isdretrieve.cli.index", "isd-index", "--help"),
                "isd-knn --help": console("isdretrieve.cli.knn", "isd-knn", "--help"),
                "isd-index info": console("isdretrieve.cli.index", "isd-index", "info", str(train)),
            },
            args.repeat,
        )
        plain_script = Path(tmp) / "plain_knn.py"
        plain_script.write_text(PLAIN)
        knn_args = ["--train", str(train), "--test", str(test), "-k", str(K), "-T", str(T), "--json"]
        knn = measure(
            {
                "plain h5py + FAISS + NumPy": [
                    sys.executable,
                    str(plain_script),
                    str(train),
                    str(test),
                    "20",
                    "0.07",
                ],
                "isd-knn": console("isdretrieve.cli.knn", "isd-knn", *knn_args),
            },
            args.knn_repeat,
        )
    ours_top1 = json.loads(knn["isd-knn"].pop("stdout"))["results"][0]["top1"]
    plain_top1 = json.loads(knn["plain h5py + FAISS + NumPy"].pop("stdout"))["top1"]
    for row in startup.values():
        row.pop("stdout")
    base = startup["python -c pass"]
    for row in startup.values():
        row["over_python_s"] = round(row["median_s"] - base["median_s"], 4)
        row["over_python_cpu_s"] = round(row["median_cpu_s"] - base["median_cpu_s"], 4)
    ratio = knn["isd-knn"]["median_s"] / knn["plain h5py + FAISS + NumPy"]["median_s"]
    rss_ratio = knn["isd-knn"]["peak_rss_mib"] / knn["plain h5py + FAISS + NumPy"]["peak_rss_mib"]
    path = write_result(
        "cli_startup",
        {
            "protocol": {
                "process": "each command a fresh Python process, as its console script runs it; wall time "
                "from spawn to exit, its CPU time (user + system; less inflated by background load), "
                "peak RSS of the process (getrusage RUSAGE_CHILDREN of a wrapper)",
                "startup_runs": args.repeat,
                "knn_runs": args.knn_repeat,
                "info_index": f"Flat over {args.bank_rows:,} x {DIM}",
                "knn": f"{args.queries:,} queries x {args.bank_rows:,} bank rows x {DIM}-d, Flat (exact, "
                f"inner product, FAISS CPU), k={K}, exp weighting, T={T}, top-1/top-5/per-class",
                "features": "digits pixels (tiled) x fixed Gaussian projection to 256-d, L2-normalised",
            },
            "figures": {
                "startup": startup,
                "knn": knn,
                "knn_top1": {"isd-knn": ours_top1, "plain": plain_top1},
            },
            "knn_ratio": ratio,
            "knn_rss_ratio": rss_ratio,
            "target": TARGET,
            "meets_target": ratio <= TARGET,
        },
    )
    for name, row in startup.items():
        print(
            f"{name:18s} {row['median_s']:.3f} s ({row['median_cpu_s']:.3f} CPU s) "
            f"{row['peak_rss_mib']:6.1f} MiB"
        )
    for name, row in knn.items():
        print(f"{name:28s} {row['median_s']:.2f} s  {row['peak_rss_mib']:6.1f} MiB")
    print(
        f"isd-knn / plain: {ratio:.3f} (time), {rss_ratio:.2f} (peak RSS); top-1 {ours_top1} vs {plain_top1}"
    )
    print(f"written to {path}")


if __name__ == "__main__":
    main()
