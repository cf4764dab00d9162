r"""Training throughput: one full step of ours vs the bare forward+backward+SGD of the same networks.

Ours = ``Trainer._batch`` (augment the method's views from the uint8 batch) + ``Trainer.optimize``
(method forward: student, EMA update, teacher, queue/loss; backward; SGD), with a Trainer built from the
CIFAR-10 recipe (training/cifar10-{isd,isd-mlp,moco,byol}.yaml) and ``--set``-style overrides: the shared
CIFAR-10 copy decoded once and held in memory (digits when it is absent), monitor off, batch and arch from
the flags, ``engine.compile`` off on CPU. Bare = on the *same already-augmented views* and the same modules:
the student (backbone + projection + predictor, as the method uses them) forward and backward of a trivial
loss (mean of squares), one SGD step (same lr, momentum, wd), plus the teacher's forward under no_grad;
no augmentation, no EMA update, no queue, no real loss. ISD, ISD-MLP, MoCo: 1 student + 1 teacher forward;
BYOL: 2 + 2 (symmetric). Steps alternate ours / bare; warm-up steps are excluded; figures are medians.

Also timed, per method: the data pipeline alone (``augment_views`` for the method's views, as the engine
makes them: on CUDA with ``--compile`` the colour ops after the random draws are compiled, and the strong
view is also timed eagerly), the strong view with and without colour jitter, and the eager jitter itself
in both of ``color_jitter``'s modes: masked (every op on the whole batch at each of its 4 order positions,
masked; the GPU default: no host sync) and gather (each op only on the samples that take it there; the
CPU default); their outputs are checked equal.

How near the hardware's limit: each method's matmul + convolution FLOPs per image (counted once by
``torch.utils.flop_counter``), the TFLOP/s our step achieves, and that as a fraction of the device's dense
GEMM rate in the step's precision (bf16 on CUDA, fp32 on CPU), measured in the same run.

    .venv/bin/python benchmarks/train_throughput.py         # R18, batch 512: train_throughput.json
    # the CPU runs (another batch writes train_throughput_bN.json):
    .venv/bin/python benchmarks/train_throughput.py --steps 3 --warmup 1 --threads 1
    .venv/bin/python benchmarks/train_throughput.py --arch small_cnn resnet18 --batch 128 --steps 3 \
        --warmup 1 --threads 1
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent)]
from _harness import (  # noqa: E402
    cifar_root,
    dense_gemm_tflops,
    machine_info,
    median_time,
    sync,
    write_result,
)

from isdretrieve.data.augment import augment_views, color_jitter
from isdretrieve.data.datasets import ArrayDataset
from isdretrieve.data.open import open_dataset
from isdretrieve.train import engine
from isdretrieve.train.batches import StepBatch, epoch_generator
from isdretrieve.train.methods.byol import BYOL
from isdretrieve.train.recipe import load_recipe

REPO = HERE.parent
RECIPES = {
    "isd": "cifar10-isd.yaml",
    "isd-mlp": "cifar10-isd-mlp.yaml",
    "moco": "cifar10-moco.yaml",
    "byol": "cifar10-byol.yaml",
}
TARGET_IMAGES_PER_S = 17_000  # ISD R18 on an H100; no CPU target
DEFAULT_BATCH = 512  # the protocol; other batches write their own result file


def shared_data() -> tuple[str, str, str]:
    """The data SPEC and preset; every Trainer of this run reuses one decoded in-memory copy of it."""
    root = cifar_root()
    spec, preset = (f"folder:{root},split=train", "cifar") if root else ("digits", "digits")
    source = open_dataset(spec)
    decoded = ArrayDataset(source.spec, source.load_all(num_workers=2), source.labels, source.classes)
    opened = engine.open_dataset
    engine.open_dataset = lambda s, **kw: decoded if s == spec else opened(s, **kw)  # skip re-decoding
    data = "CIFAR-10 (JPEG q75 copy), train split" if root else "digits, train split (CIFAR copy absent)"
    return spec, preset, f"{data}, {len(decoded)} images decoded in memory"


def build_trainer(method: str, arch: str, args, spec: str, preset: str, out: Path) -> engine.Trainer:
    sets = [
        f"data.train={spec}",
        f"data.preset={preset}",
        "data.in_memory='yes'",  # quoted: bare yes is YAML for true
        f"model.arch={arch}",
        f"optim.batch_size={args.batch}",
        f"engine.device={args.device}",
        f"engine.compile={str(args.compile).lower()}",
        "monitor.every=0",
    ]
    recipe = load_recipe(REPO / "training" / RECIPES[method], sets)
    return engine.Trainer(recipe, out / f"{method}-{arch}", quiet=True)


def bare_step(trainer: engine.Trainer, optimizer: torch.optim.Optimizer, views: list[torch.Tensor]) -> None:
    """Student forward + backward of a trivial loss + SGD, and the teacher's forward: nothing else."""
    method = trainer.method
    predictor = getattr(method, "predictor", None) or nn.Identity()
    teacher_in, student_in = (views, views) if isinstance(method, BYOL) else ([views[0]], [views[1]])
    dtype = trainer.autocast_dtype
    with torch.autocast(trainer.device.type, dtype=dtype, enabled=dtype is not None):
        outs = [predictor(method.student(v)) for v in student_in]
        with torch.no_grad():
            for v in teacher_in:
                method.teacher(v)
        loss = sum(o.float().square().mean() for o in outs)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()


