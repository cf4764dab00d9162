"""DINO (Caron et al., 2021) with two global views, as AdaSim's base: the student's softmax (τ_s) on
one view matches the teacher's centred, sharpened softmax (τ_t) on the other, symmetrised; the centre
is an EMA of the teacher's batch-mean logits; the teacher momentum rises from ``momentum`` to 1."""

from __future__ import annotations

import torch
from torch import nn

from isdretrieve.models import dino_head
from isdretrieve.train.methods.base import (
    Encoder,
    PairMethod,
    StepOutput,
    cosine_momentum,
    ema_copy,
    ema_update,
    softmax_entropy,
)
from isdretrieve.train.objectives import dino_cross_entropy
from isdretrieve.train.recipe import DinoConfig


class DINO(PairMethod):
    def __init__(self, backbone: nn.Module, cfg: DinoConfig) -> None:
        super().__init__()
        self.cfg = cfg
        head = dino_head(backbone.feature_dim, cfg.head_hidden, cfg.bottleneck, cfg.out_dim)
        self.student = Encoder(backbone, head)
        self.teacher = ema_copy(self.student)
        self.register_buffer("center", torch.zeros(1, cfg.out_dim))

    def pair_step(
        self, view_a: torch.Tensor, view_b: torch.Tensor, progress: float
    ) -> tuple[StepOutput, torch.Tensor]:
        """The symmetric loss between two views, and the teacher's backbone features of ``view_a``."""
        cfg = self.cfg
        momentum = cosine_momentum(cfg.momentum, progress)
        student_a, student_b = self.student(view_a), self.student(view_b)
        ema_update(self.teacher, self.student, momentum)
        features_a, teacher_a, teacher_b = self.teacher_pair(view_a, view_b)
        center = self.center.clone()
        loss = (
            dino_cross_entropy(student_a, teacher_b, center, cfg.tau_student, cfg.tau_teacher)
            + dino_cross_entropy(student_b, teacher_a, center, cfg.tau_student, cfg.tau_teacher)
        ) / 2
        self._update_center(torch.cat([teacher_a, teacher_b]))
        logs = {
            "momentum": momentum,
            "teacher_entropy": softmax_entropy((teacher_a - center) / cfg.tau_teacher),
        }
        return StepOutput(loss, logs), features_a

    def frozen_parameters(self, epoch: int) -> list[nn.Parameter]:
        """The head's last layer (the unit-row linear) in the first ``freeze_last_layer`` epochs."""
        return list(self.student.projector[-1].parameters()) if epoch < self.cfg.freeze_last_layer else []

    @torch.no_grad()
    def _update_center(self, logits: torch.Tensor) -> None:
        """c ← m·c + (1−m)·(mean teacher logit over the global batch); ranks exchange sums, not rows."""
        sums = self.all_gather(logits.float().sum(dim=0, keepdim=True))
        mean = sums.sum(dim=0, keepdim=True) / (logits.shape[0] * sums.shape[0])
        self.center.mul_(self.cfg.center_momentum).add_(mean, alpha=1 - self.cfg.center_momentum)
