"""An index directory's ``manifest.json`` and a summary of its bank, readable without FAISS or torch
(so ``isd-index info`` starts fast); :mod:`isdretrieve.index` builds and searches the index itself.

An index directory holds ``bank.h5`` (the bank the index was built from, a hard link or a copy),
``index.faiss`` (its ids are the bank's row numbers), ``index.ivfdata`` (kind "ondisk" only: the inverted
lists, memory-mapped) and ``manifest.json``, written last: a directory without it is an unfinished build.
A Milvus index (backend "milvus") has no ``index.faiss``: its manifest names the collection that holds
the rows (``milvus``: the URI without secrets, the collection, the index type and its parameters).
The manifest records each file's size (``file_bytes``; derived from ``index_bytes`` and ``ivfdata_bytes``
in manifests written before it), and :func:`check_files` compares them before anything is mapped.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from isdretrieve.errors import BankError, DamagedFile, IsdError
from isdretrieve.files.atomic import atomic_path
from isdretrieve.files.bank import BankAttrs
from isdretrieve.files.h5 import open_h5
from isdretrieve.files.versions import package_versions

INDEX_FORMAT = "isdretrieve.index/1"
METRIC = "inner_product"
BANK_FILE, INDEX_FILE, MANIFEST_FILE = "bank.h5", "index.faiss", "manifest.json"
IVFDATA_FILE = "index.ivfdata"
RECALL_PROTOCOL = "held-out: sampled bank rows searched for k+1, own row dropped from hits and truth"
KIND_RAM, KIND_ONDISK = "ram", "ondisk"
BACKEND_FAISS, BACKEND_MILVUS = "faiss", "milvus"


@dataclass
class IndexManifest:
    """Contents of ``manifest.json``: what was built, over which bank, and how well it searches."""

    factory: str
    params: dict[str, int]  # search parameters: {"nprobe": ...} or {"efSearch": ...} ({"ef": ...} in Milvus)
    bank_fingerprint: str
    count: int
    dim: int
    recall_k: int
    recall: float  # measured recall@k against exact search (1.0 for Flat)
    recall_queries: int
    recall_target: float
    build_seconds: float  # training + adding
    tune_seconds: float  # ground truth + parameter search
    index_bytes: int  # size of index.faiss
    gpu: bool  # searched on a GPU when built (GPU FAISS, or torch for Flat)
    reason: str = ""  # why this factory (auto's plan, or "given")
    train_rows: int = 0
    kind: str = KIND_RAM  # "ram", or "ondisk": lists memory-mapped from index.ivfdata
    memory_budget: int | None = None  # the RAM budget given to the build, in bytes (None: default)
    ivfdata_bytes: int = 0  # size of index.ivfdata (kind "ondisk")
    shards: int = 0  # shards the on-disk lists were filled in
    recall_protocol: str = ""  # how recall was measured (RECALL_PROTOCOL); "" in manifests before it
    notes: list[str] = field(default_factory=list)  # e.g. k lowered for a bank smaller than k
    backend: str = BACKEND_FAISS  # "faiss": index.faiss here; "milvus": a collection (``milvus``)
    milvus: dict[str, Any] = field(default_factory=dict)  # uri (no secrets), collection, index type...
    file_bytes: dict[str, int] = field(default_factory=dict)  # size of each file at build; {} before it
    estimated_bytes: int = 0  # memory the index was expected to take (0: not estimated)
    plan: dict[str, Any] = field(default_factory=dict)  # auto's trials on a sample: seconds, sample_rows,
    # trials (factory, estimated_bytes, status, sample_params, sample_recall, sample_qps, predicted_qps ...)
    format: str = INDEX_FORMAT
    metric: str = METRIC
    bank_file: str = BANK_FILE
    created: str = field(default_factory=lambda: datetime.now(UTC).isoformat(timespec="seconds"))
    versions: dict[str, str] = field(default_factory=lambda: package_versions("faiss", "torch", "numpy"))

    def to_json(self) -> str:
        data = dataclasses.asdict(self)
        return json.dumps({"format": data.pop("format"), **data}, indent=2) + "\n"

    @classmethod
    def from_json(cls, text: str) -> IndexManifest:
        """Parse ``manifest.json``; unknown keys are ignored; a missing key or another format: IsdError."""
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise IsdError(f"index manifest is not valid JSON: {exc}") from exc
        if not isinstance(data, dict) or data.get("format") != INDEX_FORMAT:
            found = data.get("format") if isinstance(data, dict) else type(data).__name__
            raise IsdError(f"index manifest has format {found!r}, expected {INDEX_FORMAT!r}")
        names = {f.name for f in dataclasses.fields(cls)}
        try:
            return cls(**{key: value for key, value in data.items() if key in names})
        except TypeError as exc:
            raise IsdError(f"index manifest is incomplete: {exc}") from exc


def read_manifest(index_dir: str | Path) -> IndexManifest:
    """The manifest of a finished index directory; IsdError if the directory or its manifest is missing,
    DamagedFile if a file the manifest lists is missing."""
    directory = Path(index_dir)
    if not directory.is_dir():
        raise IsdError(f"index directory not found: {directory}")
    if not (directory / MANIFEST_FILE).is_file():
        raise IsdError(f"{directory} is not a finished index directory: {MANIFEST_FILE} is missing")
    manifest = IndexManifest.from_json((directory / MANIFEST_FILE).read_text())
    if manifest.backend not in (BACKEND_FAISS, BACKEND_MILVUS):
        raise IsdError(f"{directory / MANIFEST_FILE} names an unknown backend {manifest.backend!r}")
    for name in index_files(manifest.backend, manifest.kind):
        if not (directory / name).is_file():
            raise DamagedFile(f"{directory} is not a finished index directory: {name} is missing")
    return manifest


def write_manifest(index_dir: Path, manifest: IndexManifest) -> None:
    """Put ``manifest.json`` in place atomically: the last file of a build, which makes the directory a
    finished index."""
    with atomic_path(index_dir / MANIFEST_FILE) as tmp:
        tmp.write_text(manifest.to_json())


def index_files(backend: str, kind: str) -> tuple[str, ...]:
    """The files an index directory must hold besides its manifest: a Milvus index keeps only its bank
    (the vectors live in the collection); a FAISS index ``index.faiss`` too, and ``index.ivfdata`` on disk."""
    if backend == BACKEND_MILVUS:
        return (BANK_FILE,)
    return (INDEX_FILE, BANK_FILE, *([IVFDATA_FILE] if kind == KIND_ONDISK else []))


def recorded_sizes(manifest: IndexManifest) -> dict[str, int]:
    """The byte size of each index file as the build recorded it (older manifests: index.faiss and
    index.ivfdata from ``index_bytes`` and ``ivfdata_bytes``; the bank's size was not recorded)."""
    if manifest.file_bytes:
        return dict(manifest.file_bytes)
    if manifest.backend == BACKEND_MILVUS:
        return {}
    sizes = {INDEX_FILE: manifest.index_bytes - manifest.ivfdata_bytes}
    if manifest.kind == KIND_ONDISK:
        sizes[IVFDATA_FILE] = manifest.ivfdata_bytes
    return sizes


def file_sizes(directory: Path, backend: str, kind: str) -> dict[str, int]:
    """The byte sizes of a just-built index's files, for the manifest."""
    return {name: (directory / name).stat().st_size for name in index_files(backend, kind)}


def check_size(path: Path, expected: int, found: int | None = None) -> None:
    """DamagedFile unless ``path`` (or ``found``, its size from an open descriptor) has ``expected``
    bytes: a file that is shorter would be read (or memory-mapped) past its end."""
    size = path.stat().st_size if found is None else found
    if size != expected:
        what = "truncated" if size < expected else "longer than built"
        raise DamagedFile(
            f"{path} is damaged ({what}: {size:,} bytes, the manifest recorded {expected:,}): "
            "rebuild the index"
        )


INDEX_FILES = (INDEX_FILE, IVFDATA_FILE)


def check_files(directory: Path, manifest: IndexManifest, names: tuple[str, ...] = INDEX_FILES) -> None:
    """The files ``names`` have the sizes the manifest recorded (before they are read or mapped). The
    bank is checked after its fingerprint, so a bank of another encoder is named as such."""
    for name, expected in recorded_sizes(manifest).items():
        if name in names:
            check_size(directory / name, expected)


def check_bank_fingerprint(directory: Path, manifest: IndexManifest, fingerprint: str) -> None:
    """BankError unless the bank in ``directory`` was made by the encoder the index was built for."""
    if fingerprint != manifest.bank_fingerprint:
        raise BankError(
            f"bank {directory / BANK_FILE} was made by another encoder (fingerprint "
            f"{fingerprint} != {manifest.bank_fingerprint}): rebuild the index"
        )


def describe_index(index_dir: str | Path) -> dict[str, Any]:
    """The manifest plus the bank's rows, data SPEC, transform, class count and skipped images (read from
    the bank's attributes with h5py; FAISS and torch are not imported)."""
    manifest = read_manifest(index_dir)
    check_files(Path(index_dir), manifest)
    bank_path = Path(index_dir) / BANK_FILE
    try:
        with open_h5(bank_path) as f:
            attrs = BankAttrs.read(f, bank_path)
            rows = int(f["features"].shape[0]) if "features" in f else 0
    except OSError as exc:
        raise BankError(f"cannot read feature bank {bank_path}: {exc}") from None
    check_bank_fingerprint(Path(index_dir), manifest, attrs.fingerprint)
    check_files(Path(index_dir), manifest, (BANK_FILE,))
    info: dict[str, Any] = json.loads(manifest.to_json())
    info.update(bank_rows=rows, data_spec=attrs.data_spec, transform=attrs.transform)
    info.update(classes=len(attrs.classes), skipped_images=attrs.skipped)
    return info