def pipeline(trainer: engine.Trainer, images: torch.Tensor, repeat: int, compiled: bool) -> dict:
    """Views/s of the method's views and of the strong view with/without jitter, made as the engine
    makes them (colour ops compiled with ``compiled``, then also the strong view eager), and the time of
    the eager jitter alone in its masked and gathered modes."""
    device, views = trainer.device, trainer.method.views
    gen = torch.Generator(device=device).manual_seed(1)
    strong = trainer.views["strong"]
    no_jitter = replace(strong, jitter_p=0.0)
    b = len(images)
    t_views = median_time(
        lambda: [augment_views(images, trainer.views[s], gen, compiled=compiled) for s in views],
        device,
        repeat,
    )
    t_strong = median_time(lambda: augment_views(images, strong, gen, compiled=compiled), device, repeat)
    t_plain = median_time(lambda: augment_views(images, no_jitter, gen, compiled=compiled), device, repeat)
    x = torch.rand(images.shape, generator=gen, device=device)
    factors = 0.6 + 0.8 * torch.rand((b, 4), generator=gen, device=device)
    factors[:, 3] -= 1.0  # hue in [-0.4, 0.4]
    order = torch.rand((b, 4), generator=gen, device=device).argsort(dim=1)
    apply = torch.rand(b, generator=gen, device=device) < strong.jitter_p

    def jitter(gather: bool) -> torch.Tensor:
        return color_jitter(x, factors, order, apply, strong.jitter, gather=gather)

    t_masked = median_time(lambda: jitter(False), device, repeat)
    t_gather = median_time(lambda: jitter(True), device, repeat)
    same = torch.equal(jitter(False), jitter(True))
    extra = {}
    if compiled:  # the same strong view made eagerly (the default mode of colour jitter on this device)
        t_eager = median_time(lambda: augment_views(images, strong, gen), device, repeat)
        extra["strong_views_per_s_eager"] = b / t_eager
        extra["compiled_over_eager_strong_views"] = t_eager / t_strong
    return {
        "views": list(views),
        "method_views_per_s": len(views) * b / t_views,
        "strong_views_per_s": b / t_strong,
        "strong_views_per_s_without_jitter": b / t_plain,
        "jitter_share_of_strong_view": (t_strong - t_plain) / t_strong,
        "color_jitter_masked_s_per_batch": t_masked,
        "color_jitter_gather_s_per_batch": t_gather,
        "jitter_default": "gather" if device.type == "cpu" else "masked",
        "gather_same_output": same,
        **extra,
        "_strong_jitter_s": t_strong - t_plain,
    }


