"""webdataset tar shards (``wds:PATTERN``): find the shards, index their members, read and write them.

A shard is a plain tar whose members are grouped into samples by key (the member name up to the first
dot of its basename, as webdataset groups them): ``000123.jpg`` + ``000123.cls`` is one sample. The image
is the sample's ``jpg``, ``jpeg``, ``png`` or ``webp`` member; its label the ``cls`` member (a decimal
integer) or the ``label`` (or ``cls``) field of its ``json`` member; -1 without either.

Why the standard library's ``tarfile`` and not the ``webdataset`` package: opening a pattern reads only
the tar headers (seeking over the image bytes), which gives every member's byte offset and size. That
index fixes the sample count and the layout of a bank before the first image is decoded, gives each
sample a stable dataset index (shard order, then member order) and lets a reader start at any shard, or
any sample, by offset: exact per-shard resume, batches that do not depend on the worker count, and no
extra dependency. The bytes themselves are still read shard by shard, front to back
(:class:`ShardStream`), as a streaming reader would.

Patterns: ``{00000..00127}`` (zero-padded ranges), ``{a,b,c}`` (lists), several groups (expanded left to
right), then shell globs (``*``, ``?``, ``[..]``) matched in sorted order; a plain path names one shard.
"""

from __future__ import annotations

import dataclasses
import glob
import hashlib
import io
import itertools
import json
import os
import re
import tarfile
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from PIL import Image
from torch.utils.data import IterableDataset, get_worker_info

from isdretrieve.data.datasets import ImageDataset, SubsetDataset
from isdretrieve.data.images import default_side, pil_to_tensor
from isdretrieve.data.sources import check_utf8_names
from isdretrieve.data.specs import DataSpec
from isdretrieve.errors import DataError
from isdretrieve.files.bank import MAX_LABEL

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")  # in order of preference when a sample has several
_BRACE_RE = re.compile(r"\{([^{}]*)\}")
_RANGE_RE = re.compile(r"^(-?\d+)\.\.(-?\d+)$")
_GLOB_CHARS = re.compile(r"[*?\[]")
_SCAN_THREADS = 8  # shards whose headers are read at once (I/O bound)


# ------------------------------------------------------------------------------------------ patterns
def expand_braces(pattern: str) -> list[str]:
    """Every string a pattern's ``{a..b}`` ranges and ``{x,y}`` lists name, in order (no globbing)."""
    groups = []
    for match in _BRACE_RE.finditer(pattern):
        body = match.group(1)
        numbers = _RANGE_RE.match(body)
        if numbers:
            lo, hi = numbers.group(1), numbers.group(2)
            width = len(lo) if lo.startswith("0") and len(lo) > 1 else 0
            step = 1 if int(hi) >= int(lo) else -1
            groups.append([str(k).zfill(width) for k in range(int(lo), int(hi) + step, step)])
        elif "," in body:
            groups.append(body.split(","))
        else:
            raise DataError(f"bad shard pattern '{pattern}': '{{{body}}}' is neither {{A..B}} nor {{X,Y}}")
    pieces = _BRACE_RE.split(pattern)[::2]  # the literal text around the groups
    out = []
    for choice in itertools.product(*groups):
        text = pieces[0]
        for value, piece in zip(choice, pieces[1:], strict=True):
            text += value + piece
        out.append(text)
    return out


def shard_files(pattern: str | Path) -> list[Path]:
    """The shard files a pattern names, in pattern order; DataError naming a missing or empty one."""
    pattern = str(pattern)
    found: list[Path] = []
    for name in expand_braces(os.path.expanduser(pattern)):
        if _GLOB_CHARS.search(name):
            matches = sorted(glob.glob(name))
            if not matches:
                raise DataError(f"shard pattern '{name}' matches no file")
            found.extend(Path(m) for m in matches)
        else:
            found.append(Path(name))
    if not found:
        raise DataError(f"shard pattern '{pattern}' names no shard")
    for path in found:
        if not path.is_file():
            raise DataError(f"shard '{path}' not found")
        if path.stat().st_size == 0:
            raise DataError(f"shard '{path}' is empty (0 bytes)")
    if len(set(found)) != len(found):
        raise DataError(f"shard pattern '{pattern}' names some shard twice")
    return found


