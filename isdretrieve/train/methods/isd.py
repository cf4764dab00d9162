"""ISD (Tejankar et al., ICCV 2021): the student matches the teacher's similarity distribution over a
queue of the teacher's past embeddings. ISD-base: no projection, predictor Linear–BN–ReLU–Linear,
τ_t = τ_s. ISD-MLP: projection D→2D→D/4 on student and teacher, predictor on the student (the
``variant`` of the config fills the rest). The teacher's forward goes through shuffle-BN as in the
official code unless ``shuffle_bn: false``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from isdretrieve.models.heads import isd_base_predictor, projection_mlp
from isdretrieve.train.memory import EmbeddingQueue
from isdretrieve.train.methods.base import (
    Batch,
    Encoder,
    Method,
    StepOutput,
    ema_copy,
    ema_update,
    seeded_generator,
    softmax_entropy,
)
from isdretrieve.train.objectives import distillation_kl, similarity_logits
from isdretrieve.train.recipe import IsdConfig


class ISD(Method):
    def __init__(self, backbone: nn.Module, cfg: IsdConfig, seed: int = 0) -> None:
        super().__init__()
        self.cfg = cfg
        self.views = (cfg.teacher_view, cfg.student_view)
        dim = backbone.feature_dim
        if cfg.projection:
            embed_dim = max(dim // 4, 1)
            self.student = Encoder(backbone, projection_mlp(dim, 2 * dim, embed_dim))
            self.predictor = projection_mlp(embed_dim, 2 * dim, embed_dim)
        else:
            embed_dim = dim
            self.student = Encoder(backbone)
            self.predictor = isd_base_predictor(dim)
        self.teacher = ema_copy(self.student)
        self.memory = EmbeddingQueue(cfg.queue_size, embed_dim, generator=seeded_generator(seed))
        if cfg.shuffles:
            self.use_shuffle_bn(cfg.shuffle_groups, seed)

    def encode(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """(student, teacher): the predicted student embedding, then (after the EMA step) the teacher's."""
        teacher_view, student_view = batch.views
        student = F.normalize(self.predictor(self.student(student_view)), dim=1)
        ema_update(self.teacher, self.student, self.cfg.momentum)
        teacher = self.key_forward(self.teacher, teacher_view, batch.progress)
        return student, F.normalize(teacher, dim=1).detach()

    def forward(self, batch: Batch) -> StepOutput:
        student, teacher = self.encode(batch)
        anchors = self.memory.snapshot()
        logits_s, logits_t = similarity_logits(
            student, teacher, anchors, self.cfg.tau_student, self.cfg.tau_teacher
        )
        self.memory.push(self.all_gather(teacher), self.all_gather(batch.indices))
        return StepOutput(distillation_kl(logits_s, logits_t), {"teacher_entropy": softmax_entropy(logits_t)})
