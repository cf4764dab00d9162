"""Export overhead: ``export_bank`` vs a bare forward pass of the same model over the same batches.

Both sides get the same images, already decoded in memory (CIFAR-10 test split from the shared JPEG
copy, or the embedded digits when that copy is absent), the same batch size and the same eval transform;
the ratio is the export's own cost (model load, fingerprint, normalisation, HDF5 writes, bookkeeping).
Runs alternate bare / export to share any background load. Target: ratio <= 1.10. On CUDA both sides run
as the export does there (bf16 autocast, channels_last) and bare also copies the features back to the host.

    python benchmarks/export_overhead.py [--threads 1] [--repeat 5] [--batch-size 256]
    python benchmarks/export_overhead.py --device cuda --arch resnet18     # on a GPU machine
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent)]  # the harness, and this checkout's isdretrieve
from _harness import cifar_root, random_encoder, summary, timed, write_result  # noqa: E402

from isdretrieve.bank.export import export_bank
from isdretrieve.data.augment import eval_view
from isdretrieve.data.datasets import ArrayDataset
from isdretrieve.data.open import open_dataset
from isdretrieve.models.checkpoints import load_backbone

REPO = HERE.parent
TARGET = 1.10


class InMemory(ArrayDataset):
    """Decoded images in memory that still name their files, so the export writes the real paths."""

    def __init__(self, source) -> None:
        super().__init__(source.spec, source.load_all(num_workers=2), source.labels, source.classes)
        self.names = [source.path(i) for i in range(len(source))]

    def path(self, i: int) -> str:
        return self.names[i]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1)")
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--arch", default="small_cnn", choices=["small_cnn", "resnet18"])
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)

    root = cifar_root()
    spec, size = (f"folder:{root.relative_to(REPO)},split=test", 32) if root else ("digits", 16)
    data = InMemory(open_dataset(spec))
    bs = args.batch_size
    with tempfile.TemporaryDirectory() as tmp:
        encoder = random_encoder(Path(tmp) / "encoder.pt", args.arch, size)
        model, _ = load_backbone(encoder)
        model = model.to(device)
        on_cuda = device.type == "cuda"
        if on_cuda:
            model = model.to(memory_format=torch.channels_last)
        preset = {16: "digits", 32: "cifar"}[size]

        @torch.inference_mode()
        def bare() -> None:
            for a in range(0, len(data), bs):
                x = eval_view(data.images[a : a + bs].to(device, non_blocking=True), preset)
                with torch.autocast("cuda", dtype=torch.bfloat16, enabled=on_cuda):
                    y = model(x.contiguous(memory_format=torch.channels_last) if on_cuda else x)
                F.normalize(y.float(), dim=1).cpu()

        def export() -> None:
            out = Path(tmp) / "bank.h5"
            out.unlink(missing_ok=True)
            export_bank(encoder, data, out, batch_size=bs, device=str(device), workers=0)

        bare(), export()  # warm-up
        bare_runs, export_runs = [], []
        for _ in range(args.repeat):
            bare_runs += timed(bare, 1)["runs_s"]
            export_runs += timed(export, 1)["runs_s"]
    b, e = summary(bare_runs), summary(export_runs)
    n = len(data)
    result = {
        "protocol": {
            "data": "CIFAR-10 (JPEG q75 copy), test split" if root else "digits, train split",
            "images": n,
            "encoder": f"{args.arch}, random init (seed 0), image_size {size}",
            "eval_transform": preset,
            "batch_size": bs,
            "dtype": "bf16 autocast, channels_last" if on_cuda else "float32",
            "threads": args.threads,
            "device": str(device),
            "timing": f"{args.repeat} alternating runs each after one warm-up; images decoded in memory "
            "beforehand; bare = eval_view + forward + normalise; export = export_bank (model load, "
            "fingerprint, HDF5 file, per-batch writes + flush + rows_done)",
        },
        "figures": {
            "bare_images_per_s_best": n / b["best_s"],
            "export_images_per_s_best": n / e["best_s"],
            "bare_images_per_s_median": n / b["median_s"],
            "export_images_per_s_median": n / e["median_s"],
            "bare_s": b,
            "export_s": e,
        },
        "ratio": e["best_s"] / b["best_s"],
        "ratio_median": e["median_s"] / b["median_s"],
        "target": TARGET,
        "meets_target": e["best_s"] / b["best_s"] <= TARGET,
    }
    path = write_result("export_overhead", result)
    fig = result["figures"]
    print(
        f"{spec}: {n} images, {args.arch}, batch {bs}, {device}, {args.threads} thread(s): "
        f"bare {fig['bare_images_per_s_best']:.0f} img/s, "
        f"export {fig['export_images_per_s_best']:.0f} img/s (best of {args.repeat}); "
        f"ratio {result['ratio']:.3f} (median {result['ratio_median']:.3f}), target <= {TARGET} -> {path}"
    )


if __name__ == "__main__":
    main()
