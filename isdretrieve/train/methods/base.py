"""What every method shares: the batch it receives, what it returns, encoders and the EMA teacher."""

from __future__ import annotations

import copy
import hashlib
import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from isdretrieve.models.vit import disable_drop_path
from isdretrieve.train.shuffle_bn import is_distributed, shuffled_forward, split_batch_norm_


@dataclass
class Batch:
    """One step's input: augmented views of the local batch, in the order ``Method.views`` asks for."""

    views: list[torch.Tensor]
    indices: torch.Tensor  # dataset index of each image [B]
    labels: torch.Tensor  # ground truth for logging only (−1 unknown) [B]
    progress: float  # fraction of training done, 0 → 1 (momentum schedules)
    partner_views: list[torch.Tensor] = field(default_factory=list)  # of each image's partner
    partners: torch.Tensor | None = None  # dataset index of each image's partner [B] (itself = none)
    epoch: int = 0  # the epoch this step belongs to (per-epoch schedules: DINO's teacher temperature)


@dataclass(frozen=True)
class DataContext:
    """What a method may know about its training set when it is built."""

    num_images: int
    labels: torch.Tensor  # [N] on CPU, −1 unknown; for logged diagnostics only, never for training
    seed: int = 0
    items_sha256: str = ""  # over the item names, as in bank.h5: pairs must come from these images


@dataclass
class StepOutput:
    loss: torch.Tensor
    # scalars for the metrics log: tensors (averaged over ranks at log steps), or floats that every rank
    # shares (a schedule's value: a Python number turned into a GPU tensor would cost a host sync)
    logs: dict[str, torch.Tensor | float] = field(default_factory=dict)


def identity_gather(t: torch.Tensor) -> torch.Tensor:
    return t


class Encoder(nn.Module):
    """Backbone followed by an optional projection head; the teacher is an EMA copy of this."""

    def __init__(self, backbone: nn.Module, projector: nn.Module | None = None) -> None:
        super().__init__()
        self.backbone = backbone
        self.projector = projector if projector is not None else nn.Identity()

    def forward(self, x: torch.Tensor, with_features: bool = False):
        """The projection of ``x``; with ``with_features``, (backbone features, projection)."""
        features = self.backbone(x)
        return (features, self.projector(features)) if with_features else self.projector(features)


def ema_copy(module: nn.Module) -> nn.Module:
    """A frozen copy to serve as the momentum teacher, without stochastic depth (DINO builds its
    teacher without drop path; a ResNet has none to turn off)."""
    teacher = copy.deepcopy(module)
    teacher.requires_grad_(False)
    disable_drop_path(teacher)
    return teacher


@torch.no_grad()
def ema_update(teacher: nn.Module, student: nn.Module, momentum: float) -> None:
    """θ_t ← m·θ_t + (1−m)·θ_s over parameters only; buffers (BN statistics) stay the teacher's own."""
    t_params = list(teacher.parameters())
    s_params = [p.detach() for p in student.parameters()]
    torch._foreach_lerp_(t_params, s_params, 1.0 - momentum)


def seeded_generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def softmax_entropy(logits: torch.Tensor) -> torch.Tensor:
    """Mean entropy of softmax(logits) over the batch: how peaked a target distribution is."""
    log_p = torch.log_softmax(logits.detach().float(), dim=1)
    return -(log_p.exp() * log_p).sum(dim=1).mean()


def cosine_momentum(base: float, progress: float) -> float:
    """BYOL's schedule: m rises from ``base`` to 1 along a half cosine."""
    return 1.0 - (1.0 - base) * (math.cos(math.pi * progress) + 1) / 2


def step_seed(purpose: str, seed: int, progress: float) -> int:
    """A seed for one step's random draws for ``purpose``, from the run's seed and the step's progress
    only, so that a resumed run draws what the straight run drew."""
    digest = hashlib.blake2b(f"{purpose}:{seed}:{float(progress).hex()}".encode(), digest_size=4).digest()
    return int.from_bytes(digest, "little")


