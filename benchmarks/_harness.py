"""Shared benchmark harness: describe the machine, time a function, write a JSON result."""

from __future__ import annotations

import contextlib
import importlib
import json
import os
import platform
import statistics
import tarfile
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch

RESULTS = Path(__file__).resolve().parent / "results"
REPO = RESULTS.parents[1]
CIFAR_TARBALL = REPO.parent / "shared" / "data" / "cifar10-jpeg.tar.gz"
CIFAR_DIR = REPO / ".data" / "cifar10-jpeg"  # git-ignored


def cifar_root() -> Path | None:
    """The shared CIFAR-10 JPEG copy (train/, test/), unpacked into .data/ on first use; None if absent."""
    if not (CIFAR_DIR / "train").is_dir():
        if not CIFAR_TARBALL.exists():
            return None
        CIFAR_DIR.mkdir(parents=True, exist_ok=True)
        with tarfile.open(CIFAR_TARBALL) as tar:
            tar.extractall(CIFAR_DIR, filter="data")
    return CIFAR_DIR


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_name() -> str:
    """The accelerator a run uses by default: the CUDA device's name, else "cpu"."""
    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"


def versions() -> dict[str, str]:
    found = {"python": platform.python_version()}
    for name in ("isdretrieve", "torch", "numpy", "h5py", "faiss"):
        with contextlib.suppress(ImportError, AttributeError):
            found[name] = str(importlib.import_module(name).__version__)
    return found


def machine_info() -> dict[str, Any]:
    """What the numbers ran on (no hostname): CPU model, cores, torch threads, load, OS, device."""
    load = [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None
    return {
        "cpu": _cpu_model(),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "load_average_1_5_15": load,
        "os": f"{platform.system()} {platform.release()}",
        "device": device_name(),
        "cuda": torch.version.cuda,
    }


def random_encoder(path: Path, arch: str, image_size: int, *, seed: int = 0) -> Path:
    """A random-init ``arch`` (CIFAR stem for the ResNets) exported as ``encoder.pt`` for ``image_size``."""
    from isdretrieve.files.encoder_header import IMAGENET_MEAN, IMAGENET_STD, EncoderHeader
    from isdretrieve.models.backbones import build_backbone
    from isdretrieve.models.checkpoints import export_encoder

    torch.manual_seed(seed)
    cifar_stem = arch != "small_cnn"
    backbone = build_backbone(arch, cifar_stem=cifar_stem)
    header = EncoderHeader(arch, cifar_stem, backbone.feature_dim, image_size, IMAGENET_MEAN, IMAGENET_STD)
    export_encoder(backbone, header, path)
    return path


def summary(runs: list[float]) -> dict[str, Any]:
    """Best and median of run times in seconds (and the runs themselves)."""
    return {"best_s": min(runs), "median_s": statistics.median(runs), "runs_s": runs}


def timed(fn: Callable[[], Any], repeat: int = 3) -> dict[str, Any]:
    """Run ``fn`` ``repeat`` times; seconds of each run, their best and their median."""
    runs = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        runs.append(time.perf_counter() - start)
    return summary(runs)


def write_result(name: str, result: dict[str, Any]) -> Path:
    """Write ``benchmarks/results/NAME.json`` (``NAME_cuda.json`` on a machine with CUDA, so that a GPU
    run never overwrites the CPU figures): machine, device, versions, then ``result``."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    payload = {"benchmark": name, "written": datetime.now(UTC).isoformat(timespec="seconds")}
    payload |= {"machine": machine_info(), "device": device_name(), "versions": versions(), **result}
    path = RESULTS / (f"{name}_cuda.json" if torch.cuda.is_available() else f"{name}.json")
    path.write_text(json.dumps(payload, indent=2) + "\n")
    return path


def sync(device: torch.device) -> None:
    """Wait for the device's queued work (a no-op off CUDA), so that host timings cover it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_time(fn: Callable[[], Any], device: torch.device, repeat: int) -> float:
    """Median seconds of ``repeat`` device-synchronised runs of ``fn`` after one warm-up run."""
    fn()  # warm-up
    runs = []
    for _ in range(repeat):
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        runs.append(time.perf_counter() - start)
    return statistics.median(runs)


def dense_gemm_tflops(
    device: torch.device, dtype: torch.dtype, n: int | None = None, repeat: int = 5
) -> float:
    """The device's dense GEMM rate in TFLOP/s: median of ``repeat`` square [n × n] @ [n × n] products
    in ``dtype`` (n = 8192 on CUDA, 2048 elsewhere), after one warm-up."""
    n = n or (8192 if device.type == "cuda" else 2048)
    a, b = (torch.randn(n, n, device=device).to(dtype) for _ in range(2))
    return 2 * n**3 / median_time(lambda: a @ b, device, repeat) / 1e12
