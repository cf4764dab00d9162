"""An on-disk IVF index over 10M x 128 vectors, built and searched under a RAM budget smaller than the index.

Data: a Gaussian mixture (``--centres`` unit centres, per-dimension noise ``--noise``, rows L2-normalised),
generated in blocks straight into a bank.h5 under ``--data`` (outside the repository; deleted at the end
unless ``--keep``). Queries: ``--queries`` fresh draws from the same mixture, not in the bank (held out),
their ground truth by exact inner-product search over the whole bank in blocks.

Measured, each step in its own child process (so that its peak RSS is its own):

- build: ``build_index(..., factory=IVF{lists},SQ8, on_disk=True, memory_budget=BUDGET)``: train once,
  fill shards, merge into ``index.ivfdata``, tune nprobe on held-out bank rows; wall time, peak RSS
  (``ru_maxrss``, which counts mapped file pages too) and peak anonymous RSS (``RssAnon`` sampled every
  50 ms: the memory the process cannot hand back to the page cache);
- baseline: the on-disk index's trained quantizer and SQ8 ranges, emptied into in-RAM lists and filled
  with the first ``--subset`` rows (same factory, same training, same nprobe values);
- search: QPS (one batch of all queries, median of 3 when warm) and recall@10 at each nprobe for
  (a) the on-disk index, page cache cold: the index is closed and ``index.ivfdata``'s pages are dropped
  with ``posix_fadvise(POSIX_FADV_DONTNEED)`` before every timed run (bytes read from the device are
  recorded from ``/proc/self/io``); (b) the on-disk index, page cache warm; (c) the same index with its
  lists read into RAM; (d) that in-RAM baseline over the first 1M rows, its recall against exact
  search over those 1M rows.

    python benchmarks/ondisk_index.py --rows 10000000          # about 25 min on 2 cores
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
def stage_generate(a: argparse.Namespace) -> dict:
    """bank.h5 (rows), bank_1m.h5 (the first --subset rows), queries.npy, truth.npy, truth_1m.npy."""
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

        write_bank_blocks(data / "bank_1m.h5", a.subset, a.dim, first(a.subset), fingerprint="mixture-subset")
        queries = draws(a.queries, np.random.default_rng(a.seed + 2))
        queries /= np.linalg.norm(queries, axis=1, keepdims=True)
        np.save(data / "queries.npy", queries)
        started = time.perf_counter()
        np.save(data / "truth.npy", bank_exact_search(bank, queries, a.k)[1])
        truth_s = time.perf_counter() - started
    with FeatureBank.open(data / "bank_1m.h5") as bank:
        np.save(data / "truth_1m.npy", bank_exact_search(bank, queries, a.k)[1])
    (data / "data.json").write_text(json.dumps(data_settings(a)))
    return {"generate_s": round(generate_s, 1), "ground_truth_s": round(truth_s, 1)}


def data_settings(a: argparse.Namespace) -> dict:
    """What the generated files depend on (a --reuse run checks them)."""
    keys = ("rows", "dim", "centres", "noise", "subset", "queries", "k", "seed")
    return {key: getattr(a, key) for key in keys}


def stage_build(a: argparse.Namespace) -> dict:
    import faiss

    from isdretrieve.index.build import build_index

    faiss.omp_set_num_threads(a.threads)
    on_disk = a.which == "ondisk"
    if not on_disk:
        return build_ram_baseline(a)
    bank = Path(a.data) / "bank.h5"
    anon = PeakAnon()
    started = time.perf_counter()
    manifest = build_index(
        bank,
        Path(a.data) / a.which,
        factory=f"IVF{a.lists},SQ8",
        on_disk=on_disk,
        memory_budget=a.budget if on_disk else None,
        queries=a.tune_queries,
        k=a.k,
        progress=True,
    )
    wall = time.perf_counter() - started
    return {"wall_s": round(wall, 1), **memory(anon), "manifest": json.loads(manifest.to_json())}


def build_ram_baseline(a: argparse.Namespace) -> dict:
    """The in-RAM IVF over the first --subset rows with the on-disk index's trained quantizer and SQ8
    ranges (the same parameters, not only the same factory), written as an index directory."""
    import faiss

    from isdretrieve.files.bank import FeatureBank
    from isdretrieve.files.manifest import BANK_FILE, INDEX_FILE, MANIFEST_FILE, IndexManifest
    from isdretrieve.index.build import _place_bank
    from isdretrieve.index.search import SearchIndex

    data, anon = Path(a.data), PeakAnon()
    out = data / "ram"
    out.mkdir(exist_ok=True)
    with SearchIndex.open(data / "ondisk") as ondisk:
        index = ondisk._index
        ivf = faiss.extract_index_ivf(index)
        lists = faiss.ArrayInvertedLists(ivf.nlist, ivf.code_size)
        ivf.replace_invlists(lists, True)  # emptied, in RAM; the index owns the new lists
        lists.this.disown()
        index.ntotal = ivf.ntotal = 0
        manifest = ondisk.manifest
    started = time.perf_counter()
    with FeatureBank.open(data / "bank_1m.h5") as bank:
        for start in range(0, len(bank), 1 << 17):
            index.add(bank.features(start, min(start + (1 << 17), len(bank))))
        fingerprint, n = bank.fingerprint, len(bank)
    add_s = time.perf_counter() - started
    faiss.write_index(index, str(out / INDEX_FILE))
    _place_bank(data / "bank_1m.h5", out / BANK_FILE)
    baseline = IndexManifest(
        factory=manifest.factory,
        params=manifest.params,
        bank_fingerprint=fingerprint,
        count=n,
        dim=manifest.dim,
        recall_k=a.k,
        recall=float("nan"),  # measured by the search stage on the held-out queries
        recall_queries=0,
        recall_target=manifest.recall_target,
        build_seconds=round(add_s, 3),
        tune_seconds=0.0,
        index_bytes=(out / INDEX_FILE).stat().st_size,
        gpu=False,
        reason="benchmark baseline: the on-disk index's trained quantizer, lists in RAM",
    )
    (out / MANIFEST_FILE).write_text(baseline.to_json())
    return {"add_s": round(add_s, 1), **memory(anon), "index_bytes": baseline.index_bytes}


def _measure(index, queries: np.ndarray, truth: np.ndarray, k: int, repeat: int) -> dict:
    from isdretrieve.index.recall import recall_at_k

    runs, found = [], None
    for _ in range(repeat):
        started = time.perf_counter()
        found = index.search(queries, k)[1]
        runs.append(time.perf_counter() - started)
    seconds = statistics.median(runs)
    return {"qps": round(len(queries) / seconds, 1), "seconds": runs, "recall": recall_at_k(found, truth)}


def stage_search(a: argparse.Namespace) -> dict:
    """QPS and recall@k at each nprobe, for --which ondisk-cold, ondisk-warm, ondisk-in-ram or ram-1m."""
    import faiss

    from isdretrieve.index.ondisk import IVFDATA_FILE, load_in_ram
    from isdretrieve.index.search import SearchIndex

    faiss.omp_set_num_threads(a.threads)
    data = Path(a.data)
    queries = np.load(data / "queries.npy")
    truth = np.load(data / ("truth_1m.npy" if a.which == "ram-1m" else "truth.npy"))
    directory = data / ("ram" if a.which == "ram-1m" else "ondisk")
    anon, rows = PeakAnon(), []
    for nprobe in a.nprobes:
        if a.which == "ondisk-cold":
            drop_cache(directory / IVFDATA_FILE)
        before = read_bytes()
        with SearchIndex.open(directory) as index:
            if a.which == "ondisk-in-ram":
                load_in_ram(index._index)
            index._index.nprobe = nprobe
            if a.which in ("ondisk-warm", "ondisk-in-ram", "ram-1m"):
                index.search(queries, a.k)  # warm-up
            row = _measure(index, queries, truth, a.k, 1 if a.which == "ondisk-cold" else 3)
        del index  # unmap the lists, so that the next cold run's page drop is not blocked by our mapping
        gc.collect()
        rows.append({"nprobe": nprobe, **row, "device_read_bytes": read_bytes() - before})
    return {"runs": rows, **memory(anon)}


# -------------------------------------------------------------------------------------------- main
def child(a: argparse.Namespace, stage: str, which: str = "") -> dict:
    """Run one stage in a fresh interpreter; its JSON result is the last line of its stdout."""
    argv = [sys.executable, __file__, "--stage", stage, "--which", which, *a.passthrough]
    done = subprocess.run(argv, stdout=subprocess.PIPE, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    from isdretrieve.util.sizes import parse_size

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=10_000_000)
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--centres", type=int, default=8192, help="Gaussian mixture components.")
    p.add_argument("--noise", type=float, default=0.1, help="Per-dimension noise around a centre.")
    p.add_argument("--lists", type=int, default=4096, help="IVF lists of both indices.")
    p.add_argument("--subset", type=int, default=1_000_000, help="Rows of the in-RAM baseline.")
    p.add_argument("--budget", default="512M", help="RAM budget of the on-disk build.")
    p.add_argument("--queries", type=int, default=300, help="Held-out queries (fresh mixture draws).")
    p.add_argument("--tune-queries", type=int, default=300, help="Bank rows the build tunes nprobe on.")
    p.add_argument("--nprobes", default="16,32,64,128,256")
    p.add_argument("-k", type=int, default=10)
    p.add_argument("--threads", type=int, default=1, help="FAISS threads (2 stall on a loaded 2-core VM).")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data", default="/tmp/isd-ondisk-bench", help="Scratch folder (outside the repo).")
    p.add_argument("--keep", action="store_true", help="Keep the scratch folder.")
    p.add_argument("--reuse", action="store_true", help="Reuse the data a --keep run generated in --data.")
    p.add_argument("--stage", default="", help=argparse.SUPPRESS)
    p.add_argument("--which", default="", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    a.passthrough = [x for x in (argv if argv is not None else sys.argv[1:])]
    for flag in ("--stage", "--which"):  # the parent's own stage flags are not passed on
        while flag in a.passthrough:
            i = a.passthrough.index(flag)
            del a.passthrough[i : i + 2]
    a.budget = parse_size(a.budget)
    a.nprobes = [int(x) for x in a.nprobes.split(",")]
    return a


def main() -> None:
    a = parse()
    if a.stage:
        stage = {"generate": stage_generate, "build": stage_build, "search": stage_search}[a.stage]
        print(json.dumps(stage(a)))
        return
    import faiss
    from _harness import write_result

    from isdretrieve.index.plan import choose_index

    data = Path(a.data)
    data.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    name = "ondisk_index" if a.rows == 10_000_000 else f"ondisk_index_{a.rows}"
    steps = [
        ("generate", "generate", ""),
        ("build_ondisk", "build", "ondisk"),
        ("build_ram_1m", "build", "ram"),
    ]
    steps += [
        (w.replace("-", "_"), "search", w) for w in ("ondisk-cold", "ondisk-warm", "ondisk-in-ram", "ram-1m")
    ]
    result: dict = {"complete": False}
    try:
        for key, stage, which in steps:
            reusable = (data / "data.json").is_file() and json.loads((data / "data.json").read_text())
            if stage == "generate" and a.reuse and reusable == data_settings(a):
                result[key] = {"reused": "data generated by an earlier run of the same settings"}
                continue
            result[key] = child(a, stage, which)
            write_result(name, result | {"total_s": round(time.perf_counter() - started, 1)})  # partial
    finally:
        if not a.keep:
            shutil.rmtree(data, ignore_errors=True)
    result["complete"] = True
    index_bytes = result["build_ondisk"]["manifest"]["index_bytes"]
    ratios = []
    for cold, warm, ram, sub in zip(
        *(result[w]["runs"] for w in ("ondisk_cold", "ondisk_warm", "ondisk_in_ram", "ram_1m")), strict=True
    ):
        ratios.append(
            {
                "nprobe": cold["nprobe"],
                "cold_over_in_ram_10m": round(cold["qps"] / ram["qps"], 3),
                "warm_over_in_ram_10m": round(warm["qps"] / ram["qps"], 3),
                "cold_over_ram_1m": round(cold["qps"] / sub["qps"], 3),
                "warm_over_ram_1m": round(warm["qps"] / sub["qps"], 3),
            }
        )
    result["qps_ratios_same_nprobe"] = ratios
    result["settings"] = {
        "rows": a.rows,
        "dim": a.dim,
        "centres": a.centres,
        "noise": a.noise,
        "factory": f"IVF{a.lists},SQ8",
        "subset_rows": a.subset,
        "ram_budget_bytes": a.budget,
        "index_bytes": index_bytes,
        "budget_over_index": round(a.budget / index_bytes, 3),
        "auto_choice_at_budget": choose_index(a.rows, a.dim, memory_budget=a.budget).factory,
        "queries": a.queries,
        "k": a.k,
        "faiss_threads": a.threads,
        "faiss": faiss.__version__,
        "machine_note": "2-core CPU VM shared with four other jobs during the run",
    }
    result["total_s"] = round(time.perf_counter() - started, 1)
    print(f"wrote {write_result(name, result)}")


if __name__ == "__main__":
    main()
