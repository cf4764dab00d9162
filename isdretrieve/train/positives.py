"""Fixed positive lists over dataset indices (SePP): partner sampling and negative masking, vectorised."""

from __future__ import annotations

import torch
from torch import nn

from isdretrieve.train.batches import epoch_generator

PARTNER_STREAM = 97  # the epoch-generator stream of partner draws (0: order, 1+rank: augmentation)


class PositiveLists(nn.Module):
    """Ragged lists in CSR form: image i's positives are ``members[offsets[i]:offsets[i+1]]``.

    Kept as non-persistent buffers: they move with the method to its device, and they come from the
    pairs file, not from checkpoints.
    """

    def __init__(self, offsets: torch.Tensor, members: torch.Tensor) -> None:
        super().__init__()
        if offsets.dim() != 1 or offsets[0] != 0 or int(offsets[-1]) != len(members):
            raise ValueError("offsets must start at 0 and end at the number of members")
        self.register_buffer("offsets", offsets.long(), persistent=False)
        self.register_buffer("members", members.long(), persistent=False)
        counts = offsets[1:] - offsets[:-1]
        self.max_count = int(counts.max()) if len(counts) else 0

    @property
    def num_images(self) -> int:
        return len(self.offsets) - 1

    @property
    def counts(self) -> torch.Tensor:
        return self.offsets[1:] - self.offsets[:-1]

    def randomised(self, seed: int) -> PositiveLists:
        """The control: the same list sizes, each member a uniformly random *other* image."""
        n = self.num_images
        generator = torch.Generator().manual_seed(seed)
        draw = torch.randint(0, max(n - 1, 1), (len(self.members),), generator=generator)
        owners = torch.repeat_interleave(torch.arange(n), self.counts.cpu())
        members = draw + (draw >= owners).long()  # skip the owner itself
        return PositiveLists(self.offsets.cpu(), members)

    def partner_map(self, seed: int, epoch: int, p: float = 1.0) -> torch.Tensor:
        """One uniformly drawn positive per image for ``epoch`` ([N] on CPU; i itself when it has none,
        or with probability 1 − ``p``)."""
        generator = epoch_generator(seed, epoch, stream=PARTNER_STREAM)
        n = self.num_images
        offsets, counts = self.offsets.cpu(), self.counts.cpu()
        u = torch.rand(n, generator=generator, dtype=torch.float64)
        take = torch.rand(n, generator=generator) < p
        pick = offsets[:-1] + (u * counts).long().clamp_max((counts - 1).clamp_min(0))
        has = (counts > 0) & take
        partners = torch.arange(n)
        partners[has] = self.members.cpu()[pick[has]]
        return partners

    def padded(self, indices: torch.Tensor, *, fill: int) -> torch.Tensor:
        """The lists of ``indices`` as a [B, max_count] matrix padded with ``fill``."""
        width = max(self.max_count, 1)
        starts, counts = self.offsets[indices], self.counts[indices]
        cols = torch.arange(width, device=indices.device)
        where = (starts[:, None] + cols).clamp_max(max(len(self.members) - 1, 0))
        values = self.members[where] if len(self.members) else torch.zeros_like(where)
        return torch.where(cols < counts[:, None], values, torch.full_like(values, fill))

    def queue_mask(self, indices: torch.Tensor, queue_indices: torch.Tensor) -> torch.Tensor:
        """[B, K] True where queue entry k holds a positive of image ``indices[b]`` (to drop as negative).

        One [B, K] comparison per list position (``max_count`` of them). ``torch.isin`` sorts all B·K
        entries instead once the lists are long enough (28× slower on one CPU thread at B = 512,
        K = 16,384 and up to 5 positives) and, on a GPU, waits on the host to size its unique values.
        """
        lists = self.padded(indices, fill=-2)  # empty queue slots hold −1: padding must never match
        mask = torch.zeros(len(indices), len(queue_indices), dtype=torch.bool, device=indices.device)
        for column in lists.unbind(1):
            mask |= queue_indices[None, :] == column[:, None]
        return mask
