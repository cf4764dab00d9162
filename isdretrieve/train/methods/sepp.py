"""SePP (Alkhalefi et al., TMLR 2024) on MoCo-v2 or ISD, as we design it: every image trains with a
view of one semantic positive mined offline (``isd-index mine``), drawn anew each epoch.

SePP-MoCo: the partner's key is a second positive of a multi-positive InfoNCE, and queue entries that
hold a query's mined positives are not used as its negatives. SePP-ISD: the partner's teacher embedding
joins that sample's anchors, so the teacher's similarity distribution puts mass on it and the student
learns to match. Images without a positive train exactly as in the base method.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from isdretrieve.errors import RecipeError
from isdretrieve.files.pairs import Pairs
from isdretrieve.train.methods.base import Batch, DataContext, StepOutput, softmax_entropy
from isdretrieve.train.methods.isd import ISD
from isdretrieve.train.methods.moco import MoCo
from isdretrieve.train.objectives import distillation_kl, info_nce, similarity_logits
from isdretrieve.train.positives import PositiveLists
from isdretrieve.train.recipe import SeppConfig


def load_positive_lists(cfg: SeppConfig, data: DataContext) -> PositiveLists:
    """The mined lists of ``cfg.pairs`` over the training set's indices (randomised for the control)."""
    if not cfg.pairs:
        raise RecipeError("method.pairs: give the pairs.h5 mined with `isd-index mine`")
    if not 0.0 <= cfg.partner_p <= 1.0:
        raise RecipeError(f"method.partner_p: must be in [0, 1], got {cfg.partner_p}")
    pairs = Pairs.open(cfg.pairs)
    size = int(pairs.attrs.get("dataset_size", len(pairs)))
    if size != data.num_images:
        raise RecipeError(
            f"method.pairs: {cfg.pairs} was mined over {size} images, the training set has "
            f"{data.num_images}: mine the bank of data.train"
        )
    mined_items = pairs.attrs.get("items_sha256", "")
    if mined_items and data.items_sha256 and mined_items != data.items_sha256:
        raise RecipeError(
            f"method.pairs: {cfg.pairs} was mined over other images than data.train "
            "(the file lists differ): mine the bank of data.train"
        )
    lists = PositiveLists(*(torch.from_numpy(a) for a in pairs.in_dataset_space(data.num_images)))
    return lists.randomised(data.seed) if cfg.partners == "random" else lists


class _Partners:
    """What both SePP variants share: the lists, the per-epoch draw and the step's partner mask."""

    sepp: SeppConfig
    positives: PositiveLists
    seed: int

    def _attach(self, cfg: SeppConfig, data: DataContext) -> None:
        self.sepp, self.seed = cfg, data.seed
        self.positives = load_positive_lists(cfg, data)

    def partner_map(self, epoch: int) -> torch.Tensor:
        return self.positives.partner_map(self.seed, epoch, self.sepp.partner_p)

    @staticmethod
    def has_partner(batch: Batch) -> torch.Tensor:
        if batch.partners is None:
            return torch.zeros_like(batch.indices, dtype=torch.bool)
        return batch.partners != batch.indices


class SeppMoCo(_Partners, MoCo):
    partner_views = ("strong",)

    def __init__(self, backbone: nn.Module, cfg: SeppConfig, data: DataContext) -> None:
        MoCo.__init__(self, backbone, cfg.moco, data.seed)
        self._attach(cfg, data)

    def forward(self, batch: Batch) -> StepOutput:
        query, key = self.encode(batch)
        has = self.has_partner(batch)
        positives, positive_mask = key.unsqueeze(1), None
        if batch.partner_views:
            partner_key = self.key_forward(self.teacher, batch.partner_views[0], batch.progress)
            partner_key = F.normalize(partner_key, dim=1).detach()
            positives = torch.stack([key, partner_key], dim=1)
            positive_mask = torch.stack([torch.ones_like(has), has], dim=1)
        negative_mask = None
        if self.sepp.mask_positives:
            negative_mask = self.positives.queue_mask(batch.indices, self.memory.indices)
        loss = info_nce(query, positives, self.memory.snapshot(), self.cfg.tau, negative_mask, positive_mask)
        self.memory.push(self.all_gather(key), self.all_gather(batch.indices))
        logs = {"partner_rate": has.float().mean()}
        if negative_mask is not None:
            logs["masked_negatives"] = negative_mask.float().sum(dim=1).mean()
        return StepOutput(loss, logs)


class SeppISD(_Partners, ISD):
    def __init__(self, backbone: nn.Module, cfg: SeppConfig, data: DataContext) -> None:
        ISD.__init__(self, backbone, cfg.isd, data.seed)
        self.partner_views = (cfg.isd.teacher_view,)
        self._attach(cfg, data)

    def forward(self, batch: Batch) -> StepOutput:
        student, teacher = self.encode(batch)
        anchors = self.memory.snapshot()
        has = self.has_partner(batch)
        extra = extra_mask = None
        if batch.partner_views:
            extra = self.key_forward(self.teacher, batch.partner_views[0], batch.progress)
            extra = F.normalize(extra, dim=1).detach().unsqueeze(1)
            extra_mask = has.unsqueeze(1)
        tau_s, tau_t = self.cfg.tau_student, self.cfg.tau_teacher
        logits_s, logits_t = similarity_logits(student, teacher, anchors, tau_s, tau_t, extra, extra_mask)
        self.memory.push(self.all_gather(teacher), self.all_gather(batch.indices))
        return StepOutput(
            distillation_kl(logits_s, logits_t),
            {
                "teacher_entropy": softmax_entropy(logits_t[:, : len(anchors)]),  # over the queue
                "partner_rate": has.float().mean(),
            },
        )


def build_sepp(backbone: nn.Module, cfg: SeppConfig, data: DataContext) -> SeppMoCo | SeppISD:
    return SeppMoCo(backbone, cfg, data) if cfg.base == "moco" else SeppISD(backbone, cfg, data)
