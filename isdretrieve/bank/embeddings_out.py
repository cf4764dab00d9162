"""A bank's embeddings written for other tools: an npy folder, a parquet file, or a copy of ``bank.h5``.

- **npy**: a folder holding ``features.npy`` [N, D] float32 (L2-normalised), ``rows.npy`` [N] int64 (bank
  row numbers 0..N-1, which are the index's ids), ``indices.npy`` [N] int64 (dataset index of each row),
  ``labels.npy`` [N] int64 (-1: unlabelled), ``paths.txt`` (one image path a line) and ``meta.json``
  (fingerprint, data spec, class names).
- **parquet**: one file with columns ``row`` int64, ``index`` int64, ``label`` int64, ``path`` string and
  ``embedding`` list<float32> (D values each); the bank's fingerprint, data spec and classes are in the
  schema's metadata. These are the fields of the bank's Milvus collection
  (:mod:`isdretrieve.index.milvus.collection`) with the types a Milvus bulk import reads (a FLOAT_VECTOR
  as a list of float32, as pymilvus's own BulkWriter writes it), in row groups of at most 32 MiB, so the
  file can be imported into that collection as it is.

Banks are read block by block, and every output is written under a temporary name and renamed into place.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np

from isdretrieve.bank.embeddings_in import pyarrow_module
from isdretrieve.errors import EmbeddingsError
from isdretrieve.files.atomic import atomic_path, fsync_path
from isdretrieve.files.bank import FeatureBank

FORMATS = ("h5", "npy", "parquet")
ROW_GROUP_BYTES = 32 << 20  # Milvus's importer reads a row group at a time
NPY_FILES = ("features.npy", "rows.npy", "indices.npy", "labels.npy", "paths.txt", "meta.json")


def export_embeddings(bank_path: str | Path, out: str | Path, fmt: str) -> Path:
    """Write the bank at ``bank_path`` as ``fmt`` ("npy": a folder, "parquet": one file, "h5": a copy)."""
    if fmt not in FORMATS:
        raise EmbeddingsError(f"format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    out = Path(out)
    with FeatureBank.open(bank_path) as bank:
        if fmt == "h5":
            with atomic_path(out) as tmp:
                shutil.copyfile(bank.path, tmp)
        elif fmt == "npy":
            _write_npy(bank, out)
        else:
            _write_parquet(bank, out)
    return out


def _meta(bank: FeatureBank) -> dict[str, Any]:
    return {
        "format": "isdretrieve.embeddings/1",
        "fingerprint": bank.fingerprint,
        "data_spec": bank.data_spec,
        "classes": bank.classes,
        "count": len(bank),
        "dim": bank.dim,
    }


def _write_npy(bank: FeatureBank, out: Path) -> None:
    """The npy folder, built under a temporary name and renamed into place (an old one is replaced)."""
    if out.exists() and not out.is_dir():
        raise EmbeddingsError(f"{out} is a file: npy export writes a folder")
    tmp = out.with_name(f".{out.name}.tmp-npy")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        n, dim = len(bank), bank.dim
        features = np.lib.format.open_memmap(tmp / "features.npy", "w+", np.float32, (n, dim))
        for start, x in bank.blocks():
            features[start : start + len(x)] = x
        features.flush()
        del features
        np.save(tmp / "rows.npy", np.arange(n, dtype=np.int64))
        np.save(tmp / "indices.npy", bank.indices().astype(np.int64))
        np.save(tmp / "labels.npy", bank.labels().astype(np.int64))
        (tmp / "paths.txt").write_text("".join(f"{p}\n" for p in bank.paths()))
        (tmp / "meta.json").write_text(json.dumps(_meta(bank), indent=2) + "\n")
        for name in NPY_FILES:
            fsync_path(tmp / name)
        old = out.with_name(f".{out.name}.old-npy")
        if out.exists():
            out.replace(old)
        tmp.replace(out)
        shutil.rmtree(old, ignore_errors=True)
        fsync_path(out.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _write_parquet(bank: FeatureBank, out: Path) -> None:
    pa = pyarrow_module()
    dim = bank.dim
    schema = pa.schema(
        [
            ("row", pa.int64()),
            ("index", pa.int64()),
            ("label", pa.int64()),
            ("path", pa.string()),
            ("embedding", pa.list_(pa.float32())),
        ],
        metadata={"isdretrieve": json.dumps(_meta(bank))},
    )
    indices, labels, paths = bank.indices(), bank.labels(), bank.paths()
    group_rows = max(1, ROW_GROUP_BYTES // (4 * dim + 64))
    with atomic_path(out) as tmp, pa.parquet.ParquetWriter(tmp, schema) as writer:
        for start, x in bank.blocks():
            stop = start + len(x)
            offsets = pa.array(np.arange(0, (len(x) + 1) * dim, dim, dtype=np.int32))
            embedding = pa.ListArray.from_arrays(offsets, pa.array(x.reshape(-1), pa.float32()))
            columns = [
                pa.array(np.arange(start, stop, dtype=np.int64)),
                pa.array(indices[start:stop].astype(np.int64)),
                pa.array(labels[start:stop].astype(np.int64)),
                pa.array(paths[start:stop], pa.string()),
                embedding,
            ]
            writer.write_table(pa.Table.from_arrays(columns, schema=schema), row_group_size=group_rows)
