"""Why does ISD-base learn slower than MoCo-v2 on the small CNN at the CPU budget? A one-factor sweep,
and the small-CNN CPU rows measured again on the code as it is.

``--mode sweep``: every point trains the small CNN on the full CIFAR-10 (JPEG q75 copy) train split
(50k) for **600 steps at batch 256** (``optim.max_steps=600``: the cosine lr and the warm-up of the
recipe, over these 600 steps), fp32, one seed per point. The points change one setting of
``training/cifar10-isd-smallcnn-cpu.yaml`` at a time (``--set``-style overrides): ``optim.lr``, both
temperatures (``method.tau_teacher`` = ``method.tau_student``), ``method.momentum``,
``method.queue_size`` and ``method.shuffle_bn``; ``moco-v2`` is ``training/cifar10-moco-smallcnn-cpu.yaml``
unchanged (600 steps) as the reference. ``--second-seed NAME ...`` adds NAME on seed 1.

``--mode remeasure``: the three small-CNN CPU recipes unchanged (ISD 1,500 steps, MoCo-v2 600 steps,
SePP-MoCo 600 steps) with SePP's pairs mined by the re-measured ISD encoder through the CLI
(``isd-index export`` of the train split, then ``isd-index mine -k 5 --mutual --quantile 0.5 --audit``),
and SePP's random-partner control (``method.partners=random``).

Score of every run: the recipe's own monitor, i.e. weighted k-NN (k=200, T=0.1, exp) of the student
backbone's L2-normalised eval-view features, the full 50k train split as memory and the full 10k test
split as queries, before training (``knn_init``) and at the end (``knn``). The only change to any recipe
beyond the point's overrides is ``data.workers`` (``--workers``, default 0), which only sets how many
processes decode the images once into memory; run with ``OMP_NUM_THREADS=1`` for one torch thread.

    PYTHONPATH=. OMP_NUM_THREADS=1 python training/experiments/isd_sweep.py --mode sweep \\
        --root .data/cifar10-jpeg --out runs/isd-sweep --runs runs/isd-runs

writes ``OUT/results.json`` (protocol and every point) and ``OUT/results.md`` (a table). Finished points
are kept and skipped when the script is rerun; an interrupted training run resumes from its checkpoint.
Runs are kept under ``--runs`` by name, so the two modes share ``moco-v2`` when given the same folder.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

import isdretrieve
from isdretrieve.train.engine import Trainer
from isdretrieve.train.recipe import load_recipe

TRAINING = Path(__file__).resolve().parents[1]
ISD, MOCO = "cifar10-isd-smallcnn-cpu.yaml", "cifar10-moco-smallcnn-cpu.yaml"
SEPP = "cifar10-sepp-moco-smallcnn-cpu.yaml"
MINING = ("-k", "5", "--mutual", "--quantile", "0.5")


@dataclass(frozen=True)
class Point:
    name: str
    factor: str  # what the point changes (for the table)
    recipe: str
    overrides: tuple[str, ...] = ()
    seed: int = 0
    pairs: str = ""  # SePP: mined | random (pairs from the remeasured ISD encoder)


def tau(value: float) -> tuple[str, ...]:
    return (f"method.tau_teacher={value}", f"method.tau_student={value}")


# Most informative first: a sweep cut short keeps these.
SWEEP = [
    Point("isd", "current recipe", ISD),
    Point("moco-v2", "MoCo-v2 reference", MOCO),
    Point("isd-shuffle-off", "shuffle-BN", ISD, ("method.shuffle_bn=false",)),
    Point("isd-tau-0.05", "tau", ISD, tau(0.05)),
    Point("isd-tau-0.1", "tau", ISD, tau(0.1)),
    Point("isd-lr-0.1", "lr", ISD, ("optim.lr=0.1",)),
    Point("isd-lr-0.2", "lr", ISD, ("optim.lr=0.2",)),
    Point("isd-m-0.95", "momentum", ISD, ("method.momentum=0.95",)),
    Point("isd-queue-4096", "queue", ISD, ("method.queue_size=4096",)),
]
# Left out of the default run to keep the sweep near two CPU-hours (about 12 min a point on one thread):
# a lower lr and a slower teacher, the two changes expected to slow a 600-step run further.
DROPPED = [
    Point("isd-lr-0.02", "lr", ISD, ("optim.lr=0.02",)),
    Point("isd-m-0.999", "momentum", ISD, ("method.momentum=0.999",)),
]

REMEASURE = [
    Point("isd-recipe", "cifar10-isd-smallcnn-cpu", ISD),
    Point("moco-v2", "cifar10-moco-smallcnn-cpu", MOCO),
    Point("sepp-moco-mined", "cifar10-sepp-moco-smallcnn-cpu", SEPP, pairs="mined"),
    Point("sepp-moco-random", "cifar10-sepp-moco-smallcnn-cpu, random partners", SEPP, pairs="random"),
]


def sweep_points(args: argparse.Namespace) -> list[Point]:
    """The sweep's points at 600 steps, in run order, then the ``--second-seed`` reruns on seed 1."""
    points = [p for p in SWEEP + DROPPED if p.name in args.only] if args.only else list(SWEEP)
    by_name = {p.name: p for p in SWEEP + DROPPED}
    for name in args.second_seed:
        p = by_name[name]
        points.append(Point(f"{name}-s1", p.factor, p.recipe, p.overrides, seed=1))
    return points


