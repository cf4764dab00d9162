"""DINO (Caron et al., 2021) as AdaSim's base: the student's softmax (τ_s) on each view matches the
teacher's centred, sharpened softmax (τ_t) on each *other* global view, averaged over the pairs; the
centre is an EMA of the teacher's batch-mean logits on the global views; the teacher momentum rises
from ``momentum`` to 1.

Views (``DinoConfig.views``): DINO's two global views T1 / T2 (``dino_global1``, ``dino_global2``) or the
preset's strong view twice, then ``local_crops`` smaller ``dino_local`` crops (multi-crop). The teacher
sees the global views only; the student sees every view, one forward per resolution.

As DINO's ``main_dino.py``: the teacher is updated after the optimiser's step with that step's
momentum (``after_step``), the teacher temperature follows its per-epoch warm-up, and the teacher
has no stochastic depth. The student's drop-path masks come from a random stream seeded by the run's
seed and the step, so a resumed run draws the same masks.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import torch
from torch import nn

from isdretrieve.models.heads import dino_head
from isdretrieve.models.vit import DropPath
from isdretrieve.train.methods.base import (
    Batch,
    Encoder,
    PairMethod,
    StepOutput,
    cosine_momentum,
    ema_copy,
    ema_update,
    softmax_entropy,
    step_seed,
)
from isdretrieve.train.objectives import dino_multicrop_loss
from isdretrieve.train.recipe import DinoConfig
from isdretrieve.train.schedule import linspace_value


def teacher_temperature(cfg: DinoConfig, epoch: int) -> float:
    """DINO's ``teacher_temp_schedule[epoch]``: ``linspace(warmup_tau_teacher, tau_teacher, W)`` over
    the first W = ``warmup_tau_teacher_epochs`` epochs, ``tau_teacher`` after them."""
    warmup = cfg.warmup_tau_teacher_epochs
    if epoch < warmup:
        return linspace_value(cfg.warmup_tau_teacher, cfg.tau_teacher, warmup, epoch)
    return cfg.tau_teacher


class DINO(PairMethod):
    def __init__(self, backbone: nn.Module, cfg: DinoConfig, seed: int = 0) -> None:
        super().__init__()
        self.cfg, self.seed = cfg, seed
        head = dino_head(
            backbone.feature_dim,
            cfg.head_hidden,
            cfg.bottleneck,
            cfg.out_dim,
            layers=cfg.head_layers,
            batch_norm=cfg.head_bn,
            norm_last_layer=cfg.norm_last_layer,
        )
        self.student = Encoder(backbone, head)
        self.teacher = ema_copy(self.student)
        self.drops_paths = any(m.p > 0 for m in self.student.modules() if isinstance(m, DropPath))
        self.register_buffer("center", torch.zeros(1, cfg.out_dim))
        global_views = ("dino_global1", "dino_global2") if cfg.views == "dino" else ("strong", "strong")
        self.views = (*global_views, *("dino_local",) * cfg.local_crops)

    def forward(self, batch: Batch) -> StepOutput:
        view_a, view_b, *local = batch.views
        return self.pair_step(view_a, view_b, batch.progress, local, batch.epoch)[0]

    def pair_step(
        self,
        view_a: torch.Tensor,
        view_b: torch.Tensor,
        progress: float,
        local_views: Sequence[torch.Tensor] = (),
        epoch: int = 0,
    ) -> tuple[StepOutput, torch.Tensor]:
        """The loss between the global views ``view_a``, ``view_b`` and the local crops, and the
        teacher's backbone features of ``view_a``."""
        cfg = self.cfg
        momentum = cosine_momentum(cfg.momentum, progress)
        with self._drop_path_stream(progress, view_a.device):
            student = self.student_logits([view_a, view_b, *local_views])
        if cfg.teacher_update == "next_step":
            ema_update(self.teacher, self.student, momentum)
        features_a, teacher_a, teacher_b = self.teacher_pair(view_a, view_b)
        center, tau_t = self.center.clone(), teacher_temperature(cfg, epoch)
        loss = dino_multicrop_loss(student, [teacher_a, teacher_b], center, cfg.tau_student, tau_t)
        self._update_center(torch.cat([teacher_a, teacher_b]))
        logs = {"momentum": momentum, "teacher_entropy": softmax_entropy((teacher_a - center) / tau_t)}
        if cfg.warmup_tau_teacher_epochs:
            logs["tau_teacher"] = tau_t
        return StepOutput(loss, logs), features_a

    def after_step(self, batch: Batch) -> None:
        """DINO's teacher update: θ_t ← m·θ_t + (1−m)·θ_s with the momentum of the step just taken."""
        if self.cfg.teacher_update == "after_step":
            ema_update(self.teacher, self.student, cosine_momentum(self.cfg.momentum, batch.progress))

    @contextlib.contextmanager
    def _drop_path_stream(self, progress: float, device: torch.device) -> Iterator[None]:
        """While the student runs: the global random stream seeded from (seed, step) when the student
        drops paths (restored afterwards), so stochastic depth draws the same masks on resume."""
        if not (self.drops_paths and self.training):
            yield
            return
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(step_seed("drop-path", self.seed, progress))
            yield

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
