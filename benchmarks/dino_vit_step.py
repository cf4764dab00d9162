r"""The DINO / AdaSim training step with ViT-S/16 at 224 px: images/s of ours against a bare step.

Ours = ``Trainer._batch`` (DINO's global views T1 / T2 made on the device from uint8 256-px images) +
``Trainer.optimize`` (AdaSim-DINO forward: student on both views, EMA update, teacher on both views,
memory search and write; backward; frozen last layer, per-parameter clipping, AdamW), from
``training/imagenet-adasim-dino-vits16.yaml`` with the monitor off and synthetic images held in memory
(random uint8, so no file decoding is timed). Bare = on the same views: the student forward and
backward of a trivial loss and one AdamW step, plus the teacher's forward on both views under no_grad;
no augmentation, EMA, memory, clipping or real loss. Both are timed back to back over ``--steps`` steps
with one device sync at the end, as the engine runs between log steps.

    python benchmarks/dino_vit_step.py                          # on a GPU: bf16, compile, batch 256
    python benchmarks/dino_vit_step.py --arch vit_tiny --depth 2 --batch 8 --steps 2 --no-compile
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent)]
from _harness import sync, write_result  # noqa: E402

from isdretrieve.data.datasets import ArrayDataset
from isdretrieve.data.specs import parse_spec
from isdretrieve.train import engine
from isdretrieve.train.batches import epoch_generator
from isdretrieve.train.recipe import load_recipe

RECIPE = HERE.parent / "training" / "imagenet-adasim-dino-vits16.yaml"
SIDE = 256  # the recipe's decode side (folder:...,size=256)


def build(args: argparse.Namespace, out: Path) -> engine.Trainer:
    n = args.batch * (args.steps + 3)
    images = torch.randint(0, 256, (n, 3, SIDE, SIDE), dtype=torch.uint8, generator=torch.Generator())
    data = ArrayDataset(parse_spec("digits"), images, torch.zeros(n, dtype=torch.long), ["x"])
    engine.open_dataset = lambda spec, **kw: data  # the recipe's ImageNet folder is not read
    sets = [
        "data.in_memory='yes'",
        f"model.arch={args.arch}",
        f"optim.batch_size={args.batch}",
        f"engine.compile={str(args.compile).lower()}",
        "engine.log_every=1000000",
        "monitor.every=0",
    ]
    if args.depth:
        sets.append(f"model.depth={args.depth}")
    return engine.Trainer(load_recipe(RECIPE, sets), out, quiet=True)


def bare_step(trainer: engine.Trainer, optimizer: torch.optim.Optimizer, views: list[torch.Tensor]) -> None:
    method = trainer.method
    dtype = trainer.autocast_dtype
    with torch.autocast(trainer.device.type, dtype=dtype, enabled=dtype is not None):
        loss = sum(method.student(v).float().square().mean() for v in views)
        with torch.no_grad():
            for v in views:
                method.teacher(v)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", default="vit_small")
    parser.add_argument("--depth", type=int, default=None, help="ViT blocks (default: the recipe's 12)")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=torch.cuda.is_available())
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        trainer = build(args, Path(tmp) / "run")
        device = trainer.device
        gen = epoch_generator(0, 0, device, stream=1)
        batches = trainer.batches.epoch(0, 0, trainer.method.partner_map(0))
        t0 = time.perf_counter()
        trainer.optimize(trainer._batch(next(batches), gen))  # warm-up (and compilation)
        sync(device)
        warmup_s = time.perf_counter() - t0
        views = trainer._batch(next(batches), gen)
        views = [*views.views, *views.partner_views]
        params = [p for p in trainer.method.parameters() if p.requires_grad]
        bare_opt = torch.optim.AdamW(params, lr=trainer.recipe.optim.lr)
        bare_step(trainer, bare_opt, views)  # warm-up
        seconds = {}
        for name, step in (
            ("ours", lambda: trainer.optimize(trainer._batch(next(batches), gen))),
            ("bare", lambda: bare_step(trainer, bare_opt, views)),
        ):
            sync(device)
            start = time.perf_counter()
            for _ in range(args.steps):
                step()
            sync(device)
            seconds[name] = (time.perf_counter() - start) / args.steps
    result = {
        "protocol": {
            "recipe": RECIPE.name,
            "arch": args.arch,
            "depth": args.depth or 12,
            "batch": args.batch,
            "steps": args.steps,
            "compile": args.compile,
            "precision": "bf16 autocast" if trainer.autocast_dtype is not None else "fp32",
            "data": f"synthetic uint8 {SIDE}x{SIDE} in device memory; views 224 px (DINO T1 / T2)",
        },
        "warmup_s": warmup_s,
        "ours_s_per_step": seconds["ours"],
        "bare_s_per_step": seconds["bare"],
        "ours_images_per_s": args.batch / seconds["ours"],
        "bare_images_per_s": args.batch / seconds["bare"],
        "ratio_over_bare": seconds["ours"] / seconds["bare"],
    }
    print(write_result("dino_vit_step", result))
    print(
        f"ours {result['ours_images_per_s']:.1f} img/s, bare {result['bare_images_per_s']:.1f} img/s, "
        f"ratio {result['ratio_over_bare']:.3f}"
    )


if __name__ == "__main__":
    main()
