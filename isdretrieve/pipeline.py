"""From a checkpoint to a searchable index directory: encoder export, bank export, FAISS index.

``indices/NAME/`` ends up holding ``encoder.pt`` (backbone only, used by ``Retriever`` to embed queries),
``bank.h5`` and ``index.faiss`` + ``manifest.json``. Every step is resumable or idempotent, so rerunning
the same command after a crash finishes the job.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from isdretrieve.bank.embeddings_in import import_embeddings
from isdretrieve.bank.export import export_bank
from isdretrieve.encoder import encoder_fingerprint
from isdretrieve.errors import BankError
from isdretrieve.files.manifest import IndexManifest
from isdretrieve.index.build import build_index, staged_bank
from isdretrieve.models.checkpoints import export_encoder, load_backbone

if TYPE_CHECKING:
    from isdretrieve.index.milvus.connect import MilvusTarget


def export_index_encoder(checkpoint: str | Path, out_dir: Path, *, which: str = "student") -> Path:
    """Write the backbone of ``checkpoint`` as ``out_dir/encoder.pt`` (kept if it holds the same weights)."""
    backbone, header = load_backbone(checkpoint, which=which)
    target = out_dir / "encoder.pt"
    if target.exists():
        existing, existing_header = load_backbone(target)
        if encoder_fingerprint(existing, existing_header) == encoder_fingerprint(backbone, header):
            return target
        raise BankError(f"{out_dir} already holds another encoder: delete it or choose another --out")
    out_dir.mkdir(parents=True, exist_ok=True)
    export_encoder(backbone, header, target)
    return target


def build_index_from_checkpoint(
    checkpoint: str | Path,
    data: str,
    out_dir: str | Path,
    *,
    which: str = "student",
    factory: str = "auto",
    recall_target: float = 0.95,
    memory_budget: int | None = None,
    dtype: str = "float32",
    batch_size: int = 256,
    device: str = "auto",
    workers: int = 2,
    on_bad_image: str = "error",
    progress: bool = False,
    backend: str = "faiss",
    milvus: MilvusTarget | None = None,
) -> IndexManifest:
    """Encoder export → bank export (resumable) → index build, all inside ``out_dir`` (with
    ``backend="milvus"`` the index is the collection ``milvus`` names)."""
    out_dir = Path(out_dir)
    encoder = export_index_encoder(checkpoint, out_dir, which=which)
    export_bank(
        encoder,
        data,
        out_dir / "bank.h5",
        dtype=dtype,
        batch_size=batch_size,
        device=device,
        workers=workers,
        on_bad_image=on_bad_image,
        progress=progress,
    )
    return build_index(
        out_dir / "bank.h5",
        out_dir,
        factory=factory,
        recall_target=recall_target,
        memory_budget=memory_budget,
        progress=progress,
        backend=backend,
        milvus=milvus,
    )


def build_index_from_embeddings(
    source: str | Path,
    out_dir: str | Path,
    *,
    key: str | None = None,
    labels: object = None,
    **build: object,
) -> IndexManifest:
    """Import embeddings made elsewhere (:func:`~isdretrieve.bank.embeddings_in.import_embeddings`) and
    index them in ``out_dir`` (``build``: :func:`~isdretrieve.index.build.build_index`'s options).

    The input is checked whole and written to a staged bank first; ``out_dir/bank.h5`` and the manifest
    change only when the new index is saved, so a refused input or a failed build leaves an index already
    in ``out_dir`` as it was."""
    out_dir = Path(out_dir)
    with staged_bank(out_dir) as staged:
        import_embeddings(source, staged, key=key, labels=labels)
        return build_index(staged, out_dir, **build)


def knn_banks_from_checkpoint(
    checkpoint: str | Path, data: str, work_dir: str | Path, *, which: str = "student", **export: object
) -> tuple[Path, Path]:
    """Exact index over the train split of ``data`` and a bank of its test split, inside ``work_dir``.

    Returns (train index directory, test bank path); rerunning with the same work_dir reuses them.
    """
    from isdretrieve.data.specs import parse_spec

    spec, work_dir = parse_spec(data), Path(work_dir)
    train_dir, test_bank = work_dir / "train", work_dir / "test" / "bank.h5"
    train_spec, test_spec = str(spec.with_split("train")), str(spec.with_split("test"))
    build_index_from_checkpoint(checkpoint, train_spec, train_dir, which=which, factory="Flat", **export)
    export_bank(train_dir / "encoder.pt", test_spec, test_bank, **export)
    return train_dir, test_bank
