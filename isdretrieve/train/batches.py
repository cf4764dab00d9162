"""Feeding the engine: per-step batches of uint8 images on the training device.

Small data sets (digits, CIFAR) are loaded once into device memory and indexed there, so a GPU never
waits for a loader; large ones stream through a DataLoader whose workers decode on CPU. Either way the
epoch's order is a permutation drawn from (seed, epoch) and rank r takes its slice of each global batch,
so a run on N processes sees the same global batches as a run on one.

Methods that pair images (SePP, AdaSim) hand over a partner map once per epoch: one dataset index per
image as a compact [N] array. In memory the partner images are gathered on the device; streamed, the
workers decode them next to the batch's own images.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import NamedTuple

import torch
from torch.utils.data import DataLoader, Dataset

from isdretrieve.data import ImageDataset
from isdretrieve.errors import RecipeError
from isdretrieve.train.distributed import DistContext

IN_MEMORY_LIMIT_BYTES = 4 << 30  # "auto" keeps data sets up to 4 GiB of uint8 pixels on the device


class StepBatch(NamedTuple):
    images: torch.Tensor  # uint8 [b,3,H,W]
    labels: torch.Tensor  # [b]
    indices: torch.Tensor  # dataset index of each image [b]
    partner_images: torch.Tensor | None = None  # uint8 [b,3,H,W] of each image's partner
    partners: torch.Tensor | None = None  # dataset index of each partner [b]


class _WithPartners(Dataset):
    """Items of ``dataset`` followed by the partner's image and index (decoded only when not itself)."""

    def __init__(self, dataset: ImageDataset, partners: torch.Tensor) -> None:
        self.dataset, self.partners = dataset, partners.cpu().share_memory_()

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int, int, torch.Tensor, int]:
        image, label, index = self.dataset[i]
        j = int(self.partners[index])
        return image, label, index, (image if j == index else self.dataset[j][0]), j


def epoch_generator(
    seed: int, epoch: int, device: torch.device | str = "cpu", stream: int = 0
) -> torch.Generator:
    """The generator for one epoch's randomness (order or augmentation), reproducible on resume."""
    return torch.Generator(device=device).manual_seed(seed * 1_000_003 + epoch * 7919 + stream)


class BatchSource:
    def __init__(
        self,
        dataset: ImageDataset,
        *,
        batch_size: int,
        dist: DistContext,
        device: torch.device,
        seed: int,
        in_memory: str = "auto",
        workers: int = 4,
    ) -> None:
        if batch_size % dist.world_size:
            raise RecipeError(
                f"optim.batch_size {batch_size} is not divisible by {dist.world_size} processes"
            )
        self.steps_per_epoch = len(dataset) // batch_size
        if self.steps_per_epoch == 0:
            raise RecipeError(
                f"optim.batch_size {batch_size} is larger than the data set ({len(dataset)} images)"
            )
        self.dataset, self.batch_size, self.dist, self.device, self.seed = (
            dataset,
            batch_size,
            dist,
            device,
            seed,
        )
        self.local_batch = batch_size // dist.world_size
        self.workers = workers
        keep = in_memory == "yes" or (in_memory == "auto" and dataset.nbytes <= IN_MEMORY_LIMIT_BYTES)
        self.images = dataset.load_all(num_workers=workers).to(device) if keep else None
        self.labels = dataset.labels.to(device)

    def _local_indices(self, epoch: int) -> torch.Tensor:
        """[steps, local batch]: this rank's slice of each global batch of ``epoch``."""
        order = torch.randperm(len(self.dataset), generator=epoch_generator(self.seed, epoch))
        steps = order[: self.steps_per_epoch * self.batch_size].view(self.steps_per_epoch, self.batch_size)
        lo = self.dist.rank * self.local_batch
        return steps[:, lo : lo + self.local_batch]

    def epoch(self, epoch: int, start: int = 0, partners: torch.Tensor | None = None) -> Iterator[StepBatch]:
        """The batches of ``epoch`` for this rank, in order, from step ``start`` (a mid-epoch resume),
        with each image's partner when a partner map ([N] dataset indices) is given."""
        local = self._local_indices(epoch)[start:]
        if partners is not None and partners.shape != (len(self.dataset),):
            shape, n = tuple(partners.shape), len(self.dataset)
            raise ValueError(f"partner map has shape {shape}, expected ({n},)")
        if self.images is not None:
            # one copy to the device per epoch: a copy from host memory per step would wait for the
            # GPU to finish the previous step, so the host could no longer queue work ahead of it
            local = local.to(self.device)
            partners = partners.to(self.device) if partners is not None else None
            for idx in local:
                if partners is None:
                    yield StepBatch(self.images[idx], self.labels[idx], idx)
                else:
                    pidx = partners[idx]
                    yield StepBatch(self.images[idx], self.labels[idx], idx, self.images[pidx], pidx)
            return
        loader = DataLoader(
            self.dataset if partners is None else _WithPartners(self.dataset, partners),
            batch_sampler=local.tolist(),
            num_workers=self.workers,
            pin_memory=self.device.type == "cuda",
            persistent_workers=False,
        )
        for tensors in loader:
            yield StepBatch(*(t.to(self.device, non_blocking=True) for t in tensors))
