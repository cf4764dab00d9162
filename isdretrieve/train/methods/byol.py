"""BYOL (Grill et al., 2020): the online network predicts the EMA target's projection of the other
view; the loss is the paper's L + L̃, the *sum* of the two views' normalised MSE (each 2 − 2·cos, batch
mean), so its gradient is twice that of the mean; the target momentum rises from ``momentum`` to 1."""

from __future__ import annotations

import torch
from torch import nn

from isdretrieve.models.heads import projection_mlp
from isdretrieve.train.methods.base import (
    Encoder,
    PairMethod,
    StepOutput,
    cosine_momentum,
    ema_copy,
    ema_update,
)
from isdretrieve.train.objectives import byol_loss
from isdretrieve.train.recipe import ByolConfig


class BYOL(PairMethod):
    def __init__(self, backbone: nn.Module, cfg: ByolConfig, seed: int = 0) -> None:
        super().__init__()
        self.cfg = cfg
        self.student = Encoder(backbone, projection_mlp(backbone.feature_dim, cfg.proj_hidden, cfg.proj_dim))
        self.predictor = projection_mlp(cfg.proj_dim, cfg.proj_hidden, cfg.proj_dim)
        self.teacher = ema_copy(self.student)

    def pair_step(
        self, view_a: torch.Tensor, view_b: torch.Tensor, progress: float
    ) -> tuple[StepOutput, torch.Tensor]:
        """The symmetric loss between two views, and the target's backbone features of ``view_a``."""
        momentum = cosine_momentum(self.cfg.momentum, progress)
        pred_a, pred_b = self.predictor(self.student(view_a)), self.predictor(self.student(view_b))
        ema_update(self.teacher, self.student, momentum)
        features_a, target_a, target_b = self.teacher_pair(view_a, view_b)
        loss = byol_loss(pred_a, pred_b, target_a, target_b)
        return StepOutput(loss, {"momentum": momentum}), features_a
