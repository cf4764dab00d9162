"""MoCo-v2 on CIFAR-10, side by side: our Trainer (training/cifar10-moco.yaml) vs lightly's MoCo step.

lightly is a benchmark-only dependency (not in pyproject). Install it without letting pip touch torch or
torchvision, plus the one pure-Python package its transforms import:

    .venv/bin/pip install --no-deps lightly lightning-utilities

Lightly side, as its docs' MoCo example (examples/pytorch/moco.py) with our recipe's sizes: backbone
``ResNetGenerator("resnet-18")`` children minus the classifier + ``AdaptiveAvgPool2d(1)`` (its CIFAR
benchmark's CIFAR-stem ResNet-18: 3x3/1 stem, no max-pool, the same 11.2M parameters as ours; with
``--arch small_cnn`` both sides use our small CNN), ``MoCoProjectionHead(512, 2048, 128)`` (v2: no BN; ours
has BN1d), momentum copies via ``deactivate_requires_grad`` / ``update_momentum(m=0.99)``,
``NTXentLoss(temperature=0.2, memory_bank_size=(16384, 128))``, SGD(lr 0.24, momentum 0.9, wd 5e-4) over
``model.parameters()``; one query and one key view (asymmetric, like ours; lightly's CIFAR benchmark
symmetrises the loss, which doubles the compute per image). Augmentation: ``MoCoV2Transform(input_size=32,
gaussian_blur=0.0)`` (crop 0.2-1, flip, jitter 0.4/0.4/0.4/0.1 p 0.8, gray 0.2 = our strong CIFAR view),
per image on PIL images from the uint8 HWC array as torchvision's CIFAR10 does, then stacked, in this
process. Ours: ``Trainer._batch`` (batched tensor augmentation of both views) + ``Trainer.optimize``.

Both sides use the same device, batch, precision and memory format (ours' defaults: fp32 and contiguous on
CPU, bf16 autocast and channels_last on CUDA); torch.compile stays off for both unless ``--compile``
(ours only). Step only: both train on the same already-augmented views (ours' views). Step +
augmentation: ours measured as one (augment + optimize). Lightly with ``--lightly-workers 0`` (the CPU
default: on 2 cores workers would compete with the step) = its PIL pipeline time + its step time, one after
the other; with N > 0 workers (the CUDA default, 8) = a separate end-to-end run as lightly is used: a
shuffled DataLoader of N workers making the PIL views while the device runs its steps.
Ratios are images/s of ours / images/s of lightly (> 1: ours is faster); medians after warm-up.

    .venv/bin/python benchmarks/lightly_side_by_side.py      # R18, batch 512 -> lightly_side_by_side.json
    .venv/bin/python benchmarks/lightly_side_by_side.py --arch small_cnn --batch 128 --threads 1
        # -> lightly_side_by_side_small_cnn.json (with --compile: ..._small_cnn_compiled.json)
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent)]
from _harness import machine_info, sync, write_result  # noqa: E402
from train_throughput import build_trainer, shared_data  # noqa: E402

from isdretrieve.models.backbones import build_backbone
from isdretrieve.train.batches import epoch_generator
from isdretrieve.util.torchvision import import_torchvision

import_torchvision()  # lightly imports torchvision; its C extension cannot load next to a CPU torch
try:
    import lightly
    from lightly.loss import NTXentLoss
    from lightly.models import ResNetGenerator
    from lightly.models.modules import MoCoProjectionHead
    from lightly.models.utils import deactivate_requires_grad, update_momentum
    from lightly.transforms import MoCoV2Transform
except ImportError as exc:
    raise SystemExit(
        f"{exc}: install lightly with  .venv/bin/pip install --no-deps lightly lightning-utilities"
    ) from None
from PIL import Image  # noqa: E402


class PilViews(Dataset):
    """Two MoCo-v2 views of each image, made from a PIL image as torchvision's CIFAR10 hands it over."""

    def __init__(self, hwc, transform) -> None:
        self.hwc, self.transform = hwc, transform

    def __len__(self) -> int:
        return len(self.hwc)

    def __getitem__(self, i: int) -> list[torch.Tensor]:
        return self.transform(Image.fromarray(self.hwc[i]))


class LightlyMoCo(nn.Module):
    """lightly's documented MoCo model: backbone + projection head and their momentum copies."""

    def __init__(self, backbone: nn.Module, feature_dim: int, hidden: int, out: int) -> None:
        super().__init__()
        self.backbone = backbone
        self.projection_head = MoCoProjectionHead(feature_dim, hidden, out)
        self.backbone_momentum = copy.deepcopy(self.backbone)
        self.projection_head_momentum = copy.deepcopy(self.projection_head)
        deactivate_requires_grad(self.backbone_momentum)
        deactivate_requires_grad(self.projection_head_momentum)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.projection_head(self.backbone(x).flatten(start_dim=1))

    def forward_momentum(self, x: torch.Tensor) -> torch.Tensor:
        return self.projection_head_momentum(self.backbone_momentum(x).flatten(start_dim=1)).detach()


