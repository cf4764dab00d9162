"""AdaSim (Lebailly et al., ICCV 2023): self-distillation between an image and a partner image that is
sampled from its neighbours only when the latent space looks trustworthy for it.

Every step the teacher's backbone embedding of each image's own view (never the partner's) is written
to a dataset-indexed memory, after its top-k neighbours (self included) were found against the memory
as it was before the write. Once per epoch the lists go into a window of the last W epochs. From epoch W
on, an image whose window-averaged similarity ranks itself first draws its partner from
softmax(s̄/τ) over its top-k candidates (itself included); otherwise it is its own partner. The loss is
the base method's (BYOL or DINO) between view T(x_i) and view T'(x_partner).

``mode: naive`` pairs every image with its nearest other neighbour from the latest lists (after the
same warm-up); ``mode: plain`` keeps every image its own partner, i.e. the plain base method.

Views: with BYOL, the strong view of each. With DINO (as AdaSim's code): DINO's global view 1 of the
image itself and global view 2 of its partner (or the strong view of each, ``dino.views: strong``).
AdaSim's code takes no local crops; with ``dino.local_crops: N`` (our extension) the student also sees N
local crops *of the image itself*, each paired with both teacher views as in DINO's multi-crop loss.
The memory always gets the teacher's backbone feature of the image's own global view 1.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from isdretrieve.train.batches import epoch_generator
from isdretrieve.train.methods.base import Batch, DataContext, Method, StepOutput
from isdretrieve.train.methods.byol import BYOL
from isdretrieve.train.methods.dino import DINO
from isdretrieve.train.neighbour_memory import (
    IndexedMemory,
    NeighbourHistory,
    NeighbourLists,
    feature_std,
    label_precision,
    nearest_other,
    select_partners,
    self_retrieval_rate,
    window_average,
)
from isdretrieve.train.recipe import AdasimConfig

PARTNER_STREAM = 101  # epoch_generator stream of the partner sampling (no other user)
ROWS_PER_CHUNK = 8192  # images per chunk of the partner computation


class AdaSim(Method):
    def __init__(self, backbone: nn.Module, cfg: AdasimConfig, data: DataContext) -> None:
        super().__init__()
        self.cfg, self.seed = cfg, data.seed
        self.base: BYOL | DINO = (
            BYOL(backbone, cfg.byol) if cfg.base == "byol" else DINO(backbone, cfg.dino, data.seed)
        )
        first, second, *local = self.base.views
        self.views = (first, *local)  # T(x_i), and DINO's local crops of x_i
        self.partner_views = (second,)  # T'(x_partner)
        n, dim = data.num_images, backbone.feature_dim
        self.memory = IndexedMemory(n, dim)
        self.lists = NeighbourLists(n, cfg.k)
        self.history = NeighbourHistory(n, cfg.window, cfg.k)
        self.labels = data.labels.cpu()  # diagnostics only
        self._partners: tuple[int, torch.Tensor, torch.Tensor | None] | None = None  # epoch, map, gate

    @property
    def student(self) -> nn.Module:
        return self.base.student

    @property
    def teacher(self) -> nn.Module:
        return self.base.teacher

    def frozen_parameters(self, epoch: int) -> list[nn.Parameter]:
        return self.base.frozen_parameters(epoch)

    def after_step(self, batch: Batch) -> None:
        self.base.after_step(batch)

    def forward(self, batch: Batch) -> StepOutput:
        (own, *local), (partner,) = batch.views, batch.partner_views
        self.base.all_gather = self.all_gather  # the engine sets ours under DDP (DINO's centre needs it)
        if isinstance(self.base, DINO):  # with DINO's local crops of the image itself, if any
            out, features = self.base.pair_step(own, partner, batch.progress, local, batch.epoch)
        else:
            out, features = self.base.pair_step(own, partner, batch.progress)
        self.remember(features, batch.indices)
        if batch.partners is not None:
            out.logs["bootstrap_rate"] = (batch.partners != batch.indices).float().mean()
        return out

    @torch.no_grad()
    def remember(self, features: torch.Tensor, indices: torch.Tensor) -> None:
        """Find the neighbours of this batch's own-view embeddings, then write both (global batch)."""
        embeddings = F.normalize(features.float(), dim=1)
        nn_idx, nn_sim = self.memory.search(embeddings, self.cfg.k, self.cfg.search_chunk)
        rows = self.all_gather(indices.to(nn_idx.device))
        self.lists.write(rows, self.all_gather(nn_idx), self.all_gather(nn_sim))
        self.memory.write(rows, self.all_gather(embeddings))

    def partner_map(self, epoch: int) -> torch.Tensor:
        """Every image's partner this epoch, from the history only (so a resumed epoch gets the same)."""
        own = torch.arange(self.lists.indices.shape[0], device=self.lists.indices.device)
        gate = None
        if self.cfg.mode == "plain" or not self.history.full:
            partners = own
        elif self.cfg.mode == "naive":
            partners = nearest_other(own, self.history.latest())
        else:
            partners, gate = self._sample_partners(own, epoch)
        partners = partners.cpu()
        self._partners = (epoch, partners, None if gate is None else gate.cpu())
        return partners

    def _sample_partners(self, own: torch.Tensor, epoch: int) -> tuple[torch.Tensor, torch.Tensor]:
        k, device = self.cfg.k, own.device
        uniform = torch.rand(
            own.shape[0], k, generator=epoch_generator(self.seed, epoch, stream=PARTNER_STREAM)
        )
        partners, gates = [], []
        for start in range(0, own.shape[0], ROWS_PER_CHUNK):
            rows = slice(start, start + ROWS_PER_CHUNK)
            candidates, scores = window_average(*self.history.flat(rows), self.cfg.window)
            p, g = select_partners(own[rows], candidates, scores, k, self.cfg.tau, uniform[rows].to(device))
            partners.append(p)
            gates.append(g)
        return torch.cat(partners), torch.cat(gates)

    def end_epoch(self, epoch: int) -> dict[str, float]:
        """Log the neighbour diagnostics, then move this epoch's lists into the window."""
        if self._partners is None or self._partners[0] != epoch:
            self.partner_map(epoch)
        _, partners, gate = self._partners
        own = torch.arange(partners.shape[0])
        stats = {
            "bootstrap_rate": (partners != own).float().mean().item(),
            "self_retrieval": self_retrieval_rate(self.lists.indices),
            "nn_label_precision": label_precision(self.lists.indices, self.labels),
            "feature_std": feature_std(self.memory),
            "self_first_in_window": None if gate is None else gate.float().mean().item(),
        }
        if stats["feature_std"] is not None:
            stats["feature_std_x_sqrt_d"] = stats["feature_std"] * self.memory.embeddings.shape[1] ** 0.5
        self.history.push(self.lists)
        return {name: round(value, 6) for name, value in stats.items() if value is not None}
