"""DINO (Caron et al., 2021) as AdaSim's base: the student's softmax (τ_s) on each view matches the
teacher's centred, sharpened softmax (τ_t) on each *other* global view, averaged over the pairs; the
centre is an EMA of the teacher's batch-mean logits on the global views; the teacher momentum rises
from ``momentum`` to 1.

Views (``DinoConfig.views``): DINO's two global views T1 / T2 (``dino_global1``, ``dino_global2``) or the
preset's strong view twice, then ``local_crops`` smaller ``dino_local`` crops (multi-crop). The teacher
sees the global views only; the student sees every view, one forward per resolution.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from isdretrieve.models.heads import dino_head
from isdretrieve.train.methods.base import (
    Batch,
    Encoder,
    PairMethod,
    StepOutput,
    cosine_momentum,
    ema_copy,
    ema_update,
    softmax_entropy,
)
from isdretrieve.train.objectives import dino_multicrop_loss
from isdretrieve.train.recipe import DinoConfig


class DINO(PairMethod):
    def __init__(self, backbone: nn.Module, cfg: DinoConfig) -> None:
        super().__init__()
        self.cfg = cfg
        head = dino_head(backbone.feature_dim, cfg.head_hidden, cfg.bottleneck, cfg.out_dim)
        self.student = Encoder(backbone, head)
        self.teacher = ema_copy(self.student)
        self.register_buffer("center", torch.zeros(1, cfg.out_dim))
        global_views = ("dino_global1", "dino_global2") if cfg.views == "dino" else ("strong", "strong")
        self.views = (*global_views, *("dino_local",) * cfg.local_crops)

    def forward(self, batch: Batch) -> StepOutput:
        view_a, view_b, *local = batch.views
        return self.pair_step(view_a, view_b, batch.progress, local)[0]

    def pair_step(
        self,
        view_a: torch.Tensor,
        view_b: torch.Tensor,
        progress: float,
        local_views: Sequence[torch.Tensor] = (),
    ) -> tuple[StepOutput, torch.Tensor]:
        """The loss between the global views ``view_a``, ``view_b`` and the local crops, and the
        teacher's backbone features of ``view_a``."""
        cfg = self.cfg
        momentum = cosine_momentum(cfg.momentum, progress)
        student = self.student_logits([view_a, view_b, *local_views])
        ema_update(self.teacher, self.student, momentum)
        features_a, teacher_a, teacher_b = self.teacher_pair(view_a, view_b)
        center = self.center.clone()
        loss = dino_multicrop_loss(student, [teacher_a, teacher_b], center, cfg.tau_student, cfg.tau_teacher)
        self._update_center(torch.cat([teacher_a, teacher_b]))
        logs = {
            "momentum": momentum,
            "teacher_entropy": softmax_entropy((teacher_a - center) / cfg.tau_teacher),
        }
        return StepOutput(loss, logs), features_a

    def frozen_parameters(self, epoch: int) -> list[nn.Parameter]:
        """The head's last layer (the unit-row linear) in the first ``freeze_last_layer`` epochs."""
        return list(self.student.projector[-1].parameters()) if epoch < self.cfg.freeze_last_layer else []

    def student_logits(self, views: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """The student's logits of each view, one forward per resolution: the views of one size go
        through together (concatenated), as DINO's multi-crop wrapper does."""
        groups: dict[tuple[int, ...], list[int]] = {}
        for position, view in enumerate(views):
            groups.setdefault(tuple(view.shape[-2:]), []).append(position)
        out: list[torch.Tensor] = [views[0]] * len(views)  # placeholders, all replaced below
        for positions in groups.values():
            logits = self.student(torch.cat([views[k] for k in positions]))
            for k, chunk in zip(positions, logits.chunk(len(positions)), strict=True):
                out[k] = chunk
        return out

    @torch.no_grad()
    def _update_center(self, logits: torch.Tensor) -> None:
        """c ← m·c + (1−m)·(mean teacher logit over the global batch); ranks exchange sums, not rows."""
        sums = self.all_gather(logits.float().sum(dim=0, keepdim=True))
        mean = sums.sum(dim=0, keepdim=True) / (logits.shape[0] * sums.shape[0])
        self.center.mul_(self.cfg.center_momentum).add_(mean, alpha=1 - self.cfg.center_momentum)
