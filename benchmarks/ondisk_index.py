"""An on-disk IVF index over 10M x 128 vectors, built and searched under a RAM budget smaller than the
index, compared at equal recall with in-RAM IVF indices.

Data: a Gaussian mixture (``--centres`` unit centres, per-dimension noise ``--noise``, rows L2-normalised),
generated in blocks straight into a bank.h5 under ``--data`` (outside the repository; deleted at the end
unless ``--keep``). Queries: ``--queries`` fresh draws from the same mixture, not in the bank (held out),
their ground truth by exact inner-product search over the whole bank in blocks, and over the first
``--subset`` rows for the scaled baseline.

Measured, each step in its own child process (so that its peak RSS is its own):

- build: ``build_index(..., factory=IVF{lists},SQ8, on_disk=True, memory_budget=BUDGET)``: train once,
  fill shards, merge into ``index.ivfdata``, tune nprobe on held-out bank rows; wall time, peak RSS
  (``ru_maxrss``, which counts mapped file pages too) and peak anonymous RSS (``RssAnon`` sampled every
  50 ms: the memory the process cannot hand back to the page cache);
- scaled baseline: ``build_index(first --subset rows, factory=IVF{m},SQ8)`` in RAM, with
  m = round(lists x subset / rows) (the nearest integer), so that its lists hold as many rows on
  average as the on-disk index's: at the same nprobe both scan about as many codes. It is trained on
  its own rows (the library's default sample) and tuned by the library like any in-RAM index;
- target: for each index, the smallest nprobe whose recall@k on the held-out queries reaches
  ``--recall-target`` (the library's nprobe steps 1, 2, 3, 4, 6, 8, 12, ... then bisection between the
  last step below the target and the first at or above it; recall only, untimed);
- search: QPS (one batch of all queries, median of 3 when warm) and recall@k at each nprobe of
  ``--nprobes`` (up to the index's list count) and at the target nprobe, for (a) the on-disk index, page
  cache cold: the index is closed and ``index.ivfdata``'s pages are dropped with
  ``posix_fadvise(POSIX_FADV_DONTNEED)`` before every timed run (bytes read from the device are recorded
  from ``/proc/self/io``); (b) the on-disk index, page cache warm; (c) the same index with its lists read
  into RAM; (d) the scaled in-RAM baseline, its recall against exact search over its own rows.

``qps_at_target`` compares the four at equal recall (each at its own target nprobe);
``qps_ratios_same_nprobe`` at equal nprobe, as the curves do.

    python benchmarks/ondisk_index.py --rows 10000000          # about an hour on a loaded 2-core VM
    python benchmarks/ondisk_index.py --rows 2000000 --lists 1024 --subset 250000 --budget 64M
    python benchmarks/ondisk_index.py --rows 200000 --lists 256 --subset 50000 --budget 8M   # a smoke run
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

GiB, MiB = 2**30, 2**20


# ------------------------------------------------------------------------------------------ memory
class PeakAnon:
    """Samples this process's ``RssAnon`` every 50 ms in a thread; ``peak`` in bytes."""

    def __init__(self) -> None:
        self.baseline = self.now()  # after the imports (torch, faiss): what any stage costs
        self.peak, self._stop = 0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    @staticmethod
    def now() -> int:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("RssAnon:"):
                    return int(line.split()[1]) * 1024
        return 0

    def _run(self) -> None:
        while not self._stop.wait(0.05):
            self.peak = max(self.peak, self.now())

    def stop(self) -> int:
        self._stop.set()
        self._thread.join()
        return max(self.peak, self.now())


def read_bytes() -> int:
    """Bytes this process has caused to be read from the storage device (``/proc/self/io``)."""
    with open("/proc/self/io") as f:
        for line in f:
            if line.startswith("read_bytes:"):
                return int(line.split()[1])
    return 0


