"""Where a SPEC's items come from: scikit-learn's digits, CIFAR-10 pickles, a folder of class folders or
of images, an ISD subset list file. Each opener returns an
:class:`~isdretrieve.data.datasets.ImageDataset`."""

from __future__ import annotations

import dataclasses
import os
import pickle
from pathlib import Path, PurePosixPath

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from isdretrieve.data.datasets import ArrayDataset, FileDataset
from isdretrieve.data.images import LARGE_SIDE, default_side
from isdretrieve.data.specs import IMAGE_EXTENSIONS, DataSpec
from isdretrieve.errors import DataError

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


def check_utf8_names(names: list[str], what: str) -> None:
    """DataError naming the first of ``names`` (file or member names) that is not valid UTF-8: its bytes
    could not be written to a bank's paths, nor shown."""
    for name in names:
        try:
            name.encode("utf-8")
        except UnicodeEncodeError:
            raw = name.encode("utf-8", "surrogateescape")
            raise DataError(f"{what} name {raw!r} is not valid UTF-8: rename it") from None


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
        check_utf8_names(files, f"data root '{root}': file")
        return files, [-1] * len(files), []
    files, labels = [], []
    for label, name in enumerate(classes):
        found = _images_under(root, name)
        if not found:
            raise DataError(f"class folder '{root / name}' holds no images")
        files.extend(found)
        labels.extend([label] * len(found))
    check_utf8_names(files, f"data root '{root}': file")
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


def _default_size(path: Path) -> int:
    """The first image's :func:`default_side`."""
    try:
        with Image.open(path) as img:
            return default_side(*img.size)
    except Exception as exc:
        raise DataError(f"cannot decode image '{path}': {exc}") from None


def open_files(spec: DataSpec) -> FileDataset:
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
    dataset.native_size = spec.size is None and size != LARGE_SIDE
    return dataset


def open_digits(spec: DataSpec) -> ArrayDataset:
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


def open_cifar10(spec: DataSpec) -> ArrayDataset:
    assert spec.root is not None
    split = spec.split or "train"
    folder = _cifar_dir(spec.root)
    if spec.download and not all((folder / name).is_file() for name in _CIFAR_FILES[split]):
        from isdretrieve.util.torchvision import import_torchvision

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