def lightly_backbone(arch: str) -> tuple[nn.Module, str]:
    if arch == "resnet18":
        resnet = ResNetGenerator("resnet-18")
        backbone = nn.Sequential(*list(resnet.children())[:-1], nn.AdaptiveAvgPool2d(1))
        return backbone, 'lightly ResNetGenerator("resnet-18") minus linear + AdaptiveAvgPool2d(1)'
    return build_backbone(arch), f"isdretrieve {arch} (same as ours)"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="resnet18", choices=["resnet18", "small_cnn"])
    parser.add_argument("--batch", type=int, default=512)
    parser.add_argument("--steps", type=int, default=5, help="timed steps (after warm-up)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--compile", action="store_true", help="torch.compile ours (lightly stays eager)")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument(
        "--lightly-workers",
        type=int,
        default=None,
        help="DataLoader workers for lightly's end-to-end run (default: 8 on CUDA, 0 = serial on CPU)",
    )
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    begun, machine_at_start = time.perf_counter(), machine_info()
    spec, preset, data_note = shared_data()

    with tempfile.TemporaryDirectory() as tmp:
        torch.manual_seed(0)
        ours = build_trainer("moco", args.arch, args, spec, preset, Path(tmp))
        device, cfg, o = ours.device, ours.recipe.method, ours.recipe.optim
        torch.manual_seed(0)
        backbone, backbone_note = lightly_backbone(args.arch)
        feature_dim = ours.method.feature_backbone.feature_dim
        model = LightlyMoCo(backbone, feature_dim, cfg.hidden_dim(feature_dim), cfg.proj_dim).to(device)
        if ours.channels_last:
            model.to(memory_format=torch.channels_last)
        criterion = NTXentLoss(temperature=cfg.tau, memory_bank_size=(cfg.queue_size, cfg.proj_dim)).to(
            device
        )
        optimizer = torch.optim.SGD(
            model.parameters(), lr=o.lr, momentum=o.momentum, weight_decay=o.weight_decay
        )
        dtype = ours.autocast_dtype
        transform = MoCoV2Transform(input_size=ours.views["strong"].size, gaussian_blur=0.0)
        hwc = ours.batches.images.permute(0, 2, 3, 1).contiguous().cpu().numpy()  # as CIFAR10.data

        def lightly_step(x_query: torch.Tensor, x_key: torch.Tensor) -> torch.Tensor:
            update_momentum(model.backbone, model.backbone_momentum, m=cfg.momentum)
            update_momentum(model.projection_head, model.projection_head_momentum, m=cfg.momentum)
            with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
                query = model(x_query)
                key = model.forward_momentum(x_key)
                loss = criterion(query.float(), key.float())
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            return loss.detach()

        def lightly_augment(indices: torch.Tensor) -> list[torch.Tensor]:
            pairs = [transform(Image.fromarray(hwc[i])) for i in indices.tolist()]
            views = [torch.stack([p[v] for p in pairs]).to(device, non_blocking=True) for v in (0, 1)]
            if ours.channels_last:
                views = [v.contiguous(memory_format=torch.channels_last) for v in views]
            return views

        def timed_call(fn, *fn_args):
            sync(device)
            t0 = time.perf_counter()
            value = fn(*fn_args)
            sync(device)
            return value, time.perf_counter() - t0

        gen = epoch_generator(ours.recipe.engine.seed, 0, device, stream=1)
        batches = ours.batches.epoch(0)
        keys = ("ours_augment_s", "ours_optimize_s", "lightly_augment_s", "lightly_step_s")
        runs: dict[str, list[float]] = {k: [] for k in keys}
        losses: dict[str, list[float]] = {"ours": [], "lightly": []}
        for i in range(args.warmup + args.steps):
            data = next(batches)
            batch, t_aug = timed_call(ours._batch, data, gen)
            (out, _), t_opt = timed_call(ours.optimize, batch)
            _, t_laug = timed_call(lightly_augment, data.indices)
            key_view, query_view = batch.views  # lightly trains on ours' views: step only
            loss, t_lstep = timed_call(lightly_step, query_view, key_view)
            losses["ours"].append(float(out.loss.detach()))
            losses["lightly"].append(float(loss))
            if i >= args.warmup:
                for k, t in zip(keys, (t_aug, t_opt, t_laug, t_lstep), strict=True):
                    runs[k].append(t)

        if args.lightly_workers is None:
            args.lightly_workers = min(8, os.cpu_count() or 1) if device.type == "cuda" else 0
        if args.lightly_workers > 0:  # lightly as it is run: PIL views from DataLoader workers, overlapped
            loader = DataLoader(
                PilViews(hwc, transform),
                batch_size=args.batch,
                shuffle=True,
                drop_last=True,
                num_workers=args.lightly_workers,
                pin_memory=device.type == "cuda",
                persistent_workers=True,
            )
            runs["lightly_end_to_end_s"] = []
            loaded = iter(loader)
            for i in range(args.warmup + args.steps):
                sync(device)
                t0 = time.perf_counter()
                views = [v.to(device, non_blocking=True) for v in next(loaded)]
                if ours.channels_last:
                    views = [v.contiguous(memory_format=torch.channels_last) for v in views]
                lightly_step(views[0], views[1])
                sync(device)
                if i >= args.warmup:
                    runs["lightly_end_to_end_s"].append(time.perf_counter() - t0)
            del loaded, loader

    med = {k: statistics.median(v) for k, v in runs.items()}
    b = args.batch
    ours_step, ours_full = med["ours_optimize_s"], med["ours_augment_s"] + med["ours_optimize_s"]
    lightly_step_s, lightly_full = med["lightly_step_s"], med["lightly_augment_s"] + med["lightly_step_s"]
    if args.lightly_workers > 0:
        lightly_full = med["lightly_end_to_end_s"]
    n_params = {
        "ours_backbone": sum(p.numel() for p in ours.method.feature_backbone.parameters()),
        "lightly_backbone": sum(p.numel() for p in model.backbone.parameters()),
    }
    figures = {
        "ours_step_only_images_per_s": b / ours_step,
        "lightly_step_only_images_per_s": b / lightly_step_s,
        "ours_step_plus_augment_images_per_s": b / ours_full,
        "lightly_step_plus_augment_images_per_s": b / lightly_full,
        "ours_augment_views_per_s": 2 * b / med["ours_augment_s"],
        "lightly_augment_views_per_s": 2 * b / med["lightly_augment_s"],
        "median_s": med,
        "runs_s": runs,
        "losses": losses,
        "parameters": n_params,
    }
    ratio = {
        "step_only": lightly_step_s / ours_step,
        "step_plus_augment": lightly_full / ours_full,
        "augment_only": med["lightly_augment_s"] / med["ours_augment_s"],
    }
    result = {
        "protocol": {
            "data": data_note,
            "ours": "Trainer(training/cifar10-moco.yaml; data.train/preset/in_memory, model.arch, "
            "optim.batch_size, engine.device/compile, monitor.every=0): _batch + optimize",
            "lightly": f"lightly {lightly.__version__}: {backbone_note}; MoCoProjectionHead({feature_dim}, "
            f"{cfg.hidden_dim(feature_dim)}, {cfg.proj_dim}); NTXentLoss(temperature={cfg.tau}, "
            f"memory_bank_size=({cfg.queue_size}, {cfg.proj_dim})); update_momentum m={cfg.momentum}; "
            f"SGD lr {o.lr}, momentum {o.momentum}, wd {o.weight_decay}; "
            "MoCoV2Transform(input_size=32, gaussian_blur=0.0) per PIL image in this process",
            "differences": "ours runs shuffle-BN (split-batch BN, 8 groups, permuted keys; lightly's "
            "documented example does not); lightly's CIFAR "
            "ResNet-18 is its own implementation (same layers and parameter count); lightly's transform "
            "runs per image on PIL, ours batched on tensors",
            "batch": b,
            "arch": args.arch,
            "device": str(device),
            "autocast": str(dtype),
            "channels_last": ours.channels_last,
            "compile_ours": args.compile,
            "threads": torch.get_num_threads(),
            "warmup_steps": args.warmup,
            "timed_steps": args.steps,
            "timing": "per step, in turn: ours augment, ours optimize, lightly augment (same images), "
            "lightly step on ours' views; medians; lightly step + augment = "
            + (
                f"end-to-end run with {args.lightly_workers} DataLoader workers"
                if args.lightly_workers > 0
                else "its augment and step medians added (serial, no workers)"
            ),
            "lightly_workers": args.lightly_workers,
        },
        "figures": figures,
        "ratio": ratio,
        "ratio_meaning": "lightly s / ours s = ours img/s / lightly img/s (> 1: ours faster)",
        "target": ">= 5x lightly's step on the same GPU; none on CPU",
        "meets_target": ratio["step_plus_augment"] >= 5 if device.type == "cuda" else None,
        "machine_at_start": machine_at_start,
        "total_seconds": round(time.perf_counter() - begun, 1),
    }
    name = "lightly_side_by_side" + ("" if args.arch == "resnet18" else f"_{args.arch}")
    name += "_compiled" if args.compile else ""
    path = write_result(name, result)
    print(
        f"{args.arch} batch {b} on {device}: step only ours {b / ours_step:.1f} vs lightly "
        f"{b / lightly_step_s:.1f} img/s (x{ratio['step_only']:.2f}); step + augmentation ours "
        f"{b / ours_full:.1f} vs lightly {b / lightly_full:.1f} img/s (x{ratio['step_plus_augment']:.2f}); "
        f"augmentation ours {2 * b / med['ours_augment_s']:.0f} vs lightly "
        f"{2 * b / med['lightly_augment_s']:.0f} views/s -> {path}"
    )


if __name__ == "__main__":
    main()
