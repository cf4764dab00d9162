"""A bank's embeddings written for other tools: an npy folder, a parquet file, or a copy of ``bank.h5``.

- **npy**: the shard folder embedding-reader, autofaiss and clip-retrieval read
  (:mod:`isdretrieve.bank.embedding_shards`): ``img_emb/img_emb_NNNN.npy`` [n, D] float32 (L2-normalised)
  holding only embeddings, ``metadata/metadata_NNNN.parquet`` with the same rows' ``image_path``, ``row``
  (bank row, the index's id), ``index`` (dataset index) and ``label`` (-1: unlabelled), and ``meta.json``
  (fingerprint, data spec, class names). Shards of ``shard_rows`` rows (default 1,048,576). The metadata
  needs pyarrow (the ``parquet`` extra).
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

from isdretrieve.bank.embedding_shards import EMB_DIR, META_DIR, META_FILE, SHARDS_FORMAT, shard_name
from isdretrieve.errors import EmbeddingsError
from isdretrieve.files.atomic import atomic_path, fsync_path
from isdretrieve.files.bank import FeatureBank
from isdretrieve.util.extras import pyarrow_module

FORMATS = ("h5", "npy", "parquet")
ROW_GROUP_BYTES = 32 << 20  # Milvus's importer reads a row group at a time
SHARD_ROWS = 1 << 20


def export_embeddings(
    bank_path: str | Path, out: str | Path, fmt: str, *, shard_rows: int = SHARD_ROWS
) -> Path:
    """Write the bank at ``bank_path`` as ``fmt`` ("npy": a shard folder of ``shard_rows`` rows a shard,
    "parquet": one file, "h5": a copy)."""
    if fmt not in FORMATS:
        raise EmbeddingsError(f"format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    out = Path(out)
    with FeatureBank.open(bank_path) as bank:
        if fmt == "h5":
            with atomic_path(out) as tmp:
                shutil.copyfile(bank.path, tmp)
        elif fmt == "npy":
            if shard_rows < 1:
                raise EmbeddingsError(f"shard_rows must be positive, got {shard_rows}")
            _write_npy(bank, out, shard_rows)
        else:
            _write_parquet(bank, out)
    return out


def _meta(bank: FeatureBank, fmt: str = "isdretrieve.embeddings/1") -> dict[str, Any]:
    return {
        "format": fmt,
        "fingerprint": bank.fingerprint,
        "data_spec": bank.data_spec,
        "classes": bank.classes,
        "count": len(bank),
        "dim": bank.dim,
    }


def _write_npy(bank: FeatureBank, out: Path, shard_rows: int) -> None:
    """The shard folder, built under a temporary name and renamed into place (an old one is replaced)."""
    if out.exists() and not out.is_dir():
        raise EmbeddingsError(f"{out} is a file: npy export writes a folder")
    pa = pyarrow_module()  # checked before anything is written
    tmp = out.with_name(f".{out.name}.tmp-npy")
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / EMB_DIR).mkdir(parents=True)
    (tmp / META_DIR).mkdir()
    try:
        n, dim = len(bank), bank.dim
        shards = max(1, -(-n // shard_rows))
        indices, labels, paths = bank.indices(), bank.labels(), bank.paths()
        written = []
        for number, start in enumerate(range(0, n, shard_rows)):
            stop = min(start + shard_rows, n)
            npy = tmp / EMB_DIR / shard_name(EMB_DIR, number, shards, ".npy")
            rows = np.lib.format.open_memmap(npy, "w+", np.float32, (stop - start, dim))
            for first, x in bank.blocks(start, stop):
                rows[first - start : first - start + len(x)] = x
            rows.flush()
            del rows
            table = pa.table(
                {
                    "image_path": pa.array(paths[start:stop], pa.string()),
                    "row": pa.array(np.arange(start, stop, dtype=np.int64)),
                    "index": pa.array(indices[start:stop].astype(np.int64)),
                    "label": pa.array(labels[start:stop].astype(np.int64)),
                }
            )
            parquet = tmp / META_DIR / shard_name(META_DIR, number, shards, ".parquet")
            pa.parquet.write_table(table, parquet)
            written += [npy, parquet]
        (tmp / META_FILE).write_text(
            json.dumps(_meta(bank, SHARDS_FORMAT) | {"shards": shards}, indent=2) + "\n"
        )
        for path in [*written, tmp / META_FILE, tmp / EMB_DIR, tmp / META_DIR]:
            fsync_path(path)
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
