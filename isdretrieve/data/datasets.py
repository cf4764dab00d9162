"""Datasets that yield fixed-size uint8 images, opened from a data SPEC by :func:`open_dataset`.

| kind              | source                                                   | default split | side    |
|-------------------|----------------------------------------------------------|---------------|---------|
| `digits`          | scikit-learn's 8x8 digits upsampled; stratified 1347/450 | train         | 16      |
| `cifar10:ROOT`    | torchvision pickles in ROOT/cifar-10-batches-py/         | train         | 32      |
| `folder:ROOT`     | class sub-folders (ImageFolder), or unlabeled images     | see below     | `size`  |
| `list:FILE@ROOT`  | ISD subset list (`class names :`, `Train Images:`)       | none          | `size`  |
| `wds:PATTERN`     | webdataset tar shards (see :mod:`isdretrieve.data.shards`) | none        | `size`  |

`folder` reads ROOT/SPLIT when that exists, else ROOT; with no split and both ROOT/train and ROOT/test
present it reads ROOT/train. `cifar10:ROOT,download=1` fetches CIFAR-10 through torchvision first.

Every item is `(uint8 [3,H,W], label, index)`; labels are -1 where unknown. File images are converted to
RGB, their shorter side resized to `size` (bilinear, antialiased) and centre-cropped to `size` x `size`;
`size` defaults to the first image's side when it is square and at most 96 px, else to 256.
`longtail=RATIO` keeps a CIFAR-LT style subset of any split but test: class c of C keeps
floor(n_max * RATIO ** (-c / (C - 1))) images (the published CIFAR-10-LT counts), drawn with a fixed
seed and kept in their original order. `balanced=N` keeps N images of any split but test, N // C per
class (one more for the first N mod C classes), drawn the same way: e.g. a balanced twin of CIFAR-10-LT.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import pickle
from collections.abc import Sequence
from pathlib import Path, PurePosixPath

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from isdretrieve.data.specs import DataSpec, parse_spec
from isdretrieve.errors import DataError

IMAGE_EXTENSIONS = frozenset(
    {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm"}
)
DIGITS_SIZE = 16
CIFAR10_CLASSES = (
    "airplane",
    "automobile",
    "bird",
    "cat",
    "deer",
    "dog",
    "frog",
    "horse",
    "ship",
    "truck",
)
_CIFAR_DIR = "cifar-10-batches-py"
_CIFAR_FILES = {"train": [f"data_batch_{k}" for k in range(1, 6)], "test": ["test_batch"]}
_SMALL_SIDE = 96  # a square first image up to this side sets the default size; else 256
_LARGE_SIZE = 256
_CHUNK_BYTES = 8 << 20  # images per load_all worker task: about this many bytes


class ImageDataset(Dataset):
    """Base class: ``(uint8 [3,H,W], label, index)`` items of one fixed size."""

    spec: DataSpec
    classes: list[str]
    labels: torch.Tensor
    image_size: tuple[int, int]

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int, int]:
        i = int(i)
        return self._image(i), int(self.labels[i]), i

    def __repr__(self) -> str:
        h, w = self.image_size
        return (
            f"{type(self).__name__}('{self.spec}', n={len(self)}, size={h}x{w}, classes={len(self.classes)})"
        )

    def _image(self, i: int) -> torch.Tensor:
        raise NotImplementedError

    def path(self, i: int) -> str:
        """Name of item ``i``: a file path relative to the root, or the item's index in its split."""
        raise NotImplementedError

    def subset(self, indices: Sequence[int] | np.ndarray | torch.Tensor) -> ImageDataset:
        """A dataset of the items at ``indices`` (in that order); ``path`` still names the original items."""
        raise NotImplementedError

    @property
    def nbytes(self) -> int:
        """Bytes of all images as one uint8 tensor."""
        h, w = self.image_size
        return len(self) * 3 * h * w

    def load_all(self, num_workers: int = 0) -> torch.Tensor:
        """All images as one uint8 [N,3,H,W] CPU tensor (decoded with ``num_workers`` processes if > 0)."""
        raise NotImplementedError

    def open_image(self, i: int) -> Image.Image:
        """Item ``i`` as the stored picture (any size and mode), for crops taken from the original."""
        raise NotImplementedError

    @property
    def crops_in_workers(self) -> bool:
        """Whether training should take random crops from the original pictures in loader workers.

        True for file data decoded at a size other than its own (resizing to a square would lose the
        aspect ratio); False for in-memory sets and for files of one small square side (CIFAR as JPEG),
        whose decoded images already are the originals.
        """
        return not getattr(self, "native_size", True)