def drop_cache(path: Path) -> None:
    """Drop ``path``'s clean pages from the page cache (they must not be mapped by anyone)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def memory(anon: PeakAnon) -> dict:
    return {
        "baseline_anon_rss_bytes": anon.baseline,
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "peak_anon_rss_bytes": anon.stop(),
    }


# ------------------------------------------------------------------------------------------- stages
SUBSET_BANK, TRUTH, SUBSET_TRUTH = "bank_subset.h5", "truth.npy", "truth_subset.npy"
SEARCHES = {  # the --which of a search stage: (index folder, ground truth)
    "ondisk-cold": ("ondisk", TRUTH),
    "ondisk-warm": ("ondisk", TRUTH),
    "ondisk-in-ram": ("ondisk", TRUTH),
    "scaled-in-ram": ("scaled", SUBSET_TRUTH),
}
VARIANTS = tuple(which.replace("-", "_") for which in SEARCHES)  # their keys in the result


def scaled_lists(a: argparse.Namespace) -> int:
    """The scaled baseline's list count: ``--lists`` x subset / rows, to the nearest integer."""
    return max(1, round(a.lists * a.subset / a.rows))


def stage_generate(a: argparse.Namespace) -> dict:
    """bank.h5 (rows), bank_subset.h5 (the first --subset rows), queries.npy and both ground truths."""
    from isdretrieve.bank.arrays import write_bank_blocks
    from isdretrieve.files.bank import FeatureBank
    from isdretrieve.index.exact import bank_exact_search

    data = Path(a.data)
    rng = np.random.default_rng(a.seed)
    centres = rng.standard_normal((a.centres, a.dim)).astype(np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)

    def draws(count: int, generator: np.random.Generator) -> np.ndarray:
        x = centres[generator.integers(0, a.centres, count)]
        return x + a.noise * generator.standard_normal((count, a.dim), dtype=np.float32)

    def blocks(total: int, seed: int):
        generator, step = np.random.default_rng(seed), 1 << 18
        for start in range(0, total, step):
            yield draws(min(step, total - start), generator)

    started = time.perf_counter()
    write_bank_blocks(data / "bank.h5", a.rows, a.dim, blocks(a.rows, a.seed + 1), fingerprint="mixture")
    generate_s = time.perf_counter() - started
    with FeatureBank.open(data / "bank.h5") as bank:

        def first(stop: int):
            step = 1 << 18
            for start in range(0, stop, step):
                yield bank.features(start, min(start + step, stop))

        write_bank_blocks(data / SUBSET_BANK, a.subset, a.dim, first(a.subset), fingerprint="mixture-subset")
        queries = draws(a.queries, np.random.default_rng(a.seed + 2))
        queries /= np.linalg.norm(queries, axis=1, keepdims=True)
        np.save(data / "queries.npy", queries)
        started = time.perf_counter()
        np.save(data / TRUTH, bank_exact_search(bank, queries, a.k)[1])
        truth_s = time.perf_counter() - started
    with FeatureBank.open(data / SUBSET_BANK) as bank:
        np.save(data / SUBSET_TRUTH, bank_exact_search(bank, queries, a.k)[1])
    (data / "data.json").write_text(json.dumps(data_settings(a)))
    return {"generate_s": round(generate_s, 1), "ground_truth_s": round(truth_s, 1)}


def data_settings(a: argparse.Namespace) -> dict:
    """What the generated files depend on (a --reuse run checks them)."""
    keys = ("rows", "dim", "centres", "noise", "subset", "queries", "k", "seed")
    return {key: getattr(a, key) for key in keys}


def stage_build(a: argparse.Namespace) -> dict:
    """--which ondisk: the on-disk IVF over the whole bank under --budget; scaled: the in-RAM IVF with
    the scaled list count over the first --subset rows. Both through ``build_index``, tuned on
    ``--tune-queries`` held-out bank rows."""
    import faiss

    from isdretrieve.index.build import build_index

    faiss.omp_set_num_threads(a.threads)
    on_disk = a.which == "ondisk"
    lists = a.lists if on_disk else scaled_lists(a)
    anon = PeakAnon()
    started = time.perf_counter()
    manifest = build_index(
        Path(a.data) / ("bank.h5" if on_disk else SUBSET_BANK),
        Path(a.data) / a.which,
        factory=f"IVF{lists},SQ8",
        on_disk=on_disk,
        memory_budget=a.budget if on_disk else None,
        queries=a.tune_queries,
        k=a.k,
        progress=True,
    )
    wall = time.perf_counter() - started
    return {"wall_s": round(wall, 1), **memory(anon), "manifest": json.loads(manifest.to_json())}