def overrides_for(point: Point, args: argparse.Namespace, pairs: Path | None) -> list[str]:
    """The point's overrides plus the protocol's: seed, steps (sweep only), decoding workers, data."""
    out = [*point.overrides, f"engine.seed={point.seed}", f"data.workers={args.workers}"]
    out.append(f"data.train=folder:{args.root},split=train")
    if args.mode == "sweep":
        out.append("optim.max_steps=600")
    if point.pairs:
        out += [f"method.pairs={pairs}", f"method.partners={point.pairs}"]
    return out


def method_settings(recipe) -> dict:
    """The settings the table reports, read from the built recipe (SePP: its MoCo section)."""
    m = recipe.method
    m = getattr(m, "moco", m) if m.name == "sepp" else m
    taus = (m.tau_teacher, m.tau_student) if m.name == "isd" else (m.tau, m.tau)
    return {
        "method": recipe.method.name,
        "lr": recipe.optim.lr,
        "tau_teacher": taus[0],
        "tau_student": taus[1],
        "momentum": m.momentum,
        "queue_size": m.queue_size,
        "shuffle_bn": m.shuffles,
        "shuffle_groups": m.shuffle_groups if m.shuffles else None,
        "warmup_epochs": recipe.optim.warmup_epochs,
    }


def run_log(run_dir: Path) -> dict:
    """Seconds of the loop (the epochs' own timings) and of the run, the last loss and teacher entropy."""
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line]
    steps = [r for r in records if "loss" in r]
    last = steps[-1] if steps else {}
    return {
        "loop_seconds": round(sum(r.get("epoch_seconds", 0.0) for r in records), 1),
        # from the untrained k-NN's record to the last one: training, checkpoints and the final k-NN
        "run_seconds": round(records[-1]["time"] - records[0]["time"], 1),
        "final_loss": last.get("loss"),
        "teacher_entropy": last.get("teacher_entropy"),
    }


