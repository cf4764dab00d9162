"""Feeding the engine: per-step batches of uint8 images on the training device.

Small data sets (digits, CIFAR) are loaded once into device memory and indexed there, so a GPU never
waits for a loader; large ones stream through a DataLoader whose workers decode on CPU. Either way the
epoch's order is a permutation drawn from (seed, epoch) and rank r takes its slice of each global batch,
so a run on N processes sees the same global batches as a run on one.

Methods that pair images (SePP, AdaSim) hand over a partner map once per epoch: one dataset index per
image as a compact [N] array. In memory the partner images are gathered on the device; streamed, the
workers decode them next to the batch's own images.

File data decoded at a size other than its own (``dataset.crops_in_workers``: e.g. ImageNet folders at
``size=256``, or any ``wds:`` shards of large pictures) is never squashed to squares: the workers take
each view's random resized crop from the original picture (:mod:`isdretrieve.data.crops`) and the batch
carries the crops (``StepBatch.crops``: one stack per view size, so DINO's global and local crops travel
side by side), to which the engine applies flip and colour on the device.

Webdataset shards (``wds:``) stream: rank r reads shards r, r+W, ... only; each epoch its shards come in
a random order, each front to back, through a shuffle buffer (:func:`~isdretrieve.data.shards.
stream_order`); the loader workers read each batch's members by their tar offsets, all from the few
shards the buffer spans. An epoch has as many steps as the rank with the fewest samples fills. The
order is planned from (seed, epoch, rank) and not by the workers, so it does not depend on the worker
count and a mid-epoch resume restarts at the exact step, as for the other data.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import NamedTuple

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from isdretrieve.data.augment import ViewConfig
from isdretrieve.data.crops import CroppedViews
from isdretrieve.data.datasets import ImageDataset
from isdretrieve.data.shards import ShardDataset, rank_shards, stream_order
from isdretrieve.errors import RecipeError
from isdretrieve.train.distributed import DistContext

IN_MEMORY_LIMIT_BYTES = 4 << 30  # "auto" keeps data sets up to 4 GiB of uint8 pixels on the device
SHUFFLE_BUFFER = 4096  # samples a shard stream's shuffle buffer holds (data.shuffle_buffer)


class StepBatch(NamedTuple):
    images: torch.Tensor  # uint8 [b,3,H,W]
    labels: torch.Tensor  # [b]
    indices: torch.Tensor  # dataset index of each image [b]
    partner_images: torch.Tensor | None = None  # uint8 [b,3,H,W] of each image's partner
    partners: torch.Tensor | None = None  # dataset index of each partner [b]
    # each method view's crop, taken in the workers: one uint8 [b,V_g,3,s_g,s_g] per view size, the groups
    # of data.size_groups(views) in order (a single [b,V,3,s,s] when all views share a size)
    crops: tuple[torch.Tensor, ...] | None = None
    partner_crops: tuple[torch.Tensor, ...] | None = None  # the partner views' crops, grouped likewise


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
    """The batches of each epoch for this rank; ``views``/``partner_views`` are the configs of the views
    the method asks for (used where the workers take the crops)."""

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
        views: Sequence[ViewConfig] = (),
        partner_views: Sequence[ViewConfig] = (),
        shuffle_buffer: int = SHUFFLE_BUFFER,
    ) -> None:
        if batch_size % dist.world_size:
            raise RecipeError(
                f"optim.batch_size {batch_size} is not divisible by {dist.world_size} processes"
            )
        self.dataset, self.batch_size, self.dist, self.device, self.seed = (
            dataset,
            batch_size,
            dist,
            device,
            seed,
        )
        self.local_batch = batch_size // dist.world_size
        self.workers, self.shuffle_buffer = workers, shuffle_buffer
        self.shards = self._rank_shards() if isinstance(dataset, ShardDataset) else None
        self.steps_per_epoch = self._steps_per_epoch()
        small = dataset.nbytes <= IN_MEMORY_LIMIT_BYTES and not dataset.crops_in_workers
        keep = in_memory == "yes" or (in_memory == "auto" and small and self.shards is None)
        self.images = dataset.load_all(num_workers=workers).to(device) if keep else None
        self.labels = dataset.labels.to(device)
        self.views, self.partner_views = list(views), list(partner_views)
        self.crops_in_workers = not keep and dataset.crops_in_workers and bool(self.views)

    def _rank_shards(self) -> list[int]:
        assert isinstance(self.dataset, ShardDataset)
        n_shards, world = len(self.dataset.shards), self.dist.world_size
        if n_shards < world:
            raise RecipeError(
                f"data.train has {n_shards} shards for {world} processes: need one or more each"
            )
        return rank_shards(n_shards, self.dist.rank, world)

    def _steps_per_epoch(self) -> int:
        if self.shards is None:
            steps, what = len(self.dataset) // self.batch_size, f"the data set ({len(self.dataset)} images)"
        else:
            assert isinstance(self.dataset, ShardDataset)
            starts, world = self.dataset.shard_starts, self.dist.world_size
            counts = [
                sum(int(starts[s + 1] - starts[s]) for s in rank_shards(len(starts) - 1, r, world))
                for r in range(world)
            ]
            steps, what = min(counts) // self.local_batch, f"a process's shards ({min(counts)} images)"
        if steps == 0:
            raise RecipeError(f"optim.batch_size {self.batch_size} is larger than {what}")
        return steps

    def _local_indices(self, epoch: int) -> torch.Tensor:
        """[steps, local batch]: this rank's slice of each global batch of ``epoch``."""
        if self.shards is not None:
            assert isinstance(self.dataset, ShardDataset)
            rng = np.random.default_rng([self.seed, epoch, self.dist.rank])
            order = stream_order(self.dataset, self.shards, rng, self.shuffle_buffer)
            used = order[: self.steps_per_epoch * self.local_batch]
            return torch.from_numpy(used).view(self.steps_per_epoch, self.local_batch)
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
        if self.crops_in_workers:
            yield from self._cropped_epoch(epoch, local, partners)
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

    def _cropped_epoch(
        self, epoch: int, local: torch.Tensor, partners: torch.Tensor | None
    ) -> Iterator[StepBatch]:
        """Batches whose views' crops the workers took from the original pictures."""
        source = CroppedViews(self.dataset, self.views, self.partner_views, self.seed, partners)
        source.set_epoch(epoch)
        loader = DataLoader(
            source,
            batch_sampler=local.tolist(),
            num_workers=self.workers,
            pin_memory=self.device.type == "cuda",
            persistent_workers=False,
        )
        for crops, labels, indices, partner_crops, partner in loader:
            crops = tuple(c.to(self.device, non_blocking=True) for c in crops)
            labels, indices = (t.to(self.device, non_blocking=True) for t in (labels, indices))
            if partners is None:
                yield StepBatch(crops[0][:, 0], labels, indices, crops=crops)
                continue
            partner_crops = tuple(c.to(self.device, non_blocking=True) for c in partner_crops)
            partner = partner.to(self.device, non_blocking=True)
            yield StepBatch(crops[0][:, 0], labels, indices, None, partner, crops, partner_crops)