def open_index(a: argparse.Namespace, folder: str, in_ram: bool):
    """The index in ``--data``/``folder`` opened for search, its on-disk lists read into RAM if asked."""
    from isdretrieve.index.ondisk import load_in_ram
    from isdretrieve.index.search import SearchIndex

    index = SearchIndex.open(Path(a.data) / folder)
    if in_ram:
        load_in_ram(index._index)
    return index


def stage_target(a: argparse.Namespace) -> dict:
    """The smallest nprobe whose recall@k on the held-out queries reaches --recall-target, for --which
    ondisk (its lists read into RAM: the same results, faster) or scaled. Recall only, untimed."""
    import faiss

    from isdretrieve.index.faiss_ops import set_params
    from isdretrieve.index.recall import recall_at_k
    from isdretrieve.index.tuning import raise_knob

    faiss.omp_set_num_threads(a.threads)
    data = Path(a.data)
    queries = np.load(data / "queries.npy")
    truth = np.load(data / (TRUTH if a.which == "ondisk" else SUBSET_TRUTH))
    with open_index(a, a.which, in_ram=a.which == "ondisk") as index:

        def recall() -> float:
            return recall_at_k(index.search(queries, a.k)[1], truth)

        tuned = raise_knob(index._index, recall, a.recall_target)
        trace = dict(tuned.trace)
        if not tuned.reached:
            return {"nprobe": None, "best_recall": max(trace.values()), "trace": sorted(trace.items())}
        high = tuned.params["nprobe"]
        low = max((value for value in trace if value < high), default=0)
        while high - low > 1:  # recall grows with nprobe: bisect between the last step below and high
            middle = (low + high) // 2
            set_params(index._index, {"nprobe": middle}, gpu=False)
            trace[middle] = recall()
            low, high = (low, middle) if trace[middle] >= a.recall_target else (middle, high)
    return {"nprobe": high, "recall": trace[high], "trace": sorted(trace.items())}


def _measure(index, queries: np.ndarray, truth: np.ndarray, k: int, repeat: int) -> dict:
    from isdretrieve.index.recall import recall_at_k

    runs, found = [], None
    for _ in range(repeat):
        started = time.perf_counter()
        found = index.search(queries, k)[1]
        runs.append(time.perf_counter() - started)
    seconds = statistics.median(runs)
    return {"qps": round(len(queries) / seconds, 1), "seconds": runs, "recall": recall_at_k(found, truth)}


def timed_search(a: argparse.Namespace, nprobe: int, queries: np.ndarray, truth: np.ndarray) -> dict:
    """One timed search of all queries at ``nprobe`` (median of 3 after a warm-up, once when cold)."""
    from isdretrieve.index.faiss_ops import set_params
    from isdretrieve.index.ondisk import IVFDATA_FILE

    folder, cold = SEARCHES[a.which][0], a.which == "ondisk-cold"
    if cold:
        drop_cache(Path(a.data) / folder / IVFDATA_FILE)
    before = read_bytes()
    with open_index(a, folder, in_ram=a.which == "ondisk-in-ram") as index:
        set_params(index._index, {"nprobe": nprobe}, gpu=False)
        if not cold:
            index.search(queries, a.k)  # warm-up
        row = _measure(index, queries, truth, a.k, 1 if cold else 3)
    del index  # unmap the lists, so that the next cold run's page drop is not blocked by our mapping
    gc.collect()
    return {"nprobe": nprobe, **row, "device_read_bytes": read_bytes() - before}


def stage_search(a: argparse.Namespace) -> dict:
    """QPS and recall@k at each nprobe of --nprobes up to the index's list count, and at --at-nprobe (the
    target's, when one reached it), for --which ondisk-cold, ondisk-warm, ondisk-in-ram or scaled-in-ram."""
    import faiss

    faiss.omp_set_num_threads(a.threads)
    data = Path(a.data)
    queries, truth = np.load(data / "queries.npy"), np.load(data / SEARCHES[a.which][1])
    lists = a.lists if SEARCHES[a.which][0] == "ondisk" else scaled_lists(a)
    anon = PeakAnon()
    runs = [timed_search(a, nprobe, queries, truth) for nprobe in a.nprobes if nprobe <= lists]
    at_target = timed_search(a, a.at_nprobe, queries, truth) if a.at_nprobe else None
    return {"runs": runs, "at_target": at_target, **memory(anon)}


