"""Does ISD hold up on long-tailed data better than MoCo-v2?

Every cell trains the small CNN for the same number of steps at the same batch size on one of two
training sets of 12,406 CIFAR-10 images (JPEG q75 copy):
- ``lt``: CIFAR-10-LT, imbalance ratio 100 (``longtail=100``: 5,000 … 50 images per class);
- ``balanced``: a class-balanced subset of the same size (``balanced=12406``: 1,240–1,241 per class).

Methods: ISD-base and MoCo-v2 in their official form (official MoCo head, shuffle-BN, BYOL's sum loss is
not involved), from the shipped small-CNN CPU recipes; and SePP-ISD on LT with pairs mined by the
LT-trained ISD encoder (seed 0; ``-k 5 --mutual --quantile 0.5``) plus its random-partner control.

Evaluation of every run: weighted k-NN (k=200, T=0.1, exp) of the student backbone's L2-normalised
features, eval transform, the run's own training images as memory and the full balanced 10k test
split as queries; top-1, per-class top-1, and the mean per-class top-1 of the 3 classes with the most
(head) and the 3 with the fewest (tail) LT training images (the same classes for the balanced runs).
Beside it, the same k-NN with the full balanced 50k train split as memory (``full_memory``): with LT
memory a tail query's 200 neighbours are mostly head images whatever the features, so this second
number tells the representation apart from the memory's imbalance. ``untrained-*`` rows score the
random-init small CNN (seed 0, as every seed-0 run starts) the same two ways.

    PYTHONPATH=. python training/experiments/lt_balance.py --root .data/cifar10-jpeg --out runs/lt-balance

writes ``OUT/results.json`` (every cell, its protocol and timings) and ``OUT/results.md`` (a table).
Finished cells are kept when the script is rerun, so an interrupted experiment resumes.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from isdretrieve.bank.export import export_bank
from isdretrieve.data.open import open_dataset
from isdretrieve.encoder import FrozenEncoder
from isdretrieve.evaluate.knn import head_tail_accuracy, knn_class_scores, per_class_top1
from isdretrieve.files.atomic import atomic_path
from isdretrieve.files.encoder_header import IMAGENET_MEAN, IMAGENET_STD, EncoderHeader
from isdretrieve.files.pairs import MiningParams
from isdretrieve.mine.mining import mine_pairs
from isdretrieve.models.backbones import build_backbone
from isdretrieve.models.checkpoints import export_encoder
from isdretrieve.train.engine import Trainer
from isdretrieve.train.recipe import recipe_from_data
from isdretrieve.util.typed_config import load_yaml

TRAINING = Path(__file__).resolve().parents[1]
LT_SIZE = 12_406  # CIFAR-10-LT at ratio 100: sum of floor(5000 * 100 ** (-c / 9))
K, T = 200, 0.1
MINING = MiningParams(k=5, quantile=0.5, mutual=True)


@dataclass(frozen=True)
class Cell:
    name: str
    method: str  # isd | moco | sepp-isd | untrained
    data: str  # lt | balanced
    seed: int
    partners: str = "mined"  # sepp-isd only: mined | random


def cells(seeds: list[int], balanced_seeds: list[int]) -> list[Cell]:
    out = [Cell(f"untrained-{d}", "untrained", d, 0) for d in ("lt", "balanced")]
    out += [Cell(f"{m}-lt-s{s}", m, "lt", s) for s in seeds for m in ("isd", "moco")]
    out += [Cell(f"{m}-balanced-s{s}", m, "balanced", s) for s in balanced_seeds for m in ("isd", "moco")]
    out += [Cell(f"sepp-isd-{p}-lt-s{s}", "sepp-isd", "lt", s, p) for s in seeds for p in ("mined", "random")]
    return out


def train_spec(root: Path, data: str) -> str:
    option = "longtail=100" if data == "lt" else f"balanced={LT_SIZE}"
    return f"folder:{root},split=train,{option}"


def recipe_for(cell: Cell, args: argparse.Namespace, pairs: Path | None) -> dict:
    """The shipped small-CNN CPU recipe of the method, on the cell's data, seed and budget."""
    base = "cifar10-moco-smallcnn-cpu.yaml" if cell.method == "moco" else "cifar10-isd-smallcnn-cpu.yaml"
    data = load_yaml(TRAINING / base)
    method = data["method"]
    method["queue_size"] = args.queue  # 16,384 would exceed the 12,406 training images
    if cell.method == "sepp-isd":
        isd = {k: v for k, v in method.items() if k != "name"}
        method = {"name": "sepp", "base": "isd", "pairs": str(pairs), "partners": cell.partners, "isd": isd}
    data.update(method=method, monitor={"every": 0})
    data["data"].update(train=train_spec(args.root, cell.data), workers=args.workers)
    data["optim"].update(batch_size=args.batch, max_steps=args.steps, epochs=10_000)
    data["engine"].update(seed=cell.seed, log_every=max(1, min(50, args.steps)))
    return data


