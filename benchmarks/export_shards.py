"""Bank export from webdataset shards: ``export_bank`` over ``wds:`` vs a bare forward pass.

The CIFAR-10 test split of the shared JPEG copy (the original JPEG bytes; the embedded digits as PNG
when that copy is absent) is written as ``--shards`` tar shards. Bare = the same model over the same
images already decoded in memory (the export's own per-batch step: eval transform, forward, normalise,
copy to the host); export =
``export_bank`` over the shards with ``--workers`` loader workers (tar reads, JPEG decode, HDF5 writes,
shard bookkeeping). The ratio says how much of the encoder's rate the shard path keeps. On CUDA both
sides use bf16 autocast and channels_last, as the export does.

    python benchmarks/export_shards.py [--workers 2] [--repeat 3] [--threads 1]
    python benchmarks/export_shards.py --device cuda --arch resnet18 --workers 8   # on a GPU machine
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent)]  # the harness, and this checkout's isdretrieve
from _harness import cifar_root, random_encoder, summary, sync, timed, write_result  # noqa: E402

from isdretrieve.bank.export import export_bank
from isdretrieve.data.open import open_dataset
from isdretrieve.data.shards import write_shards
from isdretrieve.encoder import FrozenEncoder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1)")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--shards", type=int, default=16)
    parser.add_argument("--workers", type=int, default=2, help="export loader workers")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--arch", default="small_cnn", choices=["small_cnn", "resnet18", "resnet50"])
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    on_cuda = device.type == "cuda"

    root = cifar_root()
    source = open_dataset(f"folder:{root},split=test" if root else "digits")
    size = source.image_size[0]
    with tempfile.TemporaryDirectory() as tmp:
        write_shards(source, Path(tmp) / "shards", shards=args.shards)
        spec = f"wds:{tmp}/shards/{{00000..{args.shards - 1:05d}}}.tar"
        images = source.load_all(num_workers=2)
        encoder = random_encoder(Path(tmp) / "encoder.pt", args.arch, size)
        bs = args.batch_size
        frozen = FrozenEncoder.load(encoder, device=device, batch_size=bs)

        @torch.inference_mode()
        def bare() -> None:  # the export's own per-batch embedding, over decoded images
            for a in range(0, len(images), bs):
                frozen.embed(images[a : a + bs])
            sync(device)

        def export() -> None:
            out = Path(tmp) / "bank.h5"
            out.unlink(missing_ok=True)
            export_bank(encoder, spec, out, batch_size=bs, device=str(device), workers=args.workers)

        bare(), export()  # warm-up
        bare_runs, export_runs = [], []
        for _ in range(args.repeat):  # alternate, so that background load hits both alike
            bare_runs += timed(bare, 1)["runs_s"]
            export_runs += timed(export, 1)["runs_s"]
    b, e, n = summary(bare_runs), summary(export_runs), len(images)
    result = {
        "protocol": {
            "data": "CIFAR-10 (JPEG q75 copy), test split, original JPEG bytes"
            if root
            else "digits, train split, PNG",
            "images": n,
            "shards": args.shards,
            "encoder": f"{args.arch}, random init (seed 0), image_size {size}",
            "batch_size": bs,
            "export_workers": args.workers,
            "dtype": "bf16 autocast, channels_last" if on_cuda else "float32",
            "threads": args.threads,
            "device": str(device),
            "timing": f"{args.repeat} alternating runs each after one warm-up; bare = in-memory decoded "
            "images, eval_view + forward + normalise + copy to host; export = export_bank over wds: "
            "(header scan, tar reads, decode in workers, HDF5 writes, shard bookkeeping)",
        },
        "figures": {
            "bare_images_per_s_best": n / b["best_s"],
            "export_images_per_s_best": n / e["best_s"],
            "bare_s": b,
            "export_s": e,
        },
        "ratio": e["best_s"] / b["best_s"],
    }
    path = write_result("export_shards", result)
    fig = result["figures"]
    print(
        f"{n} images in {args.shards} shards, {args.arch}, batch {bs}, {device}, {args.workers} workers: "
        f"bare {fig['bare_images_per_s_best']:.0f} img/s, export {fig['export_images_per_s_best']:.0f} img/s "
        f"(best of {args.repeat}); time ratio {result['ratio']:.2f} -> {path}"
    )


if __name__ == "__main__":
    main()