def flops_per_image(trainer: engine.Trainer, images: int = 16) -> float:
    """Matmul and convolution FLOPs of one ``Trainer.optimize`` per image (forward incl. teacher and loss,
    backward), counted by ``FlopCounterMode`` on a sub-batch of ``images`` run eagerly; every counted
    product is linear in the batch. Elementwise work (BN, EMA, SGD) is not counted. Takes one real step."""
    data = next(trainer.batches.epoch(1))
    sub = StepBatch(*(_head(t, images) if t is not None else None for t in data))
    set_stance = getattr(torch.compiler, "set_stance", None)  # torch >= 2.6: run compiled code eagerly
    with set_stance("force_eager") if set_stance else contextlib.nullcontext():
        batch = trainer._batch(sub, epoch_generator(0, 1, trainer.device))
        with FlopCounterMode(display=False) as counter:
            trainer.optimize(batch)
    return counter.get_total_flops() / images


def _head(field: torch.Tensor | tuple[torch.Tensor, ...], n: int) -> torch.Tensor | tuple[torch.Tensor, ...]:
    """The first ``n`` samples of a ``StepBatch`` field (worker crops: of each view-size stack)."""
    return tuple(t[:n] for t in field) if isinstance(field, tuple) else field[:n]


def bare_optimizer(trainer: engine.Trainer) -> torch.optim.Optimizer:
    """SGD over the method's trainable parameters with the recipe's hyper-parameters."""
    params = [p for p in trainer.method.parameters() if p.requires_grad]
    o = trainer.recipe.optim
    return torch.optim.SGD(params, lr=o.lr, momentum=o.momentum, weight_decay=o.weight_decay)


def measure(trainer: engine.Trainer, args) -> dict:
    """Alternate ours / bare on the same batches; seconds per step after warm-up, split for ours."""
    device = trainer.device
    bare_opt = bare_optimizer(trainer)
    gen = epoch_generator(trainer.recipe.engine.seed, 0, device, stream=1)
    batches = trainer.batches.epoch(0)
    aug, opt, bare, losses = [], [], [], []
    for i in range(args.warmup + args.steps):
        data = next(batches)
        sync(device)
        t0 = time.perf_counter()
        batch = trainer._batch(data, gen)
        sync(device)
        t1 = time.perf_counter()
        out, _ = trainer.optimize(batch)
        sync(device)
        t2 = time.perf_counter()
        bare_step(trainer, bare_opt, batch.views)
        sync(device)
        t3 = time.perf_counter()
        losses.append(float(out.loss.detach()))
        if i >= args.warmup:
            aug.append(t1 - t0)
            opt.append(t2 - t1)
            bare.append(t3 - t2)
    step = [a + b for a, b in zip(aug, opt, strict=True)]
    return {"augment_s": aug, "optimize_s": opt, "ours_step_s": step, "bare_s": bare, "losses": losses}