def train_point(point: Point, args: argparse.Namespace, pairs: Path | None) -> dict:
    """Train (or resume, or just reload a finished) run and return its record."""
    overrides = overrides_for(point, args, pairs)
    recipe = load_recipe(TRAINING / point.recipe, overrides)
    run_dir = args.runs / point.name
    started, cpu0 = time.perf_counter(), time.process_time()
    trainer = Trainer(recipe, run_dir, resume=(run_dir / "checkpoints").exists(), quiet=True)
    result = trainer.fit()
    wall, cpu = time.perf_counter() - started, time.process_time() - cpu0
    log = run_log(run_dir)
    return {
        **asdict(point),
        "overrides": overrides,
        **method_settings(recipe),
        "steps": result.steps,
        "batch_size": recipe.optim.batch_size,
        "knn_init": result.knn_init.top1,
        "knn": result.knn.top1,
        "knn_memory": result.knn.train_size,
        "knn_queries": result.knn.test_size,
        **log,
        "seconds_per_step": round(log["loop_seconds"] / max(result.steps, 1), 3),
        "wall_seconds": round(wall, 1),  # this call only: less for a resumed or reloaded run
        "cpu_seconds": round(cpu, 1),
        "encoder": str(result.encoder),
    }


def index_cli(*argv: str) -> dict:
    """``python -m isdretrieve.cli.index ARGV --json``, its JSON result."""
    command = [sys.executable, "-m", "isdretrieve.cli.index", *argv, "--json"]
    done = subprocess.run(command, check=True, capture_output=True, text=True)
    return json.loads(done.stdout)


def mine_pairs(args: argparse.Namespace, encoder: str) -> dict:
    """Export the ISD encoder's bank of the train split and mine SePP's pairs from it (the CLI)."""
    out = args.runs / "pairs-isd-recipe"
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    data = f"folder:{args.root},split=train"
    index_cli(
        "export",
        "--checkpoint",
        encoder,
        "--data",
        data,
        "--out",
        str(out / "bank.h5"),
        "--device",
        "cpu",
        "--workers",
        str(args.workers),
        "--quiet",
    )
    t1 = time.perf_counter()
    mined = index_cli(
        "mine",
        str(out / "bank.h5"),
        "--out",
        str(out / "pairs.h5"),
        *MINING,
        "--audit",
        "--device",
        "cpu",
        "--quiet",
    )
    audit = mined["audit"]
    return {
        "name": "mining",
        "miner": encoder,
        "settings": " ".join(MINING),
        "pairs_file": str(out / "pairs.h5"),
        "num_pairs": mined["num_pairs"],
        "rows": mined["rows"],
        "coverage": mined["coverage"],
        "threshold": mined["threshold"],
        "precision": audit["chosen"]["precision"],
        "per_class_precision": {c["name"]: c["precision"] for c in audit["per_class"]},
        "export_seconds": round(t1 - t0, 1),
        "mine_seconds": round(time.perf_counter() - t1, 1),
    }


