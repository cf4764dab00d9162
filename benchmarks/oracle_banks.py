"""The real feature banks the index benchmarks measure on, exported with the library's own ``export_bank``
into the git-ignored ``runs/oracle/`` (resumable; a finished bank is reused).

- ``cifar60k-smallcnn``: all 60,000 CIFAR-10 (JPEG q75 copy) images, train split then test split, eval
  view (32 px), through a small CNN trained briefly with ISD (``--encoder``, e.g. the
  ``training/cifar10-isd-smallcnn-cpu.yaml`` recipe cut to 300 steps): 60,000 x 256.
- ``cifar50k-resnet18``: the 50,000 CIFAR-10 train images, eval view (32 px), through a random-init
  ResNet-18 with the CIFAR stem (seed 0): 50,000 x 512.
- ``digits27k-pixels`` (for smoke runs, seconds to make): the pixels of 20 weak random crops + flips of
  each of the 1,347 digits train images (generator seed 0): 26,940 x 256.

    python benchmarks/oracle_banks.py cifar50k-resnet18
    python benchmarks/oracle_banks.py cifar60k-smallcnn --encoder runs/cifar-small-300/encoder.pt
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _harness import REPO, cifar_root, random_encoder  # noqa: E402

from isdretrieve.bank.arrays import write_bank
from isdretrieve.bank.export import export_bank
from isdretrieve.files.bank import FeatureBank

OUT = REPO / "runs" / "oracle"
BANKS = ("cifar60k-smallcnn", "cifar50k-resnet18", "digits27k-pixels")


def _export(encoder: Path, split: str, out: Path) -> Path:
    root = cifar_root()
    if root is None:
        raise SystemExit("the shared CIFAR-10 copy is missing")
    spec = f"folder:{os.path.relpath(root, REPO)},split={split}"
    return export_bank(encoder, spec, out, device="cpu", workers=1, batch_size=256, progress=True).path


def _join(parts: list[Path], out: Path, note: str) -> Path:
    """One bank of ``parts`` one after the other (the same encoder), with their labels and paths."""
    opened = [FeatureBank.open(p) for p in parts]
    try:
        first = opened[0]
        return write_bank(
            out,
            np.concatenate([b.features() for b in opened]),
            labels=np.concatenate([b.labels() for b in opened]),
            indices=np.concatenate([b.indices() for b in opened]),
            paths=[p for b in opened for p in b.paths()],
            fingerprint=first.fingerprint,
            encoder=first.encoder,
            transform=first.transform,
            data_spec=note,
            classes=first.classes,
        )
    finally:
        for b in opened:
            b.close()


def _digits_views(out: Path) -> Path:
    from isdretrieve.data.augment import augment_views, view_config
    from isdretrieve.data.open import open_dataset

    dataset = open_dataset("digits")
    images, generator, cfg = (
        dataset.load_all(),
        torch.Generator().manual_seed(0),
        view_config("weak", "digits"),
    )
    views = [augment_views(images, cfg, generator)[:, 0].flatten(1) for _ in range(20)]
    return write_bank(
        out,
        torch.cat(views).numpy(),
        labels=dataset.labels.repeat(20).numpy(),
        indices=np.tile(np.arange(len(images)), 20),
        fingerprint="digits-weak-views-pixels-seed0",
        transform="20 weak digits views per image (pixels), seed 0",
        data_spec="digits",
    )


def make_bank(name: str, encoder: Path | None = None) -> Path:
    """The bank ``name`` (one of BANKS) under runs/oracle/, exported on first use."""
    OUT.mkdir(parents=True, exist_ok=True)
    path = OUT / f"{name}.h5"
    if path.is_file() and not (OUT / f"{name}.parts").exists():
        return path
    if name == "digits27k-pixels":
        return _digits_views(path)
    if name == "cifar50k-resnet18":
        model = random_encoder(OUT / "resnet18-random.pt", "resnet18", 32, seed=0)
        _export(model, "train", OUT / f"{name}.part.h5").replace(path)
        return path
    if name == "cifar60k-smallcnn":
        if encoder is None or not encoder.is_file():
            raise SystemExit(f"{name} needs --encoder (a trained small CNN's encoder.pt)")
        parts_dir = OUT / f"{name}.parts"
        parts_dir.mkdir(exist_ok=True)
        parts = [_export(encoder, split, parts_dir / f"{split}.h5") for split in ("train", "test")]
        _join(parts, path, "CIFAR-10 (JPEG q75 copy) train split then test split")
        for part in parts:
            part.unlink()
        parts_dir.rmdir()
        return path
    raise SystemExit(f"unknown bank {name!r}: choose one of {', '.join(BANKS)}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("name", choices=BANKS)
    parser.add_argument("--encoder", type=Path, help="the trained small CNN (cifar60k-smallcnn)")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    os.chdir(REPO)
    path = make_bank(args.name, args.encoder)
    with FeatureBank.open(path) as bank:
        print(f"{path}: {len(bank):,} x {bank.dim}")


if __name__ == "__main__":
    main()
