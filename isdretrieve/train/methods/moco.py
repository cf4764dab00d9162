"""MoCo-v2 (Chen et al., 2020): InfoNCE between a query and its momentum key against a queue of keys."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from isdretrieve.models import projection_mlp
from isdretrieve.train.memory import EmbeddingQueue
from isdretrieve.train.methods.base import (
    Batch,
    Encoder,
    Method,
    StepOutput,
    ema_copy,
    ema_update,
    seeded_generator,
)
from isdretrieve.train.objectives import info_nce
from isdretrieve.train.recipe import MocoConfig


class MoCo(Method):
    views = ("strong", "strong")  # (key view, query view)

    def __init__(self, backbone: nn.Module, cfg: MocoConfig, seed: int = 0) -> None:
        super().__init__()
        self.cfg = cfg
        self.student = Encoder(backbone, projection_mlp(backbone.feature_dim, cfg.proj_hidden, cfg.proj_dim))
        self.teacher = ema_copy(self.student)
        self.memory = EmbeddingQueue(cfg.queue_size, cfg.proj_dim, generator=seeded_generator(seed))

    def encode(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """(query, key): the student's normalised query, then (after the EMA step) the teacher's key."""
        key_view, query_view = batch.views
        query = F.normalize(self.student(query_view), dim=1)
        ema_update(self.teacher, self.student, self.cfg.momentum)
        return query, F.normalize(self.teacher(key_view), dim=1).detach()

    def forward(self, batch: Batch) -> StepOutput:
        query, key = self.encode(batch)
        loss = info_nce(query, key, self.memory.snapshot(), self.cfg.tau)
        self.memory.push(self.all_gather(key), self.all_gather(batch.indices))
        with torch.no_grad():
            positive_similarity = (query * key).sum(dim=1).mean()
        return StepOutput(loss, {"positive_similarity": positive_similarity})