def fmt(value: float | None, digits: int = 4) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def table(records: list[dict]) -> str:
    """One row a run: its settings, k-NN untrained and trained, and its cost."""
    lines = [
        "k-NN: weighted (exp), k=200, T=0.1, student backbone, memory = full CIFAR-10 (JPEG q75 copy) "
        "train split (50k), queries = full test split (10k). s/step: the training loop's seconds per step; "
        "run s: from the untrained k-NN to the end (loop, checkpoints, final k-NN), without the decoding; "
        "CPU s: the process's CPU time for the run, decoding and both k-NN included.",
        "",
        "| run | changes | steps x batch | seed | lr | tau_t / tau_s | m | queue | shuffle-BN "
        "| k-NN untrained | k-NN trained | gain | final loss | s/step (loop) | run s | CPU s |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in records:
        if r["name"] == "mining":
            continue
        shuffle = f"G={r['shuffle_groups']}" if r["shuffle_bn"] else "off"
        change = (
            ", ".join(
                o.split("=", 1)[0].split(".")[-1] + "=" + o.split("=", 1)[1]
                for o in r["overrides"]
                if o.startswith(("method.", "optim.lr")) and "pairs=" not in o
            )
            or "-"
        )
        lines.append(
            f"| {r['name']} | {change} | {r['steps']} x {r['batch_size']} | {r['seed']} | {r['lr']} "
            f"| {r['tau_teacher']} / {r['tau_student']} | {r['momentum']} | {r['queue_size']} | {shuffle} "
            f"| {fmt(r['knn_init'])} | **{fmt(r['knn'])}** | {r['knn'] - r['knn_init']:+.4f} "
            f"| {fmt(r['final_loss'])} | {r['seconds_per_step']} | {r['run_seconds']} | {r['cpu_seconds']} |"
        )
    mining = [r for r in records if r["name"] == "mining"]
    for m in mining:
        per_class = ", ".join(f"{k} {v:.3f}" for k, v in m["per_class_precision"].items())
        lines += [
            "",
            f"Mining ({m['settings']}, miner = the isd-recipe encoder, bank = the train split): "
            f"{m['num_pairs']:,} pairs, coverage {m['coverage']:.4f}, threshold {m['threshold']:.4f}, "
            f"**precision {m['precision']:.4f}**; per class: {per_class}. "
            f"Export {m['export_seconds']} s, mining {m['mine_seconds']} s.",
        ]
    return "\n".join(lines) + "\n"


def write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def write_results(args: argparse.Namespace, done: dict[str, dict]) -> None:
    """``results.json`` (the protocol and every record) and ``results.md`` (the table)."""
    protocol = {
        "mode": args.mode,
        "data": "CIFAR-10 (JPEG q75 copy): train split 50k, test split 10k",
        "knn": {
            "k": 200,
            "temperature": 0.1,
            "weighting": "exp",
            "memory": "train 50k",
            "queries": "test 10k",
        },
        "isdretrieve": isdretrieve.__version__,
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "device": "cpu",
        "data_workers": args.workers,
    }
    records = list(done.values())
    write_text(
        args.out / "results.json", json.dumps({"protocol": protocol, "runs": records}, indent=2) + "\n"
    )
    device = f"isdretrieve {isdretrieve.__version__}, torch {torch.__version__}, CPU, "
    device += f"{torch.get_num_threads()} torch thread(s), fp32"
    write_text(args.out / "results.md", f"{device}.\n\n" + table(records))


def run(args: argparse.Namespace, points: list[Point], done: dict[str, dict]) -> None:
    """Train every point not yet in ``done``; in remeasure mode mine the pairs before SePP's runs."""
    pairs = None
    for point in points:
        if point.name in done:
            continue
        if point.pairs and pairs is None:
            if "mining" not in done:
                done["mining"] = mine_pairs(args, done["isd-recipe"]["encoder"])
                write_results(args, done)
            pairs = Path(done["mining"]["pairs_file"])
        print(f"{point.name}: training ({' '.join(point.overrides) or 'recipe as is'})", flush=True)
        record = train_point(point, args, pairs)
        done[point.name] = record
        print(
            f"{point.name}: k-NN {record['knn_init']:.4f} -> {record['knn']:.4f} "
            f"({record['wall_seconds']} s, {record['seconds_per_step']} s/step)",
            flush=True,
        )
        write_results(args, done)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mode", choices=["sweep", "remeasure"], default="sweep")
    parser.add_argument("--root", type=Path, required=True, help="CIFAR-10 folder with train/ and test/")
    parser.add_argument("--out", type=Path, required=True, help="results.json and results.md go here")
    parser.add_argument("--runs", type=Path, help="run folders by name (default OUT/runs)")
    parser.add_argument("--workers", type=int, default=0, help="data.workers of every run")
    parser.add_argument("--only", nargs="*", help="run only these points (SWEEP, DROPPED; or REMEASURE)")
    parser.add_argument("--second-seed", nargs="*", default=[], help="sweep: rerun these points on seed 1")
    args = parser.parse_args()
    args.runs = args.runs or args.out / "runs"
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "results.json"  # finished points are kept
    done = {r["name"]: r for r in json.loads(path.read_text())["runs"]} if path.exists() else {}
    points = sweep_points(args) if args.mode == "sweep" else REMEASURE
    if args.mode == "remeasure" and args.only:  # e.g. one SePP run in a second process
        points = [p for p in points if p.name in args.only]
    run(args, points, done)
    write_results(args, done)


if __name__ == "__main__":
    main()