# -------------------------------------------------------------------------------------------- main
def child(a: argparse.Namespace, stage: str, which: str = "", at_nprobe: int | None = None) -> dict:
    """Run one stage in a fresh interpreter; its JSON result is the last line of its stdout."""
    argv = [sys.executable, __file__, "--stage", stage, "--which", which, *a.passthrough]
    argv += ["--at-nprobe", str(at_nprobe)] if at_nprobe else []
    done = subprocess.run(argv, stdout=subprocess.PIPE, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    from isdretrieve.util.sizes import parse_size

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=10_000_000)
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--centres", type=int, default=8192, help="Gaussian mixture components.")
    p.add_argument("--noise", type=float, default=0.1, help="Per-dimension noise around a centre.")
    p.add_argument("--lists", type=int, default=4096, help="IVF lists of the on-disk index.")
    p.add_argument(
        "--subset", type=int, default=1_000_000, help="Rows of the scaled in-RAM baseline (the first ones)."
    )
    p.add_argument("--budget", default="512M", help="RAM budget of the on-disk build.")
    p.add_argument("--queries", type=int, default=300, help="Held-out queries (fresh mixture draws).")
    p.add_argument("--tune-queries", type=int, default=300, help="Bank rows the builds tune nprobe on.")
    p.add_argument("--recall-target", type=float, default=0.95, help="recall@k the indices are compared at.")
    p.add_argument("--nprobes", default="16,32,64,128,256,512", help="The curves' nprobe values.")
    p.add_argument("-k", type=int, default=10)
    p.add_argument("--threads", type=int, default=1, help="FAISS threads (2 stall on a loaded 2-core VM).")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data", default="/tmp/isd-ondisk-bench", help="Scratch folder (outside the repo).")
    p.add_argument("--keep", action="store_true", help="Keep the scratch folder.")
    p.add_argument("--reuse", action="store_true", help="Reuse the data a --keep run generated in --data.")
    for hidden in ("--stage", "--which", "--at-nprobe"):  # set by the parent for its child stages
        p.add_argument(
            hidden, type=int if hidden == "--at-nprobe" else str, default=None, help=argparse.SUPPRESS
        )
    a = p.parse_args(argv)
    a.passthrough = list(argv if argv is not None else sys.argv[1:])
    for flag in ("--stage", "--which", "--at-nprobe"):  # the parent's own stage flags are not passed on
        while flag in a.passthrough:
            i = a.passthrough.index(flag)
            del a.passthrough[i : i + 2]
    if not 0 < a.recall_target <= 1 or not 0 < a.subset <= a.rows:
        p.error("need 0 < --recall-target <= 1 and 0 < --subset <= --rows")
    a.budget = parse_size(a.budget)
    a.nprobes = [int(x) for x in a.nprobes.split(",")]
    return a


def run_steps(a: argparse.Namespace, name: str) -> dict:
    """Every stage in order, each in its own process; the result so far is written after each one."""
    from _harness import write_result

    data = Path(a.data)
    data.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    result: dict = {"complete": False}

    def record(key: str, value: dict) -> None:
        result[key] = value
        write_result(name, result | {"total_s": round(time.perf_counter() - started, 1)})  # partial

    try:
        reusable = (data / "data.json").is_file() and json.loads((data / "data.json").read_text())
        if a.reuse and reusable == data_settings(a):
            result["generate"] = {"reused": "data generated by an earlier run of the same settings"}
        else:
            record("generate", child(a, "generate"))
        record("build_ondisk", child(a, "build", "ondisk"))
        record("build_scaled", child(a, "build", "scaled"))
        for folder in ("ondisk", "scaled"):
            record(f"target_{folder}", child(a, "target", folder))
        for which, (folder, _) in SEARCHES.items():
            record(which.replace("-", "_"), child(a, "search", which, result[f"target_{folder}"]["nprobe"]))
    finally:
        if not a.keep:
            shutil.rmtree(data, ignore_errors=True)
    result["total_s"] = round(time.perf_counter() - started, 1)
    return result