def back_to_back(trainer: engine.Trainer, steps: int, flops: float, gemm_tflops: float) -> dict:
    """``steps`` consecutive steps of ours, then of bare, each run with one device sync at the end, as the
    engine runs them between log steps: the host queues the next batch's views while the GPU still runs
    this step. Bare repeats its step on one batch's views. Images/s, ratio and TFLOP/s as the main row."""
    device, seed, b = trainer.device, trainer.recipe.engine.seed, trainer.batches.batch_size
    steps = min(steps, trainer.batches.steps_per_epoch - 2)
    gen = epoch_generator(seed, 2, device, stream=1)
    batches = trainer.batches.epoch(2)  # a fresh epoch: its index copy happens in the warm-up step
    trainer.optimize(trainer._batch(next(batches), gen))
    views, bare_opt = trainer._batch(next(batches), gen).views, bare_optimizer(trainer)
    bare_step(trainer, bare_opt, views)

    def ours() -> None:
        for _ in range(steps):
            trainer.optimize(trainer._batch(next(batches), gen))

    def bare() -> None:
        for _ in range(steps):
            bare_step(trainer, bare_opt, views)

    seconds = {}
    for name, run in (("ours", ours), ("bare", bare)):
        sync(device)
        start = time.perf_counter()
        run()
        sync(device)
        seconds[name] = (time.perf_counter() - start) / steps
    achieved = flops * b / seconds["ours"] / 1e12
    return {
        "steps": steps,
        "ours_s_per_step": seconds["ours"],
        "bare_s_per_step": seconds["bare"],
        "ours_images_per_s": b / seconds["ours"],
        "bare_images_per_s": b / seconds["bare"],
        "ratio_over_bare": seconds["ours"] / seconds["bare"],
        "achieved_tflops": achieved,
        "fraction_of_gemm": achieved / gemm_tflops,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", nargs="+", default=list(RECIPES), choices=list(RECIPES))
    parser.add_argument("--arch", nargs="+", default=["resnet18"], choices=["resnet18", "small_cnn"])
    parser.add_argument(
        "--batch", type=int, default=DEFAULT_BATCH, help="another batch writes train_throughput_bN.json"
    )
    parser.add_argument("--steps", type=int, default=5, help="timed steps per method (after warm-up)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--pipeline-repeat", type=int, default=5)
    parser.add_argument(
        "--back-to-back",
        type=int,
        default=None,
        help="also time this many consecutive steps with one sync at the end (default: 40 on CUDA, where "
        "the host runs ahead of the GPU; 0, skipped, elsewhere)",
    )
    parser.add_argument("--device", default="auto")
    parser.add_argument(
        "--compile",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="torch.compile the student and teacher, and on CUDA the views' colour ops (default: on CUDA "
        "only, as the recipes; the other setting writes NAME_compiled.json or NAME_eager.json)",
    )
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    on_cuda = engine.resolve_device(args.device).type == "cuda"
    compile_default = on_cuda  # as the recipes
    if args.compile is None:
        args.compile = compile_default
    if args.back_to_back is None:
        args.back_to_back = 40 if on_cuda else 0
    begun, machine_at_start = time.perf_counter(), machine_info()
    spec, preset, data_note = shared_data()

    figures, ratios, gemm = {}, {}, {}
    name = "train_throughput" if args.batch == DEFAULT_BATCH else f"train_throughput_b{args.batch}"
    if args.compile != compile_default:  # e.g. _compiled on CPU: never overwrite the default rows
        name += "_compiled" if args.compile else "_eager"
    with tempfile.TemporaryDirectory() as tmp:
        for arch in args.arch:
            for method in args.methods:
                torch.manual_seed(0)
                trainer = build_trainer(method, arch, args, spec, preset, Path(tmp))
                runs = measure(trainer, args)
                images = trainer.batches.images[: args.batch]
                pipe = pipeline(trainer, images, args.pipeline_repeat, trainer.compile_views)
                step, opt, aug = (
                    statistics.median(runs[k]) for k in ("ours_step_s", "optimize_s", "augment_s")
                )
                bare = statistics.median(runs["bare_s"])
                b = args.batch
                flops = flops_per_image(trainer)
                if not gemm:  # the device's GEMM rate in the step's precision, once
                    dtype = trainer.autocast_dtype or torch.float32
                    gemm = {"dtype": str(dtype), "tflops": dense_gemm_tflops(trainer.device, dtype)}
                chained = None
                if args.back_to_back:
                    chained = back_to_back(trainer, args.back_to_back, flops, gemm["tflops"])
                achieved = flops * b / step / 1e12
                jitter_s = pipe.pop("_strong_jitter_s") * trainer.method.views.count("strong")
                row = {
                    "ours_images_per_s": b / step,
                    "ours_optimize_only_images_per_s": b / opt,
                    "bare_images_per_s": b / bare,
                    "ratio_step_over_bare": step / bare,
                    "ratio_optimize_over_bare": opt / bare,
                    "gflops_per_image": flops / 1e9,
                    "achieved_tflops": achieved,
                    "fraction_of_gemm": achieved / gemm["tflops"],
                    "augment_share_of_step": aug / step,
                    "jitter_share_of_step": jitter_s / step,
                    "back_to_back": chained,
                    "pipeline": pipe,
                    "device": str(trainer.device),
                    "autocast": str(trainer.autocast_dtype),
                    "channels_last": trainer.channels_last,
                    "compile": args.compile,
                    "losses_finite": all(torch.isfinite(torch.tensor(runs["losses"])).tolist()),
                    "runs": runs,
                }
                figures.setdefault(arch, {})[method] = row
                ratios[f"{arch}/{method}"] = round(step / bare, 3)
                print(
                    f"{arch:9s} {method:8s} ours {b / step:7.1f} img/s (optimize only {b / opt:7.1f}), "
                    f"bare {b / bare:7.1f} img/s: ratio {step / bare:.3f} (optimize {opt / bare:.3f}); "
                    f"augment {aug / step:.1%} of the step, jitter {jitter_s / step:.1%}; "
                    f"views {pipe['method_views_per_s']:.0f}/s; {flops / 1e9:.2f} GFLOP/image, "
                    f"{achieved:.3f} TFLOP/s",
                    flush=True,
                )
                if chained:
                    c = chained
                    print(
                        f"{'':18s} back to back ({c['steps']} steps, one sync): ours "
                        f"{c['ours_images_per_s']:7.1f} img/s, bare {c['bare_images_per_s']:7.1f} img/s: "
                        f"ratio {c['ratio_over_bare']:.3f}, {c['achieved_tflops']:.3f} TFLOP/s",
                        flush=True,
                    )
                del trainer
                result = payload(args, data_note, figures, ratios, gemm, machine_at_start, begun)
                print(write_result(name, result))  # after each method: a run stopped early keeps its rows


def payload(
    args, data_note: str, figures: dict, ratios: dict, gemm: dict, machine_at_start: dict, begun: float
) -> dict:
    """The JSON result of the rows measured so far."""
    isd18 = figures.get("resnet18", {}).get("isd")
    on_gpu = isd18 is not None and isd18["device"].startswith("cuda")
    return {
        "protocol": {
            "data": data_note,
            "recipes": {m: f"training/{RECIPES[m]}" for m in args.methods},
            "overrides": "data.train/preset/in_memory=yes, model.arch, optim.batch_size, engine.device, "
            "engine.compile, monitor.every=0 (recipe lr/momentum/wd; lr not warmed up)",
            "batch": args.batch,
            "archs": args.arch,
            "warmup_steps": args.warmup,
            "timed_steps": args.steps,
            "threads": torch.get_num_threads(),
            "ours": "Trainer._batch (views from the uint8 batch) + Trainer.optimize (method forward incl. "
            "EMA update, teacher, queue, loss; backward; SGD step)",
            "bare": "same modules and already-augmented views: student (+projection/predictor) forward, "
            "mean-of-squares loss, backward, SGD step (same hyper-parameters), teacher forward under "
            "no_grad; ISD/ISD-MLP/MoCo 1 student + 1 teacher view, BYOL 2 + 2; no augmentation, EMA, "
            "queue or real loss",
            "timing": "ours and bare alternate on the same batches; medians over the timed steps; "
            "ratio = ours seconds per step / bare seconds per step (>= 1 is our overhead)",
            "flops": "matmul + convolution FLOPs of one optimize (forward incl. teacher and loss, backward) "
            "per image, counted by torch.utils.flop_counter on a 16-image sub-batch run eagerly; "
            "achieved TFLOP/s = FLOPs/image x ours images/s; fraction_of_gemm = achieved / the device's "
            "square GEMM rate in the step's precision, measured in the same run (dense_gemm)",
            "back_to_back": "on CUDA (--back-to-back N): N consecutive steps of ours (batch fetch, views, "
            "optimize), then N bare steps, each with one device sync at the end, as the engine's loop runs "
            "between log steps: the headline images/s for the GPU target. The alternating timings sync "
            "between phases, so there the host never runs ahead of the GPU",
            "pipeline": f"augment_views on one batch, median of {args.pipeline_repeat} after a warm-up; "
            "jitter share = (strong view - strong view with jitter_p=0) x strong views / ours step",
        },
        "figures": figures,
        "dense_gemm": gemm,
        "ratio": ratios,
        "target": f">= {TARGET_IMAGES_PER_S} img/s for ISD R18 on an H100 (GPU only; none on CPU)",
        "meets_target": (headline_images_per_s(isd18) >= TARGET_IMAGES_PER_S) if on_gpu else None,
        "machine_at_start": machine_at_start,
        "total_seconds": round(time.perf_counter() - begun, 1),
    }


def headline_images_per_s(row: dict) -> float:
    """Back to back where measured (what an epoch sees), else the alternating steps' median."""
    return row["back_to_back"]["ours_images_per_s"] if row.get("back_to_back") else row["ours_images_per_s"]


if __name__ == "__main__":
    main()
