"""``auto`` on disk against ``auto`` in RAM, on a real bank: what the on-disk fallback costs.

Both indices are ``build_index(bank, factory="auto", memory_budget=B)``: with the RAM budget (default
40 MiB) the planner keeps an index in RAM; with the small budget (default 4 MiB) only a short PQ code
fits in RAM, it misses the recall target on the planner's sample, and ``auto`` puts an ``IVF{c},SQ8``'s
lists on disk (``index.ivfdata``, memory-mapped). Each step runs in its own process, so that its peak
memory is its own (``RssAnon`` sampled every 50 ms, as in ``ondisk_index.py``).

Search: the 1,000 held-out bank rows the builds tuned on (seed 0), top 10, one batch, one FAISS thread;
queries/s per CPU second of the process and per wall second, the least of 5 runs; the on-disk index
also with its page cache dropped (``posix_fadvise(DONTNEED)`` on ``index.ivfdata``) before each of 3
runs (cold; ``device_read_bytes_per_run`` says whether the lists were read from the device again), and
with its lists read into RAM (the same index without the disk). Memory: anonymous RSS above the
interpreter's once the index is open and searched (``anon_rss_while_searching_bytes``), before the
recall check reads the bank. Recall: held-out recall@10 as the build measured it
(``SearchIndex.recall``).

    python benchmarks/ondisk_auto.py cifar60k-smallcnn          # after benchmarks/oracle_banks.py
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from ondisk_index import PeakAnon, drop_cache, memory, read_bytes  # noqa: E402
from oracle_banks import BANKS, OUT  # noqa: E402

K, QUERIES, SEED, RUNS, COLD_RUNS = 10, 1000, 0, 5, 3


def stage_build(bank: Path, out: Path, budget: int) -> dict:
    import faiss

    from isdretrieve.index.build import build_index

    faiss.omp_set_num_threads(1)
    anon, started = PeakAnon(), time.perf_counter()
    manifest = build_index(bank, out, factory="auto", memory_budget=budget, k=K, queries=QUERIES)
    wall = time.perf_counter() - started
    return {"wall_s": round(wall, 1), **memory(anon), "manifest": json.loads(manifest.to_json())}


def _timed(index, queries: np.ndarray, runs: int, before_each=None) -> dict:
    cpu, wall, read = [], [], 0
    for _ in range(runs):
        if before_each is not None:
            before_each()
        started, started_cpu, bytes_before = time.perf_counter(), time.process_time(), read_bytes()
        index.search(queries, K)
        cpu.append(time.process_time() - started_cpu)
        wall.append(time.perf_counter() - started)
        read += read_bytes() - bytes_before
    return {
        "qps": round(len(queries) / min(cpu), 1),
        "qps_wall": round(len(queries) / min(wall), 1),
        "device_read_bytes_per_run": read // runs,
    }


def stage_search(directory: Path, mode: str) -> dict:
    """Recall, queries/s and memory of the index in ``directory``; ``mode``: "warm", "cold" (page cache
    dropped before each run) or "in-ram" (an on-disk index's lists read into memory first)."""
    import faiss

    from isdretrieve.index.ondisk import IVFDATA_FILE, load_in_ram
    from isdretrieve.index.recall import heldout_queries
    from isdretrieve.index.search import SearchIndex

    faiss.omp_set_num_threads(1)
    anon = PeakAnon()
    with SearchIndex.open(directory) as opened:
        queries = heldout_queries(opened.bank, QUERIES, SEED)[1]
        index = opened._index  # the FAISS index itself: the same search the service makes, unwrapped
        if mode == "in-ram":
            load_in_ram(index)
        if mode == "cold":
            timed = _timed(index, queries, COLD_RUNS, lambda: drop_cache(directory / IVFDATA_FILE))
        else:
            index.search(queries, K)  # warm-up
            timed = _timed(index, queries, RUNS)
        searching = PeakAnon.now() - anon.baseline  # the index and the queries, before the recall check
        recall = opened.recall(k=K, queries=QUERIES, seed=SEED)
    return {"recall": recall, **timed, "anon_rss_while_searching_bytes": searching, **memory(anon)}


def child(*argv: str) -> dict:
    done = subprocess.run([sys.executable, __file__, *argv], stdout=subprocess.PIPE, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    from isdretrieve.util.sizes import parse_size

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("name", choices=BANKS)
    parser.add_argument("--ram-budget", default="40MB")
    parser.add_argument("--disk-budget", default="4MB")
    parser.add_argument("--stage", default="", help=argparse.SUPPRESS)
    parser.add_argument("--dir", default="", help=argparse.SUPPRESS)
    parser.add_argument("--budget", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--mode", default="warm", help=argparse.SUPPRESS)
    args = parser.parse_args()
    bank, work = OUT / f"{args.name}.h5", OUT / f"{args.name}-ondisk"
    if args.stage == "build":
        print(json.dumps(stage_build(bank, Path(args.dir), args.budget)))
        return
    if args.stage == "search":
        print(json.dumps(stage_search(Path(args.dir), args.mode)))
        return
    from _harness import machine_info, write_result

    started, machine_at_start = time.perf_counter(), machine_info()
    result: dict = {"bank": args.name, "machine_at_start": machine_at_start}
    for key, budget in (("ram", args.ram_budget), ("disk", args.disk_budget)):
        directory = work / key
        built = child(
            args.name, "--stage", "build", "--dir", str(directory), "--budget", str(parse_size(budget))
        )
        result[f"build_{key}"] = built | {"budget": budget}
        modes = ("warm", "cold", "in-ram") if built["manifest"]["kind"] == "ondisk" else ("warm",)
        for mode in modes:
            searched = child(args.name, "--stage", "search", "--dir", str(directory), "--mode", mode)
            result[f"search_{key}_{mode}"] = searched
    ram, disk = result["search_ram_warm"], result.get("search_disk_warm")
    if disk is None:
        raise SystemExit(f"{args.disk_budget} did not put the index on disk: {result['build_disk']}")
    result["ratios"] = {
        "qps_disk_warm_over_ram": round(disk["qps"] / ram["qps"], 3),
        "qps_disk_cold_over_ram": round(result["search_disk_cold"]["qps"] / ram["qps"], 3),
        "qps_disk_warm_over_its_lists_in_ram": round(disk["qps"] / result["search_disk_in-ram"]["qps"], 3),
        "anon_rss_while_searching_disk_over_ram": round(
            disk["anon_rss_while_searching_bytes"] / ram["anon_rss_while_searching_bytes"], 3
        ),
    }
    result["total_s"] = round(time.perf_counter() - started, 1)
    print(write_result(f"ondisk_auto_{args.name}", result))


if __name__ == "__main__":
    main()
