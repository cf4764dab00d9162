r"""Where one training step's time goes: a ``torch.profiler`` breakdown of ``Trainer._batch`` + ``optimize``.

The engine labels its phases (``step/augment``, ``step/forward``, ``step/backward``, ``step/optimizer``);
this script adds labels inside the method's forward for the student, predictor and teacher modules
(wrapping each module's call, compiled or not) and the EMA update, so ``forward`` splits into those and a
remainder (loss, queue, normalisation). Same Trainer and data as ``train_throughput.py`` (recipe
training/cifar10-METHOD.yaml, CIFAR-10 decoded in memory). Warm-up steps (compilation) run unprofiled;
then ``--steps`` steps are profiled. Per label: calls, host (CPU) time and device (CUDA kernel) time per
step; plus the top operators by self time on the device (CUDA) or host (CPU), and the wall time per step
measured with and without the profiler (its own overhead); shares are of the profiled step's wall time.
Writes ``profile_step.json`` (``profile_step_cuda.json`` on a GPU machine).

    .venv/bin/python benchmarks/profile_step.py                  # ISD R18, batch 512 (the GPU run)
    .venv/bin/python benchmarks/profile_step.py --arch small_cnn --batch 128 --steps 3 --threads 1
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile, record_function, schedule

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent)]
from _harness import machine_info, sync, write_result  # noqa: E402
from train_throughput import RECIPES, build_trainer, shared_data  # noqa: E402

from isdretrieve.train import engine
from isdretrieve.train.batches import epoch_generator

STEP_PHASES = ("step/augment", "step/forward", "step/backward", "step/optimizer")
METHOD_PARTS = ("method/student", "method/predictor", "method/teacher", "method/ema")
TOP_OPS = 20


def label_module_calls(module: torch.nn.Module, label: str) -> None:
    """Run every call of ``module`` (compiled or not) under a profiler label.

    ``nn.Module.__call__`` dispatches to ``_compiled_call_impl`` when it is set (``Module.compile``), so
    wrapping that slot labels the call from outside any compiled region. Private torch API: benchmark only.
    """
    inner = module._compiled_call_impl or module._call_impl

    def labelled(*args, **kwargs):
        with record_function(label):
            return inner(*args, **kwargs)

    module._compiled_call_impl = labelled


@contextmanager
def labelled_ema() -> Iterator[None]:
    """Label ``ema_update`` in every method module that imported it, for the duration."""
    patched = []
    for name, mod in list(sys.modules.items()):
        original = getattr(mod, "ema_update", None)
        if name.startswith("isdretrieve.train.methods.") and original is not None:

            def labelled(*args, _f: Callable = original, **kwargs):
                with record_function("method/ema"):
                    return _f(*args, **kwargs)

            mod.ema_update = labelled
            patched.append((mod, original))
    try:
        yield
    finally:
        for mod, original in patched:
            mod.ema_update = original


def label_method(trainer: engine.Trainer) -> list[str]:
    """Label the method's student, predictor and teacher calls; the labels that apply to this method."""
    method, labels = trainer.method, []
    for part in ("student", "predictor", "teacher"):
        module = getattr(method, part, None)
        if isinstance(module, torch.nn.Module):
            label_module_calls(module, f"method/{part}")
            labels.append(f"method/{part}")
    return labels + ["method/ema"]


def device_time(event, prefix: str = "") -> float:
    """Device (CUDA) µs of a profiler average (``prefix="self_"``: its own), across torch versions."""
    old_name = getattr(event, f"{prefix}cuda_time_total", 0.0)
    return float(getattr(event, f"{prefix}device_time_total", old_name) or 0.0)


def step_once(trainer: engine.Trainer, batches, generator) -> None:
    trainer.optimize(trainer._batch(next(batches), generator))


def wall_per_step(trainer: engine.Trainer, batches, generator, steps: int) -> list[float]:
    times = []
    for _ in range(steps):
        sync(trainer.device)
        t0 = time.perf_counter()
        step_once(trainer, batches, generator)
        sync(trainer.device)
        times.append(time.perf_counter() - t0)
    return times


