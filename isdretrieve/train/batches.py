"""Feeding the engine: per-step batches of uint8 images on the training device.

Small data sets (digits, CIFAR) are loaded once into device memory and indexed there, so a GPU never
waits for a loader; large ones stream through a DataLoader whose workers decode on CPU. Either way the
epoch's order is a permutation drawn from (seed, epoch) and rank r takes its slice of each global batch,
so a run on N processes sees the same global batches as a run on one.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch.utils.data import DataLoader

from isdretrieve.data import ImageDataset
from isdretrieve.errors import RecipeError
from isdretrieve.train.distributed import DistContext

IN_MEMORY_LIMIT_BYTES = 4 << 30  # "auto" keeps data sets up to 4 GiB of uint8 pixels on the device

StepBatch = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # images uint8 [b,3,H,W], labels, indices


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

    def _local_indices(self, epoch: int) -> list[torch.Tensor]:
        order = torch.randperm(len(self.dataset), generator=epoch_generator(self.seed, epoch))
        lo = self.dist.rank * self.local_batch
        return [
            order[s * self.batch_size + lo : s * self.batch_size + lo + self.local_batch]
            for s in range(self.steps_per_epoch)
        ]

    def epoch(self, epoch: int, start: int = 0) -> Iterator[StepBatch]:
        """The batches of ``epoch`` for this rank, in order, from step ``start`` (a mid-epoch resume)."""
        local = self._local_indices(epoch)[start:]
        if self.images is not None:
            for idx in local:
                idx = idx.to(self.device)
                yield self.images[idx], self.labels[idx], idx
            return
        loader = DataLoader(
            self.dataset,
            batch_sampler=[idx.tolist() for idx in local],
            num_workers=self.workers,
            pin_memory=self.device.type == "cuda",
            persistent_workers=False,
        )
        for images, labels, idx in loader:
            yield (
                images.to(self.device, non_blocking=True),
                labels.to(self.device, non_blocking=True),
                idx.to(self.device, non_blocking=True),
            )