# --------------------------------------------------------------------------------------- the index
@dataclass(frozen=True)
class Shard:
    """One tar file: its name in row paths, size in bytes, and its samples' keys and image members."""

    path: Path
    name: str
    nbytes: int
    keys: tuple[str, ...]
    exts: tuple[str, ...]  # the image member's extension, per sample
    offsets: np.ndarray  # int64 byte offset of each image member's data
    sizes: np.ndarray  # int64 byte length of each image member
    labels: np.ndarray  # int64, -1 where the sample has no label

    def __len__(self) -> int:
        return len(self.keys)


def _split_name(name: str) -> tuple[str, str]:
    """webdataset's (key, extension): the name up to the first dot of its basename, and the rest."""
    head, _, base = name.rpartition("/")
    stem, dot, ext = base.partition(".")
    return (f"{head}/{stem}" if head else stem), (ext.lower() if dot else "")


def _label(tar: tarfile.TarFile, info: tarfile.TarInfo, ext: str, where: str) -> int | None:
    fh = tar.extractfile(info)
    text = fh.read().decode("utf-8", errors="replace") if fh is not None else ""
    try:
        if ext == "cls":
            return _label_in_range(int(text.strip()), info, where)
        meta = json.loads(text)
    except ValueError:
        raise DataError(f"{where}: cannot read a label from '{info.name}'") from None
    value = meta.get("label", meta.get("cls")) if isinstance(meta, dict) else None
    return (
        _label_in_range(value, info, where)
        if isinstance(value, int) and not isinstance(value, bool)
        else None
    )


def _label_in_range(value: int, info: tarfile.TarInfo, where: str) -> int:
    """A label from a shard: -1 (none) up to MAX_LABEL; larger ones would name millions of classes."""
    if not -1 <= value <= MAX_LABEL:
        raise DataError(f"{where}: label {value} in '{info.name}' is outside [-1, {MAX_LABEL}]")
    return value


def scan_shard(path: Path, name: str) -> Shard:
    """Read one shard's tar headers (and its tiny cls/json members); DataError if it is not usable."""
    nbytes = path.stat().st_size
    samples: list[list] = []  # [key, ext, offset, size, label]
    try:
        with tarfile.open(path, "r:") as tar:
            for info in tar:
                if not info.isfile():
                    continue
                check_utf8_names([info.name], f"shard '{path}': member")
                key, ext = _split_name(info.name)
                if not samples or samples[-1][0] != key:
                    samples.append([key, None, 0, 0, None])
                sample = samples[-1]
                if info.offset_data + info.size > nbytes:
                    raise DataError(f"shard '{path}' is truncated (member '{info.name}')")
                if ext in IMAGE_EXTS and (
                    sample[1] is None or IMAGE_EXTS.index(ext) < IMAGE_EXTS.index(sample[1])
                ):
                    sample[1:4] = [ext, info.offset_data, info.size]
                elif ext in ("cls", "json") and sample[4] is None:
                    sample[4] = _label(tar, info, ext, f"shard '{path}'")
    except (tarfile.TarError, OSError, EOFError) as exc:
        raise DataError(f"cannot read shard '{path}': not a tar file, or corrupt ({exc})") from None
    if not samples:
        raise DataError(f"shard '{path}' holds no samples")
    for key, ext, *_ in samples:
        if ext is None:
            raise DataError(f"shard '{path}': sample '{key}' has no image ({', '.join(IMAGE_EXTS)})")
    return Shard(
        path,
        name,
        nbytes,
        tuple(s[0] for s in samples),
        tuple(s[1] for s in samples),
        np.array([s[2] for s in samples], dtype=np.int64),
        np.array([s[3] for s in samples], dtype=np.int64),
        np.array([-1 if s[4] is None else s[4] for s in samples], dtype=np.int64),
    )


