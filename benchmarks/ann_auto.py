"""``auto`` on 500k (or ``--rows``) real features: the index it picks under a memory budget, vs exact.

Bank: the small CNN's features of 10 strong augmented views of each CIFAR-10 train image (500,000 x 256,
L2-normalised), from ``runs/cifar-small/encoder.pt`` when it exists, else a seeded random-init small_cnn;
``--rows 1000000`` takes 20 views per image and writes ``ann_auto_1000000.json`` (Flat 977 MiB).
Index: ``build_index(factory="auto")`` with a 256 MiB budget, which rules out Flat (500k x 256 x 4 B =
488 MiB) and HNSW32 (610 MiB); recall target 0.95 at k=10, measured on 1,000 bank rows against exact search.
Exact baseline: FAISS ``IndexFlatIP`` over the same features, searched with the same queries.

    .venv/bin/python benchmarks/ann_auto.py        # writes benchmarks/results/ann_auto.json
    .venv/bin/python benchmarks/ann_auto.py --rows 1000000   # about 2x the 500k run's time
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import faiss
import numpy as np
import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

from _harness import CIFAR_TARBALL, cifar_root, machine_info, write_result  # noqa: E402

from isdretrieve.bank.arrays import write_bank
from isdretrieve.data.augment import augment_views, view_config
from isdretrieve.data.open import open_dataset
from isdretrieve.encoder import encoder_fingerprint
from isdretrieve.files.encoder_header import IMAGENET_MEAN, IMAGENET_STD, EncoderHeader
from isdretrieve.index.build import build_index
from isdretrieve.index.recall import recall_at_k
from isdretrieve.index.search import SearchIndex
from isdretrieve.models.backbones import build_backbone
from isdretrieve.models.checkpoints import load_backbone

ENCODER = REPO / "runs" / "cifar-small" / "encoder.pt"
BATCH, SEED = 1024, 0
BUDGET = 256 * 2**20
K, TARGET, QUERIES, REPEATS = 10, 0.95, 1000, 3


def cifar_train() -> tuple[torch.Tensor, torch.Tensor, str]:
    """All 50,000 CIFAR-10 train images (uint8) and labels, unpacking the shared JPEG copy if needed."""
    root = cifar_root()
    if root is None:
        raise SystemExit(f"the shared CIFAR-10 copy is missing: {CIFAR_TARBALL}")
    spec = f"folder:{root.relative_to(REPO)},split=train"
    dataset = open_dataset(spec)
    return dataset.load_all(num_workers=2), dataset.labels, spec


def encoder() -> tuple[torch.nn.Module, EncoderHeader, str]:
    """The trained small CNN if its export exists, else a random-init one (seed 0); and which it is."""
    if ENCODER.is_file():
        model, header = load_backbone(ENCODER)
        return model.eval(), header, f"trained small_cnn ({ENCODER.relative_to(REPO)})"
    torch.manual_seed(SEED)
    header = EncoderHeader(
        "small_cnn", False, 256, 32, IMAGENET_MEAN, IMAGENET_STD, source="random-init seed 0"
    )
    which = "random-init small_cnn (seed 0; runs/cifar-small/encoder.pt not found)"
    return build_backbone("small_cnn").eval(), header, which


@torch.inference_mode()
def view_features(model: torch.nn.Module, images: torch.Tensor, count: int) -> np.ndarray:
    """[count * N, D] L2-normalised features of ``count`` views per image; row v * N + i is view v of i."""
    n, cfg = len(images), view_config("strong", "cifar")
    generator = torch.Generator().manual_seed(SEED)
    out = np.empty((count * n, model.feature_dim), dtype=np.float32)
    for v in range(count):
        for start in range(0, n, BATCH):
            views = augment_views(images[start : start + BATCH], cfg, generator)
            rows = slice(v * n + start, v * n + start + len(views))
            out[rows] = F.normalize(model(views), dim=1).numpy()
    return out


def best_search_seconds(search, queries: np.ndarray) -> tuple[float, np.ndarray]:
    """Median wall time over REPEATS of one batched search of all queries, and its rows."""
    times, rows = [], None
    for _ in range(REPEATS):
        started = time.perf_counter()
        rows = search(queries)
        times.append(time.perf_counter() - started)
    return statistics.median(times), rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=500_000, help="bank rows, a multiple of 50,000")
    parser.add_argument("--threads", type=int, default=2, help="torch and FAISS threads")
    args = parser.parse_args()
    os.chdir(REPO)  # the data SPEC is relative to the repository
    torch.set_num_threads(args.threads)
    faiss.omp_set_num_threads(args.threads)
    begun, machine_at_start = time.perf_counter(), machine_info()
    images, labels, spec = cifar_train()
    if args.rows <= 0 or args.rows % len(images):
        raise SystemExit(f"--rows must be a positive multiple of {len(images)}, got {args.rows}")
    views, default = args.rows // len(images), args.rows == 500_000
    out = REPO / "indices" / f"cifar10-views-{args.rows // 1000}k"
    model, header, which = encoder()
    features = view_features(model, images, views)
    extract_seconds = time.perf_counter() - begun
    print(f"{len(features):,} x {features.shape[1]} features from {which} in {extract_seconds:.0f} s")

    out.mkdir(parents=True, exist_ok=True)
    bank = write_bank(
        out / "bank.h5",
        features,
        labels=labels.repeat(views).numpy(),
        indices=np.tile(np.arange(len(images)), views),
        fingerprint=encoder_fingerprint(model, header),
        encoder=header,
        transform=f"{views} strong cifar views per image, seed {SEED}",
        data_spec=spec,
    )
    manifest = build_index(
        bank,
        out,
        factory="auto",
        memory_budget=BUDGET,
        recall_target=TARGET,
        k=K,
        queries=QUERIES,
        progress=True,
    )
    print(manifest.to_json())

    with SearchIndex.open(out) as index:
        rows = np.sort(np.random.default_rng(SEED).choice(len(features), QUERIES, replace=False))
        queries = features[rows]  # the rows build_index tuned on (same seed)
        auto_seconds, auto_rows = best_search_seconds(lambda q: index.search(q, K)[1], queries)

    started = time.perf_counter()
    flat = faiss.IndexFlatIP(features.shape[1])
    flat.add(features)
    flat_build = time.perf_counter() - started
    flat_seconds, exact_rows = best_search_seconds(lambda q: flat.search(q, K)[1], queries)

    result = {
        "protocol": (
            f"recall@{K} = mean overlap of the top-{K} rows with exact inner-product search, over "
            f"{QUERIES} bank rows as queries (self-matches count on both sides); QPS = {QUERIES} queries "
            f"in one batch / median of {REPEATS} runs; {torch.get_num_threads()} threads"
        ),
        "features": {
            "count": len(features),
            "dim": int(features.shape[1]),
            "encoder": which,
            "data": f"{spec}, {views} strong cifar views per image",
            "extract_seconds": round(extract_seconds, 1),
        },
        "memory_budget_bytes": BUDGET,
        "auto": {
            "factory": manifest.factory,
            "reason": manifest.reason,
            "params": manifest.params,
            "recall": manifest.recall,
            "recall_rechecked": recall_at_k(auto_rows, exact_rows),
            "recall_target": TARGET,
            "train_rows": manifest.train_rows,
            "build_seconds": manifest.build_seconds,
            "tune_seconds": manifest.tune_seconds,
            "index_bytes": manifest.index_bytes,
            "qps": round(QUERIES / auto_seconds, 1),
        },
        "exact_flat": {
            "factory": "Flat",
            "recall": 1.0,
            "build_seconds": round(flat_build, 3),
            "index_bytes": features.nbytes,
            "qps": round(QUERIES / flat_seconds, 1),
        },
        "machine_at_start": machine_at_start,
        "total_seconds": round(time.perf_counter() - begun, 1),
    }
    print(write_result("ann_auto" if default else f"ann_auto_{args.rows}", result))


if __name__ == "__main__":
    main()
