"""Random resized crops taken from the original picture, in loader workers (file data: folder, list, wds).

:func:`crop_box` is torchvision's ``RandomResizedCrop.get_params`` with an explicit ``torch.Generator``
(the same draws in the same order: area fraction ~ U(scale), log aspect ~ U(log ratio), up to 10 tries,
then the centre crop clamped to the ratio range), so a generator seeded s gives the box torchvision
gives after ``torch.manual_seed(s)``. :func:`crop_views` crops a PIL image and resizes the box to the
view's side (PIL bilinear, antialiased, as torchvision's ``resized_crop`` on PIL images): the aspect
ratio of the source is kept, nothing is squashed to a square first. Flip and the photometric ops stay
batched on the device (:func:`isdretrieve.data.augment.augment_views` with ``cropped=True``).
Views may differ in size (DINO's global and local crops): :class:`CroppedViews` hands out one stack
per size (:func:`~isdretrieve.data.augment.size_groups`).

Every sample's generator is seeded from (seed, epoch, dataset index, view), so crops do not depend on
the worker count, the batch, or where a resumed run restarted.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from isdretrieve.data.augment import CROP_TRIES, ViewConfig, size_groups
from isdretrieve.data.datasets import ImageDataset
from isdretrieve.data.images import to_rgb
from isdretrieve.errors import DataError


def crop_box(
    height: int, width: int, scale: Sequence[float], ratio: Sequence[float], generator: torch.Generator
) -> tuple[int, int, int, int]:
    """``(top, left, h, w)`` of a random resized crop of a ``height`` x ``width`` image."""
    area = height * width
    log_ratio = torch.log(torch.tensor(ratio))
    for _ in range(CROP_TRIES):
        target_area = area * torch.empty(1).uniform_(scale[0], scale[1], generator=generator).item()
        low, high = float(log_ratio[0]), float(log_ratio[1])
        aspect = math.exp(torch.empty(1).uniform_(low, high, generator=generator).item())
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(torch.randint(0, height - h + 1, size=(1,), generator=generator).item())
            left = int(torch.randint(0, width - w + 1, size=(1,), generator=generator).item())
            return top, left, h, w
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        w, h = int(round(height * max(ratio))), height
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def crop_views(image: Image.Image, views: Sequence[ViewConfig], generator: torch.Generator) -> torch.Tensor:
    """One random resized crop per view of one picture: uint8 [V,3,size,size] (all views one size)."""
    if len({view.size for view in views}) > 1:
        raise ValueError(f"all views must have one size, got {sorted({v.size for v in views})}")
    return torch.stack(_crops(image, views, generator))


def _crops(image: Image.Image, views: Sequence[ViewConfig], generator: torch.Generator) -> list[torch.Tensor]:
    """Each view's crop, uint8 [3,size,size], drawn in view order from ``generator``."""
    rgb = to_rgb(image)
    width, height = rgb.size
    out = []
    for view in views:
        top, left, h, w = crop_box(height, width, view.scale, view.ratio, generator)
        patch = rgb.crop((left, top, left + w, top + h)).resize(
            (view.size, view.size), Image.Resampling.BILINEAR
        )
        out.append(torch.from_numpy(np.array(patch, dtype=np.uint8)).permute(2, 0, 1))
    return out


def crop_generator(seed: int, epoch: int, index: int, stream: int = 0) -> torch.Generator:
    """The generator of one sample's crops in one epoch (``stream`` 1 for a partner's views)."""
    return torch.Generator().manual_seed(((seed * 1_000_003 + epoch) * 7919 + index) * 4 + stream)


Crops = tuple[torch.Tensor, ...]  # one uint8 [V_g,3,s_g,s_g] stack per view size (size_groups order)


class CroppedViews(Dataset):
    """Item ``i`` of ``dataset`` as ``(crops, label, i, partner crops, partner)``.

    ``crops`` holds one uint8 [V_g,3,s_g,s_g] stack per view size, the groups of
    :func:`~isdretrieve.data.augment.size_groups` (one stack [V,3,s,s] when all views share a size);
    the partner crops likewise for ``partner_views``. ``partners`` (an [N] map, or None) names whose
    picture gives the partner crops; without it the partner part is ``()`` and -1. The crops are drawn
    in view order, so grouping them by size changes no crop. Call :meth:`set_epoch` before each epoch.
    """

    def __init__(
        self,
        dataset: ImageDataset,
        views: Sequence[ViewConfig],
        partner_views: Sequence[ViewConfig],
        seed: int,
        partners: torch.Tensor | None = None,
    ) -> None:
        self.dataset, self.views, self.partner_views, self.seed = (
            dataset,
            list(views),
            list(partner_views),
            seed,
        )
        self.partners = None if partners is None else partners.cpu().share_memory_()
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.dataset)

    def _crops(self, i: int, views: Sequence[ViewConfig], stream: int) -> Crops:
        with self.dataset.open_image(i) as image:
            try:
                crops = _crops(image, views, crop_generator(self.seed, self.epoch, i, stream))
            except Exception as exc:  # PIL raises many types for corrupt files
                raise DataError(f"cannot decode image '{self.dataset.path(i)}': {exc}") from None
        return tuple(torch.stack([crops[k] for k in group]) for group in size_groups(views))

    def __getitem__(self, i: int) -> tuple[Crops, int, int, Crops, int]:
        i = int(i)
        own = self._crops(i, self.views, 0)
        label = int(self.dataset.labels[i])
        if self.partners is None or not self.partner_views:
            return own, label, i, (), -1
        j = int(self.partners[i])
        return own, label, i, self._crops(j, self.partner_views, 1), j
