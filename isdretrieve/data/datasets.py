"""Datasets that yield fixed-size uint8 images, opened from a data SPEC by
:func:`isdretrieve.data.open.open_dataset`.

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

import hashlib
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from isdretrieve.data.images import decode_image
from isdretrieve.data.specs import DataSpec
from isdretrieve.errors import DataError

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
        return self.read_image(i), int(self.labels[i]), i

    def __repr__(self) -> str:
        h, w = self.image_size
        return (
            f"{type(self).__name__}('{self.spec}', n={len(self)}, size={h}x{w}, classes={len(self.classes)})"
        )

    def read_image(self, i: int) -> torch.Tensor:
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

    def read_image(self, i: int) -> torch.Tensor:
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

    def read_image(self, i: int) -> torch.Tensor:
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

    def read_image(self, i: int) -> torch.Tensor:
        return self.base.read_image(int(self.index[i]))

    def open_image(self, i: int) -> Image.Image:
        return self.base.open_image(int(self.index[i]))

    def path(self, i: int) -> str:
        return self.base.path(int(self.index[i]))

    def subset(self, indices: Sequence[int] | np.ndarray | torch.Tensor) -> ImageDataset:
        return SubsetDataset(self.base, self.index[np.asarray(indices, dtype=np.int64)])

    def load_all(self, num_workers: int = 0) -> torch.Tensor:
        return torch.stack([self.read_image(i) for i in range(len(self))]) if len(self) else torch.empty(0)


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
            return start, torch.stack([self.dataset.read_image(i) for i in range(start, stop)])
        except DataError as exc:
            return start, str(exc)


def items_sha256(dataset: ImageDataset, lo: int, hi: int) -> str:
    """First 16 hex digits of a SHA-256 over the names of items lo..hi-1: a resume must see the same files."""
    digest = hashlib.sha256()
    for i in range(lo, hi):
        digest.update(dataset.path(i).encode())
        digest.update(b"\0")
    return digest.hexdigest()[:16]