class Images:
    """Each SPEC's images decoded once per process (every cell reads the same three sets)."""

    def __init__(self) -> None:
        self._cache: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def __call__(self, spec: str) -> tuple[torch.Tensor, torch.Tensor]:
        if spec not in self._cache:
            dataset = open_dataset(spec)
            self._cache[spec] = (dataset.load_all(num_workers=2), dataset.labels.long())
        return self._cache[spec]


def knn_scores(frozen: FrozenEncoder, memory: str, test: str, lt_counts: list[int], images: Images) -> dict:
    """Weighted k-NN of ``frozen`` with the images of ``memory`` as memory and ``test`` as queries."""
    (memory_images, memory_labels), (query_images, query_labels) = images(memory), images(test)
    scores = knn_class_scores(
        frozen.embed(memory_images),
        memory_labels,
        frozen.embed(query_images),
        k=K,
        temperature=T,
        num_classes=10,
    )
    per_class = per_class_top1(scores, query_labels, 10)
    split = head_tail_accuracy(per_class, lt_counts, n=3)
    return {
        "top1": (scores.argmax(dim=1) == query_labels).double().mean().item(),
        "per_class": per_class,
        "head": split.head,
        "tail": split.tail,
        "head_classes": list(split.head_classes),
        "tail_classes": list(split.tail_classes),
        "memory": len(memory_labels),
        "queries": len(query_labels),
        "memory_class_counts": np.bincount(memory_labels.numpy(), minlength=10).tolist(),
    }


def evaluate(encoder: Path, train: str, root: Path, lt_counts: list[int], images: Images) -> dict:
    """k-NN of the run's encoder on the full test split: with its own training images as memory (the
    top-level fields) and with the full 50k train split (``full_memory``); L2-normalised backbone
    features of the eval view (``FrozenEncoder``, as the monitor and banks)."""
    frozen = FrozenEncoder.load(encoder, device="cpu", batch_size=512)
    test, full = f"folder:{root},split=test", f"folder:{root},split=train"
    own = knn_scores(frozen, train, test, lt_counts, images)
    return {**own, "full_memory": knn_scores(frozen, full, test, lt_counts, images)}


def untrained_encoder(out: Path, seed: int) -> Path:
    """The small CNN as every run of ``seed`` starts (Trainer seeds torch, then builds the backbone)."""
    path = out / "encoder.pt"
    if not path.exists():
        torch.manual_seed(seed)
        backbone = build_backbone("small_cnn")
        header = EncoderHeader("small_cnn", False, 256, 32, IMAGENET_MEAN, IMAGENET_STD, source=f"seed{seed}")
        out.mkdir(parents=True, exist_ok=True)
        export_encoder(backbone, header, path)
    return path


def loop_seconds(run_dir: Path) -> float:
    """Seconds spent in the training loop (the epochs' own timings, without setup and data loading)."""
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line]
    return sum(r.get("epoch_seconds", 0.0) for r in records)