def _shard_names(paths: Sequence[Path]) -> list[str]:
    """Names for row paths: the basenames, or the paths below their common folder where those repeat."""
    names = [p.name for p in paths]
    if len(set(names)) == len(names):
        return names
    common = Path(os.path.commonpath([str(p.resolve().parent) for p in paths]))
    return [p.resolve().relative_to(common).as_posix() for p in paths]


def scan_shards(pattern: str | Path) -> list[Shard]:
    """Index every shard a pattern names (headers only, a few shards at a time)."""
    paths = shard_files(pattern)
    names = _shard_names(paths)
    with ThreadPoolExecutor(min(_SCAN_THREADS, len(paths))) as pool:
        return list(pool.map(scan_shard, paths, names))


# ------------------------------------------------------------------------------------- the dataset
class ShardDataset(ImageDataset):
    """The samples of webdataset shards, indexed in shard order then member order.

    Item ``i`` is decoded like a folder image (RGB, shorter side to ``size``, centre crop); ``path(i)`` is
    ``SHARD_NAME/KEY``. ``shard_starts[s]`` is the dataset index of shard ``s``'s first sample.
    """

    def __init__(self, spec: DataSpec, shards: Sequence[Shard], size: int | None = None) -> None:
        self.shards = list(shards)
        self._files: dict[int, object] = {}
        self._pid = -1
        counts = np.array([len(s) for s in self.shards], dtype=np.int64)
        self.shard_starts = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        self.labels = torch.from_numpy(np.concatenate([s.labels for s in self.shards]))
        top = int(self.labels.max())
        self.classes = [str(c) for c in range(top + 1)] if top >= 0 else []
        self.size = size or self._default_size()
        self.native_size = size is None and self.size != default_side(0, 1)  # a small square first image
        self.image_size = (self.size, self.size)
        self.spec = dataclasses.replace(spec, size=self.size)

    def _default_size(self) -> int:
        with self.open_image(0) as img:
            return default_side(*img.size)

    def locate(self, i: int) -> tuple[int, int]:
        """(shard position, sample position in the shard) of dataset index ``i``."""
        s = int(np.searchsorted(self.shard_starts, i, side="right")) - 1
        return s, i - int(self.shard_starts[s])

    def read_bytes(self, i: int) -> bytes:
        """The encoded image of item ``i`` (one positioned read from its shard)."""
        s, k = self.locate(i)
        shard = self.shards[s]
        if self._pid != os.getpid():  # a forked loader worker opens its own files
            self._files, self._pid = {}, os.getpid()
        fh = self._files.get(s)
        if fh is None:
            fh = self._files[s] = open(shard.path, "rb")  # noqa: SIM115 - kept open for later reads
        fh.seek(int(shard.offsets[k]))
        return fh.read(int(shard.sizes[k]))

    def open_image(self, i: int) -> Image.Image:
        try:
            return Image.open(io.BytesIO(self.read_bytes(i)))
        except Exception as exc:
            raise DataError(
                f"cannot decode image '{self.path(i)}' in shard '{self._shard(i).path}': {exc}"
            ) from None

    def _shard(self, i: int) -> Shard:
        return self.shards[self.locate(i)[0]]

    def read_image(self, i: int) -> torch.Tensor:
        return self.decode(i, self.read_bytes(i))

    def decode(self, i: int, data: bytes) -> torch.Tensor:
        """Item ``i``'s image from its encoded bytes (as :meth:`read_bytes` gives them)."""
        try:
            with Image.open(io.BytesIO(data)) as img:
                img.draft("RGB", (self.size, self.size))
                return pil_to_tensor(img, self.size)
        except Exception as exc:
            raise DataError(
                f"cannot decode image '{self.path(i)}' in shard '{self._shard(i).path}': {exc}"
            ) from None

    def content_hasher(self, s: int) -> Any:
        """A SHA-256 of shard ``s``'s index (keys, image types, labels), to be fed its images' bytes in
        member order: :func:`shard_sha256` and the export's stream compute the same digest."""
        shard = self.shards[s]
        digest = hashlib.sha256(json.dumps([shard.keys, shard.exts]).encode())
        digest.update(shard.labels.astype("<i8").tobytes())
        return digest

    def path(self, i: int) -> str:
        s, k = self.locate(int(i))
        shard = self.shards[s]
        return f"{shard.name}/{shard.keys[k]}"

    def subset(self, indices: Sequence[int] | np.ndarray | torch.Tensor) -> ImageDataset:
        return SubsetDataset(self, indices)

    def load_all(self, num_workers: int = 0) -> torch.Tensor:
        batches = ShardStream(self, range(len(self.shards)), batch_size=256)
        out = torch.empty((len(self), 3, self.size, self.size), dtype=torch.uint8)
        loader = batches.loader(num_workers)
        for item in loader:
            bad = [e for e in item.errors if e]
            if bad:
                raise DataError(bad[0])
            out[item.indices] = item.images
        return out

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_files": {}, "_pid": -1}

    def __del__(self) -> None:
        for fh in getattr(self, "_files", {}).values():
            fh.close()


