"""MoCo-v2 (Chen et al., 2020): InfoNCE between a query and its momentum key against a queue of keys.

The head is the official one (Linear–ReLU–Linear, D→D→128) unless ``head: bn``; the key encoder's
forward goes through shuffle-BN unless ``shuffle_bn: false``, as in the official code."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from isdretrieve.errors import CheckpointError
from isdretrieve.models.heads import moco_v2_head, projection_mlp
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
        dim = backbone.feature_dim
        make_head = moco_v2_head if cfg.head == "official" else projection_mlp
        self.student = Encoder(backbone, make_head(dim, cfg.hidden_dim(dim), cfg.proj_dim))
        self.teacher = ema_copy(self.student)
        self.memory = EmbeddingQueue(cfg.queue_size, cfg.proj_dim, generator=seeded_generator(seed))
        if cfg.shuffles:
            self.use_shuffle_bn(cfg.shuffle_groups, seed)

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        """As nn.Module's, with a clear error for a checkpoint whose head is the other form."""
        had_bn = any(k.startswith("student.projector.1.") for k in state_dict)
        if had_bn != (self.cfg.head == "bn"):
            was = "bn" if had_bn else "official"
            raise CheckpointError(
                f"this MoCo checkpoint has the head: {was} projection head (BatchNorm "
                f"{'inside' if had_bn else 'absent'}), the recipe asks for head: {self.cfg.head}; "
                f"resume it with --set method.head={was}"
                + (" (and method.proj_hidden=2048, the old default)" if had_bn else "")
            )
        return super().load_state_dict(state_dict, strict=strict, assign=assign)

    def encode(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """(query, key): the student's normalised query, then (after the EMA step) the teacher's key."""
        key_view, query_view = batch.views
        query = F.normalize(self.student(query_view), dim=1)
        ema_update(self.teacher, self.student, self.cfg.momentum)
        key = self.key_forward(self.teacher, key_view, batch.progress)
        return query, F.normalize(key, dim=1).detach()

    def forward(self, batch: Batch) -> StepOutput:
        query, key = self.encode(batch)
        loss = info_nce(query, key, self.memory.snapshot(), self.cfg.tau)
        self.memory.push(self.all_gather(key), self.all_gather(batch.indices))
        with torch.no_grad():
            positive_similarity = (query * key).sum(dim=1).mean()
        return StepOutput(loss, {"positive_similarity": positive_similarity})