def ratio(top: dict | None, bottom: dict | None) -> float | None:
    """QPS of ``top`` over ``bottom`` (None where either is missing)."""
    return round(top["qps"] / bottom["qps"], 3) if top and bottom else None


def at_target(result: dict, target: float) -> dict:
    """Each variant at its own smallest nprobe reaching the recall target, and their QPS ratios."""
    rows = {key: result[key]["at_target"] for key in VARIANTS}
    block: dict = {"recall_target": target}
    for key, row in rows.items():
        found = result[f"target_{SEARCHES[key.replace('_', '-')][0]}"]
        block[key] = (
            {"nprobe": row["nprobe"], "recall": round(row["recall"], 4), "qps": row["qps"]}
            if row
            else {"nprobe": None, "best_recall": round(found["best_recall"], 4)}
        )
    cold, warm, in_ram, scaled = rows.values()
    block["ratios"] = {
        "cold_over_in_ram": ratio(cold, in_ram),
        "warm_over_in_ram": ratio(warm, in_ram),
        "cold_over_scaled": ratio(cold, scaled),
        "warm_over_scaled": ratio(warm, scaled),
        "in_ram_over_scaled": ratio(in_ram, scaled),
    }
    return block


def same_nprobe(result: dict) -> list[dict]:
    """QPS ratios at each nprobe all four curves have (equal nprobe: about equal codes scanned)."""
    curves = [{row["nprobe"]: row for row in result[key]["runs"]} for key in VARIANTS]
    ratios = []
    for nprobe in sorted(set.intersection(*(set(curve) for curve in curves))):
        cold, warm, in_ram, scaled = (curve[nprobe] for curve in curves)
        ratios.append(
            {
                "nprobe": nprobe,
                "cold_over_in_ram": ratio(cold, in_ram),
                "warm_over_in_ram": ratio(warm, in_ram),
                "cold_over_scaled": ratio(cold, scaled),
                "warm_over_scaled": ratio(warm, scaled),
                "in_ram_over_scaled": ratio(in_ram, scaled),
            }
        )
    return ratios


def settings(a: argparse.Namespace, result: dict, load_at_start: list[float]) -> dict:
    import faiss

    from isdretrieve.index.plan import choose_index

    index_bytes = result["build_ondisk"]["manifest"]["index_bytes"]
    return {
        "rows": a.rows,
        "dim": a.dim,
        "centres": a.centres,
        "noise": a.noise,
        "factory": f"IVF{a.lists},SQ8",
        "scaled_factory": f"IVF{scaled_lists(a)},SQ8",
        "scaled_lists_rule": "round(lists x subset / rows), the nearest integer",
        "mean_list_rows": round(a.rows / a.lists, 1),
        "scaled_mean_list_rows": round(a.subset / scaled_lists(a), 1),
        "subset_rows": a.subset,
        "recall_target": a.recall_target,
        "nprobes": a.nprobes,
        "ram_budget_bytes": a.budget,
        "index_bytes": index_bytes,
        "budget_over_index": round(a.budget / index_bytes, 3),
        "auto_choice_at_budget": choose_index(a.rows, a.dim, memory_budget=a.budget).factory,
        "queries": a.queries,
        "k": a.k,
        "faiss_threads": a.threads,
        "faiss": faiss.__version__,
        "load_average_at_start": load_at_start,
        "machine_note": "2-core CPU VM shared with other jobs (load at the end: machine)",
    }


def main() -> None:
    a = parse()
    if a.stage:
        stage = {
            "generate": stage_generate,
            "build": stage_build,
            "target": stage_target,
            "search": stage_search,
        }
        print(json.dumps(stage[a.stage](a)))
        return
    from _harness import write_result

    name = "ondisk_index" if a.rows == 10_000_000 else f"ondisk_index_{a.rows}"
    load_at_start = [round(x, 2) for x in os.getloadavg()]
    result = run_steps(a, name)
    result["complete"] = True
    result["qps_at_target"] = at_target(result, a.recall_target)
    result["qps_ratios_same_nprobe"] = same_nprobe(result)
    result["settings"] = settings(a, result, load_at_start)
    print(f"wrote {write_result(name, result)}")


if __name__ == "__main__":
    main()
