"""Shuffle-BN (MoCo, ISD): the key/teacher forward must not see the same BatchNorm batch as the query.

With BN, the statistics of a batch are shared by all its samples, so the queries' and the keys'
batches carry a common signature that tells the current batch's keys apart from the queue's; the
official MoCo and ISD code therefore permute the key batch across GPUs before the teacher forward (each
GPU normalises a random slice) and undo the permutation afterwards.

- Several processes (DDP): :func:`shuffled_forward` gathers the key views of all ranks, permutes the
  global batch with a permutation every rank draws alike, forwards this rank's slice, gathers the
  outputs and returns this rank's rows in their original order. BN stays per-rank.
- One device: the same split is emulated by :class:`SplitBatchNorm` (lightly's SplitBatchNorm idea),
  which normalises a batch as ``groups`` groups with their own statistics (sample n is in group
  n mod groups); the student's batch is split unshuffled, the teacher's after the permutation.

The permutation is drawn from (seed, the step's progress), so a resumed run draws the same ones.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from isdretrieve.errors import RecipeError


class SplitBatchNorm(nn.modules.batchnorm._BatchNorm):
    """BatchNorm whose training-mode statistics are computed per group of samples.

    Same parameters, buffers and state-dict keys as the BatchNorm it replaces; in eval mode (or with
    ``groups == 1``) it is that BatchNorm. The running statistics move by the mean of the groups' own.
    """

    def __init__(self, bn: nn.modules.batchnorm._BatchNorm, groups: int) -> None:
        super().__init__(bn.num_features, bn.eps, bn.momentum, bn.affine, bn.track_running_stats)
        self.weight, self.bias = bn.weight, bn.bias  # the same Parameter objects (optimizer, EMA)
        self.running_mean, self.running_var = bn.running_mean, bn.running_var
        self.num_batches_tracked = bn.num_batches_tracked
        self.groups = groups
        self.training = bn.training

    def _check_input_dim(self, x: torch.Tensor) -> None:
        if x.dim() not in (2, 3, 4, 5):
            raise ValueError(f"expected a 2D to 5D input, got {x.dim()}D")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        g = self.groups
        if not self.training or g == 1:
            return super().forward(x)
        n, c = x.shape[:2]
        if n % g:
            raise RecipeError(
                f"method.shuffle_groups: a batch of {n} cannot be split into {g} BatchNorm groups; "
                "choose a divisor of the per-device batch (or method.shuffle_bn: false)"
            )
        factor = 0.0
        if self.track_running_stats:
            self.num_batches_tracked.add_(1)
            factor = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
        # [n, c, ...] -> [n/g, g*c, ...]: channel j*c + k holds channel k of samples j, j+g, j+2g, ...
        grouped = x.reshape(n // g, g * c, *x.shape[2:])
        running_mean = self.running_mean.repeat(g) if self.track_running_stats else None
        running_var = self.running_var.repeat(g) if self.track_running_stats else None
        out = F.batch_norm(
            grouped,
            running_mean,
            running_var,
            None if self.weight is None else self.weight.repeat(g),
            None if self.bias is None else self.bias.repeat(g),
            True,
            factor,
            self.eps,
        )
        if self.track_running_stats:
            with torch.no_grad():
                self.running_mean.copy_(running_mean.view(g, c).mean(dim=0))
                self.running_var.copy_(running_var.view(g, c).mean(dim=0))
        return out.reshape(x.shape)


def split_batch_norm_(module: nn.Module, groups: int) -> nn.Module:
    """Replace every BatchNorm{1,2,3}d under ``module`` (in place) by a :class:`SplitBatchNorm`."""
    for name, child in module.named_children():
        if isinstance(child, nn.modules.batchnorm._BatchNorm) and not isinstance(child, SplitBatchNorm):
            setattr(module, name, SplitBatchNorm(child, groups))
        else:
            split_batch_norm_(child, groups)
    return module


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def shuffle_permutation(n: int, seed: int, progress: float, device: torch.device) -> torch.Tensor:
    """The step's permutation of ``n`` rows: the same on every rank, and again on a resumed run."""
    # hashed: a CPU generator keeps only the seed's low 32 bits, which nearby steps could share
    digest = hashlib.blake2b(f"shuffle-bn:{seed}:{float(progress).hex()}".encode(), digest_size=4).digest()
    generator = torch.Generator(device=device).manual_seed(int.from_bytes(digest, "little"))
    return torch.randperm(n, generator=generator, device=device)


@torch.no_grad()
def shuffled_forward(
    forward: Callable[[torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    *,
    seed: int,
    progress: float,
    gather: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> torch.Tensor:
    """``forward(x)`` with the rows of the (global) batch permuted before and restored after.

    Under DDP ``gather`` (rank-ordered all-gather; default: ``distributed.all_gather_cat``) collects the
    global batch; this rank forwards its slice of the permuted batch. On one process the permutation
    is applied to the local batch (the groups of :class:`SplitBatchNorm` then see random rows).
    """
    if is_distributed():
        from isdretrieve.train.distributed import all_gather_cat

        gather = gather or all_gather_cat
        local, rank = x.shape[0], dist.get_rank()
        everything = gather(x)
        perm = shuffle_permutation(everything.shape[0], seed, progress, x.device)
        mine = perm[rank * local : (rank + 1) * local]
        out = gather(forward(everything[mine]))
        restore = torch.argsort(perm)
        return out[restore[rank * local : (rank + 1) * local]]
    perm = shuffle_permutation(x.shape[0], seed, progress, x.device)
    return forward(x[perm])[torch.argsort(perm)]