class ArrayDataset(ImageDataset):
    """Images held in memory as one uint8 [N,3,H,W] tensor."""

    def __init__(
        self,
        spec: DataSpec,
        images: torch.Tensor,
        labels: torch.Tensor,
        classes: Sequence[str],
        ids: torch.Tensor | None = None,
    ) -> None:
        if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"images must be uint8 [N,3,H,W], got {images.dtype} {tuple(images.shape)}")
        self.spec = spec
        self.images = images
        self.labels = labels.to(torch.int64)
        self.classes = list(classes)
        self.image_size = (int(images.shape[2]), int(images.shape[3]))
        self.ids = torch.arange(len(images)) if ids is None else ids

    def _image(self, i: int) -> torch.Tensor:
        return self.images[i]

    def path(self, i: int) -> str:
        return str(int(self.ids[i]))

    def subset(self, indices: Sequence[int] | np.ndarray | torch.Tensor) -> ArrayDataset:
        idx = torch.as_tensor(np.asarray(indices), dtype=torch.int64)
        return ArrayDataset(self.spec, self.images[idx], self.labels[idx], self.classes, self.ids[idx])

    def load_all(self, num_workers: int = 0) -> torch.Tensor:
        return self.images


class FileDataset(ImageDataset):
    """Image files under ``root`` (the folder read: ROOT/SPLIT where that was used), decoded on access."""

    def __init__(
        self,
        spec: DataSpec,
        root: Path,
        files: Sequence[str],
        labels: Sequence[int] | torch.Tensor,
        classes: Sequence[str],
        size: int,
    ) -> None:
        self.spec = spec
        self.root = root
        self.files = list(files)
        self.labels = torch.as_tensor(labels, dtype=torch.int64).reshape(-1)
        self.classes = list(classes)
        self.size = size
        self.image_size = (size, size)
        self.native_size = False  # set by open_dataset when the size is the images' own

    def _image(self, i: int) -> torch.Tensor:
        return decode_image(self.root / self.files[i], self.size)

    def open_image(self, i: int) -> Image.Image:
        path = self.root / self.files[i]
        try:
            return Image.open(path)
        except Exception as exc:
            raise DataError(f"cannot decode image '{path}': {exc}") from None

    def path(self, i: int) -> str:
        return self.files[i]

    def subset(self, indices: Sequence[int] | np.ndarray | torch.Tensor) -> FileDataset:
        idx = np.asarray(indices, dtype=np.int64)
        files = [self.files[k] for k in idx.tolist()]
        labels = self.labels[torch.from_numpy(idx)]
        subset = FileDataset(self.spec, self.root, files, labels, self.classes, self.size)
        subset.native_size = self.native_size
        return subset

    def load_all(self, num_workers: int = 0) -> torch.Tensor:
        out = torch.empty((len(self), 3, self.size, self.size), dtype=torch.uint8)
        chunks = _Chunks(self, max(1, min(256, _CHUNK_BYTES // (3 * self.size * self.size))))
        batches = chunks if num_workers <= 0 else DataLoader(chunks, batch_size=None, num_workers=num_workers)
        for start, batch in batches:
            if isinstance(batch, str):
                raise DataError(batch)
            out[start : start + len(batch)] = batch
        return out


class SubsetDataset(ImageDataset):
    """Items ``indices`` of another dataset, in that order; ``path`` still names the original items."""

    def __init__(self, base: ImageDataset, indices: Sequence[int] | np.ndarray | torch.Tensor) -> None:
        self.base, self.index = base, np.asarray(indices, dtype=np.int64).reshape(-1)
        self.spec, self.classes, self.image_size = base.spec, base.classes, base.image_size
        self.labels = base.labels[torch.from_numpy(self.index)]
        self.native_size = getattr(base, "native_size", True)

    def _image(self, i: int) -> torch.Tensor:
        return self.base._image(int(self.index[i]))

    def open_image(self, i: int) -> Image.Image:
        return self.base.open_image(int(self.index[i]))

    def path(self, i: int) -> str:
        return self.base.path(int(self.index[i]))

    def subset(self, indices: Sequence[int] | np.ndarray | torch.Tensor) -> ImageDataset:
        return SubsetDataset(self.base, self.index[np.asarray(indices, dtype=np.int64)])

    def load_all(self, num_workers: int = 0) -> torch.Tensor:
        return torch.stack([self._image(i) for i in range(len(self))]) if len(self) else torch.empty(0)


class _Chunks(Dataset):
    """Consecutive runs of a FileDataset's images; decoding errors come back as strings (one line each)."""

    def __init__(self, dataset: FileDataset, chunk: int) -> None:
        self.dataset, self.chunk = dataset, chunk

    def __len__(self) -> int:
        return (len(self.dataset) + self.chunk - 1) // self.chunk

    def __getitem__(self, k: int) -> tuple[int, torch.Tensor | str]:
        start = k * self.chunk
        if start >= len(self.dataset):
            raise IndexError(k)
        stop = min(start + self.chunk, len(self.dataset))
        try:
            return start, torch.stack([self.dataset._image(i) for i in range(start, stop)])
        except DataError as exc:
            return start, str(exc)


def items_sha256(dataset: ImageDataset, lo: int, hi: int) -> str:
    """First 16 hex digits of a SHA-256 over the names of items lo..hi-1: a resume must see the same files."""
    digest = hashlib.sha256()
    for i in range(lo, hi):
        digest.update(dataset.path(i).encode())
        digest.update(b"\0")
    return digest.hexdigest()[:16]


def decode_image(path: Path, size: int) -> torch.Tensor:
    """Decode an image file to uint8 [3,size,size]: RGB, shorter side resized to ``size``, centre crop."""
    try:
        with Image.open(path) as img:
            img.draft("RGB", (size, size))  # JPEG: decode at a reduced scale that stays >= size
            return pil_to_tensor(img, size)
    except Exception as exc:  # PIL raises many types for corrupt files
        raise DataError(f"cannot decode image '{path}': {exc}") from None


def to_rgb(img: Image.Image) -> Image.Image:
    """A PIL image (any mode; palette transparency honoured) converted to RGB."""
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    return img.convert("RGB")


def pil_to_tensor(img: Image.Image, size: int) -> torch.Tensor:
    """A PIL image (any mode) as uint8 [3,size,size]: RGB, shorter side resized to ``size``, centre crop."""
    rgb = to_rgb(img)
    w, h = rgb.size
    if (w, h) != (size, size):
        side = min(w, h)
        left, top = (w - side) / 2, (h - side) / 2
        box = (left, top, left + side, top + side)
        rgb = rgb.resize((size, size), Image.Resampling.BILINEAR, box=box)
    array = np.array(rgb, dtype=np.uint8)
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()


def _is_image(name: str) -> bool:
    return not name.startswith(".") and os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


def _images_under(root: Path, sub: str) -> list[str]:
    """Sorted image paths (relative to ``root``, '/'-separated) anywhere under ``root/sub``."""
    found = []
    for dirpath, dirnames, filenames in os.walk(root / sub, followlinks=True):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        rel = PurePosixPath(Path(dirpath).relative_to(root).as_posix())
        found.extend(str(rel / f) for f in filenames if _is_image(f))
    return sorted(found)


def _scan_folder(root: Path) -> tuple[list[str], list[int], list[str]]:
    """(files, labels, classes) of an ImageFolder root, or of a flat folder of unlabeled images."""
    if not root.is_dir():
        raise DataError(f"data root '{root}' does not exist or is not a folder")
    entries = sorted((e for e in os.scandir(root) if not e.name.startswith(".")), key=lambda e: e.name)
    classes = [e.name for e in entries if e.is_dir()]
    if not classes:
        files = [e.name for e in entries if e.is_file() and _is_image(e.name)]
        if not files:
            raise DataError(f"data root '{root}' holds no images (expected class folders or image files)")
        return files, [-1] * len(files), []
    files, labels = [], []
    for label, name in enumerate(classes):
        found = _images_under(root, name)
        if not found:
            raise DataError(f"class folder '{root / name}' holds no images")
        files.extend(found)
        labels.extend([label] * len(found))
    return files, labels, classes


def _read_list(list_file: Path, root: Path) -> tuple[list[str], list[int], list[str]]:
    """(files, labels, classes) of an ISD subset list file (``class names :``, ids, ``Train Images:``)."""
    try:
        lines = list_file.read_text().splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"cannot read list file '{list_file}': {exc}") from None
    classes: list[str] = []
    files: list[str] = []
    labels: list[int] = []
    section = ""
    index: dict[str, int] = {}
    for number, raw in enumerate(lines, 1):
        line = raw.strip()
        where = f"list file '{list_file}' line {number}"
        header = line.replace(" ", "").lower()
        if not line:
            continue
        if header == "classnames:" and not section:
            section = "classes"
        elif header == "trainimages:" and section == "classes":
            section = "images"
            index = {name: k for k, name in enumerate(classes)}
        elif section == "classes":
            if line in classes:
                raise DataError(f"{where}: class '{line}' listed twice")
            classes.append(line)
        elif section == "images":
            rel = line.lstrip("/")
            name = PurePosixPath(rel).parent.name
            if name not in index:
                raise DataError(
                    f"{where}: image '{line}' is of class '{name}', which is not in the class list"
                )
            if not (root / rel).is_file():
                raise DataError(f"{where}: listed image '{root / rel}' not found")
            files.append(rel)
            labels.append(index[name])
        else:
            raise DataError(f"{where}: expected 'class names :', got '{line}'")
    if section != "images":
        raise DataError(f"list file '{list_file}' has no 'Train Images:' line")
    if not classes:
        raise DataError(f"list file '{list_file}' lists no classes")
    if not files:
        raise DataError(f"list file '{list_file}' lists no images")
    return files, labels, classes


def default_side(width: int, height: int) -> int:
    """The decoding side a first image of ``width`` x ``height`` implies: its side if square and small
    (e.g. 32 for CIFAR), else 256."""
    return width if width == height and width <= _SMALL_SIDE else _LARGE_SIZE


def _default_size(path: Path) -> int:
    """The first image's :func:`default_side`."""
    try:
        with Image.open(path) as img:
            return default_side(*img.size)
    except Exception as exc:
        raise DataError(f"cannot decode image '{path}': {exc}") from None


def _open_files(spec: DataSpec) -> FileDataset:
    assert spec.root is not None
    root, split = spec.root, spec.split
    if spec.kind == "list":
        assert spec.list_file is not None
        if not spec.list_file.is_file():
            raise DataError(f"list file '{spec.list_file}' does not exist")
        if not root.is_dir():
            raise DataError(f"data root '{root}' does not exist or is not a folder")
        files, labels, classes = _read_list(spec.list_file, root)
    else:
        if split is not None and (root / split).is_dir():
            root = root / split
        elif split is None and (root / "train").is_dir() and (root / "test").is_dir():
            root, split = root / "train", "train"
        files, labels, classes = _scan_folder(root)
    size = spec.size or _default_size(root / files[0])
    dataset = FileDataset(
        dataclasses.replace(spec, split=split, size=size), root, files, labels, classes, size
    )
    dataset.native_size = spec.size is None and size != _LARGE_SIZE
    return dataset


def _open_digits(spec: DataSpec) -> ArrayDataset:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    y = digits.target
    train, test = train_test_split(np.arange(len(y)), test_size=0.25, stratify=y, random_state=0)
    split = spec.split or "train"
    idx = np.sort(train if split == "train" else test)
    small = torch.from_numpy(np.rint(digits.images[idx] * (255.0 / 16.0))).float()[:, None]
    big = F.interpolate(small, size=(DIGITS_SIZE, DIGITS_SIZE), mode="bilinear", align_corners=False)
    images = big.round().clamp(0, 255).to(torch.uint8).expand(-1, 3, -1, -1).contiguous()
    labels = torch.from_numpy(y[idx].astype(np.int64))
    return ArrayDataset(spec.with_split(split), images, labels, [str(d) for d in range(10)])


def _cifar_dir(root: Path) -> Path:
    for candidate in (root / _CIFAR_DIR, root):
        if any((candidate / name).is_file() for name in ("batches.meta", "test_batch", "data_batch_1")):
            return candidate
    return root / _CIFAR_DIR


def _unpickle(path: Path) -> dict:
    try:
        with open(path, "rb") as fh:
            data = pickle.load(fh, encoding="bytes")
    except Exception as exc:
        raise DataError(f"cannot read CIFAR-10 file '{path}': {exc}") from None
    if not isinstance(data, dict):
        raise DataError(f"CIFAR-10 file '{path}' does not hold a dict")
    return data


def _open_cifar10(spec: DataSpec) -> ArrayDataset:
    assert spec.root is not None
    split = spec.split or "train"
    folder = _cifar_dir(spec.root)
    if spec.download and not all((folder / name).is_file() for name in _CIFAR_FILES[split]):
        from isdretrieve._torchvision import import_torchvision

        try:
            import_torchvision().datasets.CIFAR10(str(spec.root), train=split == "train", download=True)
        except Exception as exc:
            raise DataError(f"cannot download CIFAR-10 into '{spec.root}': {exc}") from None
        folder = _cifar_dir(spec.root)
    images, labels = [], []
    for name in _CIFAR_FILES[split]:
        path = folder / name
        if not path.is_file():
            hint = f"expected ROOT/{_CIFAR_DIR}/; add ',download=1' to fetch it"
            raise DataError(f"CIFAR-10 file '{path}' not found ({hint})")
        batch = _unpickle(path)
        if b"data" not in batch or b"labels" not in batch:
            raise DataError(f"CIFAR-10 file '{path}' lacks b'data' or b'labels'")
        data = np.asarray(batch[b"data"], dtype=np.uint8)
        if data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or len(batch[b"labels"]) != len(data):
            raise DataError(f"CIFAR-10 file '{path}' does not hold [N,3072] images with N labels")
        images.append(data.reshape(-1, 3, 32, 32))
        labels.append(np.asarray(batch[b"labels"], dtype=np.int64))
    classes = list(CIFAR10_CLASSES)
    if (folder / "batches.meta").is_file():
        names = _unpickle(folder / "batches.meta").get(b"label_names")
        if names:
            classes = [n.decode() if isinstance(n, bytes) else str(n) for n in names]
    label_array = np.concatenate(labels)
    if label_array.min() < 0 or label_array.max() >= len(classes):
        raise DataError(f"CIFAR-10 folder '{folder}' has labels outside 0..{len(classes) - 1}")
    image_tensor = torch.from_numpy(np.concatenate(images))
    return ArrayDataset(spec.with_split(split), image_tensor, torch.from_numpy(label_array), classes)


def longtail_counts(class_counts: Sequence[int], ratio: float) -> list[int]:
    """Images kept per class: ``floor(n_max * ratio ** (-c / (C - 1)))``, at least 1, capped at the count."""
    counts = [int(n) for n in class_counts]
    if len(counts) < 2:
        return counts
    n_max, last = max(counts), len(counts) - 1
    return [min(n, max(1, int(n_max * ratio ** (-c / last) + 1e-9))) for c, n in enumerate(counts)]


def longtail_indices(
    labels: Sequence[int] | np.ndarray | torch.Tensor, num_classes: int, ratio: float
) -> np.ndarray:
    """Sorted indices of a long-tailed subset (see :func:`longtail_counts`), drawn with ``default_rng(0)``."""
    y = np.asarray(labels, dtype=np.int64)
    keep = longtail_counts(np.bincount(y[y >= 0], minlength=num_classes).tolist(), ratio)
    rng = np.random.default_rng(0)
    chosen = []
    for c in range(num_classes):
        members = np.flatnonzero(y == c)
        chosen.append(members if keep[c] >= len(members) else rng.choice(members, keep[c], replace=False))
    return np.sort(np.concatenate(chosen)) if chosen else np.zeros(0, dtype=np.int64)


def balanced_indices(
    labels: Sequence[int] | np.ndarray | torch.Tensor, num_classes: int, total: int
) -> np.ndarray:
    """Sorted indices of ``total`` images, as equal a number per class as possible, ``default_rng(0)``."""
    y = np.asarray(labels, dtype=np.int64)
    per_class = [total // num_classes + (c < total % num_classes) for c in range(num_classes)]
    rng = np.random.default_rng(0)
    chosen = []
    for c, want in enumerate(per_class):
        members = np.flatnonzero(y == c)
        if want > len(members):
            raise DataError(f"balanced={total} needs {want} images of class {c}, the data has {len(members)}")
        chosen.append(rng.choice(members, want, replace=False))
    return np.sort(np.concatenate(chosen))


def open_dataset(spec: str | DataSpec, *, split: str | None = None) -> ImageDataset:
    """Open the dataset a SPEC names; ``split`` (if given) overrides the SPEC's split."""
    spec = parse_spec(spec)
    if split is not None:
        spec = spec.with_split(split)
    if spec.kind == "digits":
        dataset: ImageDataset = _open_digits(spec)
    elif spec.kind == "cifar10":
        dataset = _open_cifar10(spec)
    elif spec.kind == "wds":
        from isdretrieve.data.shards import open_shards

        dataset = open_shards(spec)
    else:
        dataset = _open_files(spec)
    if spec.longtail is not None and dataset.spec.split != "test":
        if not dataset.classes:
            raise DataError(f"longtail needs labels, but '{dataset.spec}' is unlabeled")
        dataset = dataset.subset(longtail_indices(dataset.labels, len(dataset.classes), spec.longtail))
    if spec.balanced is not None and dataset.spec.split != "test":
        if not dataset.classes:
            raise DataError(f"balanced needs labels, but '{dataset.spec}' is unlabeled")
        dataset = dataset.subset(balanced_indices(dataset.labels, len(dataset.classes), spec.balanced))
    return dataset