def run_cell(
    cell: Cell, args: argparse.Namespace, pairs: Path | None, lt_counts: list[int], images: Images
) -> dict:
    cell_dir = args.out / cell.name
    if cell.method == "untrained":
        t0 = time.perf_counter()
        encoder = untrained_encoder(cell_dir, cell.seed)
        knn = evaluate(encoder, train_spec(args.root, cell.data), args.root, lt_counts, images)
        record = {**asdict(cell), "train_spec": train_spec(args.root, cell.data), "steps": 0}
        record.update(train_seconds=0.0, seconds_per_step=None, setup_seconds=None)
        return {**record, "eval_seconds": round(time.perf_counter() - t0, 1), "encoder": str(encoder), **knn}
    recipe = recipe_from_data(recipe_for(cell, args, pairs))
    started = time.perf_counter()
    trainer = Trainer(
        recipe, cell_dir / "run", resume=(cell_dir / "run" / "checkpoints").exists(), quiet=True
    )
    steps_before = trainer.step
    result = trainer.fit()
    train_seconds = time.perf_counter() - started
    t0 = time.perf_counter()
    knn = evaluate(result.encoder, recipe.data.train, args.root, lt_counts, images)
    steps_run = result.steps - steps_before
    in_loop = loop_seconds(cell_dir / "run")
    return {
        **asdict(cell),
        "train_spec": recipe.data.train,
        "steps": result.steps,
        "batch_size": recipe.optim.batch_size,
        "lr": recipe.optim.lr,
        "train_seconds": round(train_seconds, 1),
        "seconds_per_step": round(in_loop / result.steps, 3) if result.steps else None,
        "setup_seconds": round(train_seconds - in_loop, 1) if steps_run else None,
        "eval_seconds": round(time.perf_counter() - t0, 1),
        "encoder": str(result.encoder),
        **knn,
    }


def mine(args: argparse.Namespace, isd_encoder: Path) -> Path:
    """Pairs mined from the LT-trained ISD encoder over the LT training images."""
    out = args.out / "pairs-isd-lt"
    out.mkdir(parents=True, exist_ok=True)
    export_bank(isd_encoder, train_spec(args.root, "lt"), out / "bank.h5", device="cpu", workers=0)
    mine_pairs(out / "bank.h5", out / "pairs.h5", MINING, device="cpu")
    return out / "pairs.h5"