def open_shards(spec: DataSpec) -> ShardDataset:
    """Open a ``wds:PATTERN`` SPEC: index its shards and pick the side (``size=`` or the default rule)."""
    assert spec.root is not None
    return ShardDataset(spec, scan_shards(spec.root), spec.size)


# ------------------------------------------------------------------------------------- streaming
class ShardBatch(NamedTuple):
    """Consecutive samples of one shard, decoded; ``errors[k]`` is the text of a failed decode, or ''."""

    shard: int  # position in the dataset's shard list
    last: bool  # the shard's final batch
    images: torch.Tensor  # uint8 [b,3,size,size], zeros where decoding failed
    labels: torch.Tensor
    indices: torch.Tensor  # dataset indices
    errors: list[str]
    sha256: str = ""  # on a shard's last batch: the digest of its content (:func:`shard_sha256`)


class ShardStream(IterableDataset):
    """Batches of the given shards, each read front to back in member order.

    Inside a DataLoader, worker w of K takes shards w, w+K, ... of the list (torchrun ranks split the
    shard list before this: see :func:`rank_shards`). A batch never spans two shards, so every batch,
    and every row it writes, is the same whatever the worker count.
    """

    def __init__(self, dataset: ShardDataset, shards: Sequence[int], batch_size: int) -> None:
        self.dataset, self.shards, self.batch_size = dataset, list(shards), batch_size

    def __iter__(self) -> Iterator[ShardBatch]:
        info = get_worker_info()
        mine = self.shards if info is None else self.shards[info.id :: info.num_workers]
        ds, (h, w) = self.dataset, self.dataset.image_size
        for s in mine:
            start, stop = int(ds.shard_starts[s]), int(ds.shard_starts[s + 1])
            content = ds.content_hasher(s)  # the bytes are hashed as they are read: no second pass
            for a in range(start, stop, self.batch_size):
                b = min(a + self.batch_size, stop)
                images = torch.zeros((b - a, 3, h, w), dtype=torch.uint8)
                errors = [""] * (b - a)
                for k, i in enumerate(range(a, b)):
                    data = ds.read_bytes(i)
                    content.update(data)
                    try:
                        images[k] = ds.decode(i, data)
                    except DataError as exc:
                        errors[k] = str(exc)
                labels = ds.labels[a:b].clone()
                digest = content.hexdigest() if b == stop else ""
                yield ShardBatch(s, b == stop, images, labels, torch.arange(a, b), errors, digest)

    def loader(self, workers: int, pin_memory: bool = False) -> Iterator[ShardBatch]:
        """The stream through ``workers`` loader processes (0: in this process)."""
        if workers <= 0:
            return iter(self)
        from torch.utils.data import DataLoader

        loader = DataLoader(
            self, batch_size=None, num_workers=min(workers, max(1, len(self.shards))), pin_memory=pin_memory
        )
        return iter(loader)