class Method(nn.Module):
    """A self-supervised method: ``forward(batch)`` computes the loss and updates its memory.

    ``views`` names the augmentation of each view the method wants ("strong" / "weak", or DINO's
    "dino_global1" / "dino_global2" / "dino_local": ``data.augment.VIEW_NAMES``); views may differ in size.
    ``all_gather`` is set by the engine under DDP: it concatenates a tensor over all ranks in rank order.
    ``feature_backbone`` is the network whose features are evaluated (the student backbone).

    Methods that train on pairs of images (SePP, AdaSim) name the views they want of each image's
    *partner* in ``partner_views`` and say who the partners are in ``partner_map``, once per epoch.
    """

    views: tuple[str, ...] = ("strong", "strong")
    partner_views: tuple[str, ...] = ()

    def __init__(self) -> None:
        super().__init__()
        self.all_gather: Callable[[torch.Tensor], torch.Tensor] = identity_gather
        self.shuffle_seed: int | None = None  # set by use_shuffle_bn

    def use_shuffle_bn(self, groups: int, seed: int) -> None:
        """Shuffle the key/teacher batch from now on (call once every module is built): across ranks
        under DDP; on one device with every BatchNorm split into ``groups`` (see ``train/shuffle_bn``)."""
        self.shuffle_seed = seed
        if not is_distributed():
            split_batch_norm_(self, groups)

    def key_forward(self, module: nn.Module, x: torch.Tensor, progress: float) -> torch.Tensor:
        """``module(x)`` for the key/teacher path, through shuffle-BN when the method uses it."""
        if self.shuffle_seed is None:
            return module(x)
        gather = self.all_gather if is_distributed() else None
        return shuffled_forward(module, x, seed=self.shuffle_seed, progress=progress, gather=gather)

    @property
    def feature_backbone(self) -> nn.Module:
        return self.student.backbone

    def partner_map(self, epoch: int) -> torch.Tensor | None:
        """Dataset index of every image's partner in ``epoch`` ([N] long; i itself = no partner).

        Called at the start of every epoch, also of an epoch resumed mid-way, so it must depend only on
        the seed, the epoch and state that changes in ``end_epoch``. None: no partners this epoch.
        """
        return None

    def end_epoch(self, epoch: int) -> dict[str, float]:
        """Called after the last step of ``epoch``, before its checkpoint; returns scalars to log."""
        return {}

    def after_step(self, batch: Batch) -> None:
        """Called right after the optimiser's step on ``batch`` (DINO's teacher update goes here)."""

    def frozen_parameters(self, epoch: int) -> list[nn.Parameter]:
        """Parameters not to update in ``epoch``: the engine drops their gradients after backward, so
        neither the step nor weight decay touches them. Must depend only on the epoch (and config)."""
        return []

    def forward(self, batch: Batch) -> StepOutput:  # pragma: no cover - abstract
        raise NotImplementedError


class PairMethod(Method):
    """A symmetric two-view method (BYOL, DINO) whose ``pair_step`` AdaSim reuses with partner views."""

    views = ("strong", "strong")

    def forward(self, batch: Batch) -> StepOutput:
        view_a, view_b = batch.views
        return self.pair_step(view_a, view_b, batch.progress)[0]

    def pair_step(
        self, view_a: torch.Tensor, view_b: torch.Tensor, progress: float
    ) -> tuple[StepOutput, torch.Tensor]:  # pragma: no cover - abstract
        """The symmetric loss between two views, and the teacher's backbone features of ``view_a``."""
        raise NotImplementedError

    @torch.no_grad()
    def teacher_pair(
        self, view_a: torch.Tensor, view_b: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The teacher's (backbone features of ``view_a``, output on ``view_a``, output on ``view_b``),
        both through the teacher's own call, so that a compiled teacher stays compiled for both views."""
        features_a, out_a = self.teacher(view_a, with_features=True)
        return features_a, out_a, self.teacher(view_b)