def breakdown(events, steps: int, labels: list[str], on_cuda: bool) -> tuple[dict, list[dict]]:
    """Per-label host/device ms per step from ``key_averages()``, and the top operators by self time."""
    phases = {}
    for event in events:
        if event.key in labels:
            phases[event.key] = {
                "calls_per_step": event.count / steps,
                "host_ms_per_step": event.cpu_time_total / 1e3 / steps,
                "device_ms_per_step": device_time(event) / 1e3 / steps,
            }
    own = set(STEP_PHASES) | set(METHOD_PARTS)
    key = (lambda e: device_time(e, "self_")) if on_cuda else (lambda e: float(e.self_cpu_time_total))
    ops = sorted((e for e in events if e.key not in own and not e.key.startswith("ProfilerStep")), key=key)
    top = [
        {
            "op": e.key,
            "calls_per_step": e.count / steps,
            "self_ms_per_step": key(e) / 1e3 / steps,
            "self_host_ms_per_step": e.self_cpu_time_total / 1e3 / steps,
        }
        for e in reversed(ops[-TOP_OPS:])
    ]
    return phases, top


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--method", default="isd", choices=list(RECIPES))
    parser.add_argument("--arch", default="resnet18", choices=["resnet18", "small_cnn"])
    parser.add_argument("--batch", type=int, default=512)
    parser.add_argument("--steps", type=int, default=5, help="profiled steps")
    parser.add_argument("--warmup", type=int, default=3, help="unprofiled steps first (compilation)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--trace", type=Path, default=None, help="also write a Chrome trace here")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = engine.resolve_device(args.device)
    if args.compile is None:
        args.compile = device.type == "cuda"
    on_cuda = device.type == "cuda"
    begun, machine_at_start = time.perf_counter(), machine_info()
    spec, preset, data_note = shared_data()

    with tempfile.TemporaryDirectory() as tmp, labelled_ema():
        torch.manual_seed(0)
        trainer = build_trainer(args.method, args.arch, args, spec, preset, Path(tmp))
        labels = list(STEP_PHASES) + label_method(trainer)
        generator = epoch_generator(trainer.recipe.engine.seed, 0, trainer.device, stream=1)
        batches = trainer.batches.epoch(0)
        for _ in range(args.warmup):
            step_once(trainer, batches, generator)
        plain = wall_per_step(trainer, batches, generator, args.steps)
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if on_cuda else [])
        cycles: list[tuple[dict, list[dict]]] = []

        def collect(prof) -> None:  # called once, when the profiled cycle ends
            cycles.append(breakdown(prof.key_averages(), args.steps, labels, on_cuda))
            if args.trace:
                prof.export_chrome_trace(str(args.trace))

        plan = schedule(wait=0, warmup=1, active=args.steps, repeat=1)
        with profile(activities=activities, schedule=plan, on_trace_ready=collect) as prof:
            profiled = []
            for _ in range(1 + args.steps):
                profiled += wall_per_step(trainer, batches, generator, 1)
                prof.step()
        phases, top = cycles[0]

    step_ms, profiled_ms = statistics.median(plain) * 1e3, statistics.mean(profiled[1:]) * 1e3
    time_key = "device_ms_per_step" if on_cuda else "host_ms_per_step"
    forward = phases.get("step/forward", {}).get(time_key, 0.0)
    inside = sum(phases.get(k, {}).get(time_key, 0.0) for k in METHOD_PARTS)
    labelled = sum(phases.get(k, {}).get(time_key, 0.0) for k in STEP_PHASES)
    result = {
        "protocol": {
            "data": data_note,
            "recipe": f"training/{RECIPES[args.method]}",
            "method": args.method,
            "arch": args.arch,
            "batch": args.batch,
            "warmup_steps": args.warmup,
            "profiled_steps": args.steps,
            "threads": torch.get_num_threads(),
            "device": str(device),
            "compile": args.compile,
            "autocast": str(trainer.autocast_dtype),
            "channels_last": trainer.channels_last,
            "labels": "step/* from the engine; method/* added by this script around the student, "
            "predictor and teacher calls and ema_update; forward remainder = step/forward - method/*",
            "times": "per step; device = CUDA kernel time attributed to the label, host = CPU time "
            "inside the label (on CUDA mostly launch and wait)",
        },
        "wall_ms_per_step": step_ms,
        "wall_ms_per_step_profiled": profiled_ms,
        "images_per_s": args.batch / (step_ms / 1e3),
        "phases": phases,
        "forward_remainder_ms_per_step": forward - inside,
        "unlabelled_ms_per_step": profiled_ms - labelled,
        "share_of_profiled_step": {k: v[time_key] / profiled_ms for k, v in phases.items()},
        "top_ops": top,
        "total_seconds": round(time.perf_counter() - begun, 1),
        "machine_at_start": machine_at_start,
    }
    print(f"{args.method} {args.arch} batch {args.batch} on {device}: {step_ms:.1f} ms/step")
    print(f"profiled: {profiled_ms:.1f} ms/step, {'device' if on_cuda else 'host'} time per label:")
    for name, row in phases.items():
        print(f"  {name:18s} {row[time_key]:9.2f} ms  ({row[time_key] / profiled_ms:6.1%})")
    print(f"  forward remainder  {forward - inside:9.2f} ms (loss, queue, normalisation)")
    print(f"  unlabelled         {profiled_ms - labelled:9.2f} ms (batch gather, zero_grad, Python)")
    print(write_result("profile_step", result))


if __name__ == "__main__":
    main()