def shard_sha256(dataset: ShardDataset, s: int) -> str:
    """The content digest of shard ``s``: SHA-256 over its index and its image members' bytes, read in
    member order (what a finished shard of an export is pinned by)."""
    content = dataset.content_hasher(s)
    for i in range(int(dataset.shard_starts[s]), int(dataset.shard_starts[s + 1])):
        content.update(dataset.read_bytes(i))
    return content.hexdigest()


def rank_shards(n_shards: int, rank: int, world: int, *, contiguous: bool = False) -> list[int]:
    """The shard positions rank ``rank`` of ``world`` reads: r, r+W, ... (training), or the contiguous
    block ``[r*S//W, (r+1)*S//W)`` (bank export, so that joining rank banks is a concatenation)."""
    if contiguous:
        return list(range(rank * n_shards // world, (rank + 1) * n_shards // world))
    return list(range(rank, n_shards, world))


def stream_order(
    dataset: ShardDataset, shards: Sequence[int], rng: np.random.Generator, buffer: int
) -> np.ndarray:
    """Dataset indices of ``shards`` as a shuffled stream reads them: the shards in a random order,
    each in member order, through a shuffle buffer of ``buffer`` samples (each step emits a random
    buffered sample and takes in the next one; at the end the rest leaves in random order)."""
    order = [shards[k] for k in rng.permutation(len(shards))]
    stream = np.concatenate(
        [np.arange(dataset.shard_starts[s], dataset.shard_starts[s + 1]) for s in order]
    ).astype(np.int64)
    if buffer <= 1 or len(stream) <= 1:
        return stream
    out = np.empty_like(stream)
    held = list(stream[:buffer])
    picks = rng.random(len(stream))
    for k, incoming in enumerate(stream[buffer:].tolist()):
        slot = int(picks[k] * len(held))
        out[k], held[slot] = held[slot], incoming
    rest = len(stream) - buffer if len(stream) > buffer else 0
    out[rest:] = np.asarray(held, dtype=np.int64)[rng.permutation(len(held))]
    return out


# --------------------------------------------------------------------------------------- writing
def write_shards(
    dataset: ImageDataset,
    out_dir: str | Path,
    *,
    shards: int,
    prefix: str = "",
    indices: Sequence[int] | None = None,
) -> list[Path]:
    """Write a dataset's images as ``shards`` webdataset tars ``{prefix}{00000..}.tar`` under ``out_dir``.

    Each sample is ``{index:08d}.EXT`` (a file dataset's original bytes and extension; in-memory images as
    PNG) plus ``{index:08d}.cls`` when labelled. Consecutive items go to the same shard, in order. For
    tests and benchmarks: a folder or the digits set as shards.
    """
    from isdretrieve.data.datasets import FileDataset

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    order = list(range(len(dataset))) if indices is None else [int(i) for i in indices]
    if not 1 <= shards <= max(1, len(order)):
        raise ValueError(f"shards must be in 1..{len(order)}, got {shards}")
    paths = []
    for s in range(shards):
        path = out_dir / f"{prefix}{s:05d}.tar"
        chunk = order[s * len(order) // shards : (s + 1) * len(order) // shards]
        with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
            for i in chunk:
                if isinstance(dataset, FileDataset):
                    name = dataset.files[i]
                    data = (dataset.root / name).read_bytes()
                    ext = os.path.splitext(name)[1].lower().lstrip(".")
                else:
                    buffer = io.BytesIO()
                    Image.fromarray(dataset[i][0].permute(1, 2, 0).numpy()).save(buffer, format="PNG")
                    data, ext = buffer.getvalue(), "png"
                members = [(ext, data)]
                if int(dataset.labels[i]) >= 0:
                    members.append(("cls", str(int(dataset.labels[i])).encode()))
                for member_ext, payload in members:
                    info = tarfile.TarInfo(f"{i:08d}.{member_ext}")
                    info.size, info.mtime, info.mode = len(payload), 0, 0o644
                    tar.addfile(info, io.BytesIO(payload))
        paths.append(path)
    return paths
