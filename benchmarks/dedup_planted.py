"""Near-duplicate groups against planted ones: precision and recall of ``isd-index dedup`` on a real set.

Data: the CIFAR-10 (JPEG q75 copy) test split (10,000 images) plus, for 1,000 of them drawn with seed 0,
one copy of each kind in ``tests/planted.py``: JPEG re-encoded at quality 50 and 95, resized down to 5/8
and back up, enlarged 2x (PNG), a centre crop of 80 % of the side and a corner crop of 87.5 %, both resized
back (JPEG q90). 16,000 images, 1,000 planted families of 6.

Each encoder embeds them (``export_bank``), the top-k search runs once (``find_duplicates`` keeps
``candidates.h5``) and every threshold regroups it. Scores (``tests/planted.py:score_groups``): pair
precision / recall, drop-list precision / recall, families found exactly, and per kind the share of copies
grouped with their original. Unplanted near-duplicates inside the CIFAR-10 test split count as errors.

    .venv/bin/python benchmarks/dedup_planted.py --encoder runs/dedup-encoder/encoder.pt --name trained
    .venv/bin/python benchmarks/dedup_planted.py --random small_cnn     # writes results/dedup_planted.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
sys.path.insert(0, str(REPO / "tests"))

from _harness import RESULTS, cifar_root, random_encoder, write_result
from planted import COPIES, families, plant, score_groups

from isdretrieve.bank.export import export_bank
from isdretrieve.files.bank import FeatureBank
from isdretrieve.mine.dedup import find_duplicates

WORK = REPO / "runs" / "bench-dedup"
THRESHOLDS = (0.8, 0.85, 0.9, 0.925, 0.95, 0.97, 0.98, 0.99, 0.995, 0.9975, 0.999)
PLANTED, SEED, K = 1000, 0, 10


def planted_data(root: Path) -> Path:
    """The test split plus the planted copies, in ``root`` (made once)."""
    done = root / ".planted"
    if not done.exists():
        images = sorted((cifar_root() / "test").glob("*/*.jpg"))
        chosen = sorted(np.random.default_rng(SEED).choice(len(images), PLANTED, replace=False).tolist())
        plant(images, root, chosen, list(COPIES))
        done.write_text(json.dumps({"images": len(images), "planted": PLANTED, "kinds": list(COPIES)}))
    return root


def per_kind(paths: list[str], group: np.ndarray, family: np.ndarray) -> dict[str, float]:
    """Per copy kind: the share of its copies found in the same group as their original."""
    original = {family[i]: i for i, p in enumerate(paths) if "__" not in Path(p).name}
    found = {}
    for kind in COPIES:
        rows = np.array([i for i, p in enumerate(paths) if Path(p).stem.endswith(f"__{kind}")])
        heads = np.array([original[family[i]] for i in rows])
        found[kind] = float(((group[rows] >= 0) & (group[rows] == group[heads])).mean())
    return found


def measure(encoder: Path, name: str, data: Path) -> dict:
    bank_path = WORK / f"{name}.h5"
    started = time.perf_counter()
    export_bank(encoder, f"folder:{data}", bank_path, workers=2, batch_size=256)
    embed_s = time.perf_counter() - started
    with FeatureBank.open(bank_path) as bank:
        paths = bank.paths()
        header = bank.encoder
    family = families(paths)
    rows = []
    for threshold in THRESHOLDS:
        result = find_duplicates(bank_path, WORK / f"{name}-dedup", threshold=threshold, k=K)
        g = result.groups
        score = score_groups(g.group, g.kept, g.representative, family)
        rows.append({"threshold": threshold, **score, "per_kind_recall": per_kind(paths, g.group, family)})
        print(name, threshold, {k: round(v, 4) if isinstance(v, float) else v for k, v in score.items()})
    return {
        "encoder": str(encoder.relative_to(REPO) if encoder.is_relative_to(REPO) else encoder.name),
        "arch": header.arch if header else "",
        "image_size": header.image_size if header else 0,
        "rows": len(paths),
        "embed_seconds": round(embed_s, 1),
        "search_seconds": result.summary["search_seconds"],
        "thresholds": rows,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--encoder", type=Path, help="encoder.pt (or any checkpoint) to embed with")
    parser.add_argument("--name", default="trained", help="label of --encoder in the result")
    parser.add_argument("--random", choices=["small_cnn", "resnet18"], help="a random-init encoder instead")
    parser.add_argument("--out", default="dedup_planted", help="result name under benchmarks/results/")
    args = parser.parse_args()
    if cifar_root() is None:
        sys.exit("the CIFAR-10 copy is needed")
    WORK.mkdir(parents=True, exist_ok=True)
    data = planted_data(WORK / "data")
    if args.random:
        encoder, name = (
            random_encoder(WORK / f"random-{args.random}.pt", args.random, 32),
            f"random-{args.random}",
        )
    else:
        encoder, name = args.encoder, args.name
    previous = RESULTS / f"{args.out}.json"
    encoders = json.loads(previous.read_text()).get("encoders", {}) if previous.exists() else {}
    encoders[name] = measure(encoder, name, data)
    protocol = {
        "data": "CIFAR-10 (JPEG q75 copy) test split, 10,000 images, plus one copy of each kind for "
        f"{PLANTED:,} images drawn with seed {SEED}",
        "copy_kinds": list(COPIES),
        "k": K,
        "keep": "first",
        "search": "exact",
        "thresholds": list(THRESHOLDS),
    }
    print(write_result(args.out, {"protocol": protocol, "encoders": encoders}))


if __name__ == "__main__":
    main()