def write_text(path: Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def summary(records: list[dict]) -> str:
    """Mean over seeds, with the spread (max − min), of each (method, data, partners) group."""
    groups: dict[str, list[dict]] = {}
    for r in records:
        name = r["method"] + (f"-{r['partners']}" if r["method"] == "sepp-isd" else "") + f" ({r['data']})"
        groups.setdefault(name, []).append(r)
    lines = [
        "| method (data) | seeds | top-1 own | tail own | top-1 full | head full | tail full |",
        "|---|---|---|---|---|---|---|",
    ]

    def stat(values: list[float]) -> str:
        mean = sum(values) / len(values)
        return f"{mean:.4f}" + (f" ± {(max(values) - min(values)) / 2:.4f}" if len(values) > 1 else "")

    for name, rows in groups.items():
        full = [r["full_memory"] for r in rows if "full_memory" in r]
        cols = [stat([r["top1"] for r in rows]), stat([r["tail"] for r in rows])]
        cols += [
            stat([f[key] for f in full]) if len(full) == len(rows) else "-"
            for key in ("top1", "head", "tail")
        ]
        lines.append(f"| {name} | {len(rows)} | " + " | ".join(cols) + " |")
    return "\n".join(lines) + "\n\n(± half the range over seeds)\n"


def table(records: list[dict]) -> str:
    lines = [
        f"k-NN weighted k={K} T={T}, student backbone, queries = full CIFAR-10 test split (JPEG q75 copy); "
        "memory = the run's own training images (own), or the full balanced 50k train split (full); "
        "head/tail = mean per-class top-1 of the 3 largest/smallest LT classes.",
        "",
        "| cell | steps | top-1 own | head own | tail own | top-1 full | head full | tail full "
        "| s/step (loop) | setup s | eval s |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in records:
        full = r.get("full_memory")
        full_cols = f"{full['top1']:.4f} | {full['head']:.4f} | {full['tail']:.4f}" if full else "- | - | -"
        lines.append(
            f"| {r['name']} | {r['steps']} | {r['top1']:.4f} | {r['head']:.4f} | {r['tail']:.4f} "
            f"| {full_cols} | {r['seconds_per_step']} | {r['setup_seconds']} | {r['eval_seconds']} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", type=Path, required=True, help="CIFAR-10 folder with train/ and test/")
    parser.add_argument("--out", type=Path, default=Path("runs/lt-balance"))
    parser.add_argument("--steps", type=int, default=600, help="training steps of every cell")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--queue", type=int, default=4096)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1], help="seeds of the LT cells")
    parser.add_argument("--balanced-seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--only", nargs="*", help="run only these cells (names as in results.json)")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    results_path = args.out / "results.json"  # finished cells are kept
    done = (
        {r["name"]: r for r in json.loads(results_path.read_text())["cells"]} if results_path.exists() else {}
    )

    images = Images()
    lt_counts = np.bincount(images(train_spec(args.root, "lt"))[1].numpy(), minlength=10).tolist()
    pairs = None
    for cell in cells(args.seeds, args.balanced_seeds):
        if args.only and cell.name not in args.only:
            continue
        finished = cell.name in done and (
            cell.method == "untrained" or done[cell.name]["steps"] >= args.steps
        )
        if finished and "full_memory" in done[cell.name]:
            continue
        if finished:  # trained before the full-memory evaluation existed: evaluate it again only
            old = done[cell.name]
            t0 = time.perf_counter()
            old.update(evaluate(Path(old["encoder"]), old["train_spec"], args.root, lt_counts, images))
            old["eval_seconds"] = round(time.perf_counter() - t0, 1)
            write_results(args, done, lt_counts)
            print(
                f"{cell.name}: re-evaluated (full memory top-1 {old['full_memory']['top1']:.4f})", flush=True
            )
            continue
        if cell.method == "sepp-isd" and pairs is None:
            miner = done.get(f"isd-lt-s{args.seeds[0]}")
            if miner is None:
                raise SystemExit(f"sepp-isd needs the pairs of isd-lt-s{args.seeds[0]}: run that cell first")
            t0 = time.perf_counter()
            pairs = mine(args, Path(miner["encoder"]))
            print(f"mined pairs in {time.perf_counter() - t0:.1f} s", flush=True)
        record = run_cell(cell, args, pairs, lt_counts, images)
        done[cell.name] = record
        scores = f"top-1 {record['top1']:.4f} head {record['head']:.4f} tail {record['tail']:.4f}"
        seconds = f"{record['train_seconds']} s train, {record['eval_seconds']} s eval"
        print(f"{cell.name}: {scores} ({seconds})", flush=True)
        write_results(args, done, lt_counts)


def write_results(args: argparse.Namespace, done: dict[str, dict], lt_counts: list[int]) -> None:
    """``results.json`` (the protocol and every cell) and ``results.md`` (the table), atomically."""
    records = list(done.values())
    protocol = {
        "k": K,
        "temperature": T,
        "weighting": "exp",
        "lt_class_counts": lt_counts,
        "steps": args.steps,
        "batch": args.batch,
        "queue": args.queue,
        "mining": asdict(MINING),
        "device": "cpu",
        "torch_threads": torch.get_num_threads(),
    }
    write_text(
        args.out / "results.json", json.dumps({"protocol": protocol, "cells": records}, indent=2) + "\n"
    )
    write_text(args.out / "results.md", table(records) + "\n" + summary(records))


if __name__ == "__main__":
    main()
