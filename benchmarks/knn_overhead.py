"""k-NN overhead: ``knn_evaluate`` (open banks, search, vote, top-1/top-5, per-class) vs the raw FAISS
search it performs, on 10k queries × 50k bank rows × 512 dimensions. Target: ratio ≤ 1.2 on CPU.

Features are real but cheap to make: CIFAR-10 (JPEG q75 copy) pixels projected to 512-d with a fixed
random Gaussian matrix and L2-normalised (train split as the bank, test split as queries); digits pixels
(tiled to 50k / 10k rows) when the copy is absent. Both sides search the same exact ``Flat`` index.

With a CUDA device the run adds ``figures.gpu`` (the CPU part is unchanged): our exact search on the GPU
(``SearchIndex.search`` of the same queries, k=200, on the Flat index: GPU FAISS when installed, else the
torch GEMM + top-k path) as TFLOP/s (2·Q·N·D per search) against a plain fp32 torch matmul of the same
[Q,D] x [D,N] shape on data already on the device, timed in the same run.

    python benchmarks/knn_overhead.py [--repeat 3]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent)]
from _harness import cifar_root, median_time, summary, write_result  # noqa: E402

from isdretrieve.bank.arrays import write_bank
from isdretrieve.data.open import open_dataset
from isdretrieve.evaluate.knn_eval import knn_evaluate, open_test_bank
from isdretrieve.index.build import build_index
from isdretrieve.index.search import SearchIndex

DIM, TARGET = 512, 1.2


def projected(spec: str, rows: int, projection: torch.Tensor) -> tuple[np.ndarray, np.ndarray, str]:
    ds = open_dataset(spec)
    x = ds.load_all(num_workers=2).flatten(1).float() / 255
    take = torch.arange(rows) % len(ds)  # tiles digits up to the size; CIFAR splits are already that size
    feats = torch.nn.functional.normalize(x[take] @ projection[: x.shape[1]], dim=1)
    return feats.numpy(), ds.labels[take].numpy(), spec


def gpu_search(index_dir: Path, bank: np.ndarray, queries: np.ndarray, repeat: int) -> dict:
    """Our GPU exact search vs the device's fp32 GEMM rate on the same shape (median of ``repeat``)."""
    flops = 2 * len(queries) * len(bank) * bank.shape[1]

    def median_s(fn) -> float:  # the warm-up loads the bank onto the GPU and runs cuBLAS's heuristics
        return median_time(fn, torch.device("cuda"), repeat)

    def gemm() -> float:
        """The device's fp32 GEMM on the same shape; its operands are freed on return."""
        xq, xb = torch.from_numpy(queries).cuda(), torch.from_numpy(bank).cuda()
        precision = torch.get_float32_matmul_precision()
        torch.set_float32_matmul_precision("highest")  # fp32, as exact_search_torch uses (no TF32)
        try:
            with torch.no_grad():
                return median_s(lambda: xq @ xb.T)
        finally:
            torch.set_float32_matmul_precision(precision)

    gemm_s = gemm()
    with SearchIndex.open(index_dir) as index:
        path = "torch GEMM + topk" if index._torch_exact else "CPU FAISS (no GPU path taken)"
        path = "GPU FAISS" if index._gpu_index is not None else path
        ours_s = median_s(lambda: index.search(queries, 200))
    return {
        "device": torch.cuda.get_device_name(0),
        "path": path,
        "flops_per_search": flops,
        "ours_s": ours_s,
        "ours_tflops": flops / ours_s / 1e12,
        "gemm_fp32_s": gemm_s,
        "gemm_fp32_tflops": flops / gemm_s / 1e12,
        "fraction_of_gemm": gemm_s / ours_s,
        "ours_counts": "query normalisation on the host, H2D of queries, GEMM, top-200, D2H of results",
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    projection = torch.randn(3 * 32 * 32, DIM, generator=torch.Generator().manual_seed(0))
    root = cifar_root()
    has_cifar = root is not None
    specs = ("digits", "digits,split=test")
    if has_cifar:
        specs = (f"folder:{root},split=train", f"folder:{root},split=test")
    train = projected(specs[0], 50_000, projection)
    test = projected(specs[1], 10_000, projection)
    with tempfile.TemporaryDirectory() as tmp:
        for name, (feats, labels, _) in (("train", train), ("test", test)):
            write_bank(Path(tmp) / f"{name}.h5", feats, labels=labels, fingerprint="knn-benchmark")
        build_index(Path(tmp) / "train.h5", Path(tmp) / "train", factory="Flat")
        raw, ours = [], []
        for _ in range(args.repeat):  # alternate, so background load hits both sides alike
            with SearchIndex.open(Path(tmp) / "train") as index:
                t0 = time.perf_counter()
                index.search(test[0], 200)
                raw.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            with (
                SearchIndex.open(Path(tmp) / "train") as index,
                open_test_bank(Path(tmp) / "test.h5") as bank,
            ):
                report = knn_evaluate(index, bank, ks=(20, 200), temperature=0.1)
            ours.append(time.perf_counter() - t0)
        gpu = gpu_search(Path(tmp) / "train", train[0], test[0], 10) if torch.cuda.is_available() else None
    raw_s, ours_s = summary(raw), summary(ours)
    ratio = ours_s["median_s"] / raw_s["median_s"]
    figures = {"raw": raw_s, "ours": ours_s, "top1_k20": report.results[0].top1}
    if gpu is not None:
        figures["gpu"] = gpu
    path = write_result(
        "knn_overhead",
        {
            "protocol": {
                "data": "CIFAR-10 (JPEG q75 copy)" if has_cifar else "digits (tiled)",
                "features": f"pixels x fixed Gaussian projection to {DIM}-d, L2-normalised",
                "queries": len(test[0]),
                "bank": len(train[0]),
                "dim": DIM,
                "index": "Flat (exact, inner product), faiss CPU",
                "knn": "k=20 and k=200 from one search of 200, exp weighting, T=0.1, top-1/top-5/per-class",
                "ours": "SearchIndex.open + open test bank + knn_evaluate (read queries, search, vote)",
                "raw": "SearchIndex.search of the same queries, k=200",
            },
            "figures": figures,
            "ratio": ratio,
            "target": TARGET,
            "meets_target": ratio <= TARGET,
        },
    )
    print(f"raw search {raw_s['median_s']:.2f} s, isd-knn path {ours_s['median_s']:.2f} s: ratio {ratio:.3f}")
    if gpu is not None:
        print(
            f"GPU exact search ({gpu['path']}): {gpu['ours_tflops']:.1f} TFLOP/s vs fp32 GEMM "
            f"{gpu['gemm_fp32_tflops']:.1f} TFLOP/s ({gpu['fraction_of_gemm']:.0%})"
        )
    print(f"written to {path}")


if __name__ == "__main__":
    main()
