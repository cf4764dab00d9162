"""Projection and prediction heads.

The ISD heads are ``nn.Sequential`` of (0 Linear, 1 BatchNorm1d, 2 ReLU, 3 Linear), so their state-dict
keys (``0.weight``, ``1.running_mean``, ``3.bias``, ...) match the official ISD checkpoints. The DINO
head (AdaSim's base) follows the official DINO layout.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def projection_mlp(in_dim: int, hidden_dim: int, out_dim: int) -> nn.Sequential:
    """Linear(bias) - BN1d - ReLU - Linear(bias): ISD-MLP projection (D -> 2D -> D/4), the BYOL heads and
    MoCo's ``head: bn`` option."""
    return nn.Sequential(
        nn.Linear(in_dim, hidden_dim),
        nn.BatchNorm1d(hidden_dim),
        nn.ReLU(inplace=True),
        nn.Linear(hidden_dim, out_dim),
    )


def moco_v2_head(in_dim: int, hidden_dim: int, out_dim: int) -> nn.Sequential:
    """The official MoCo-v2 head (``--mlp``): Linear(bias) - ReLU - Linear(bias), no BatchNorm; the
    official hidden width is the backbone's feature dimension (D -> D -> 128)."""
    return nn.Sequential(nn.Linear(in_dim, hidden_dim), nn.ReLU(inplace=True), nn.Linear(hidden_dim, out_dim))


def isd_base_predictor(dim: int) -> nn.Sequential:
    """ISD-base student predictor: Linear(D -> D, no bias) - BN1d(D) - ReLU - Linear(D -> D, bias)."""
    return nn.Sequential(
        nn.Linear(dim, dim, bias=False),
        nn.BatchNorm1d(dim),
        nn.ReLU(inplace=True),
        nn.Linear(dim, dim),
    )


class L2Norm(nn.Module):
    """Scale each row to unit length."""

    def forward(self, x: Tensor) -> Tensor:
        return F.normalize(x, dim=-1)


class NormalizedLinear(nn.Module):
    """Linear map without bias whose weight rows are unit vectors: a weight-normalised layer with its
    gain fixed at 1 (DINO's last layer, ``norm_last_layer=True``)."""

    def __init__(self, in_dim: int, out_dim: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(out_dim, in_dim))
        nn.init.kaiming_uniform_(self.weight, a=5**0.5)  # nn.Linear's default

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, F.normalize(self.weight, dim=1))


def dino_head(in_dim: int, hidden_dim: int, bottleneck_dim: int, out_dim: int) -> nn.Sequential:
    """DINO head: Linear-GELU-Linear-GELU-Linear to the bottleneck, L2 norm, unit-row linear."""
    head = nn.Sequential(
        nn.Linear(in_dim, hidden_dim),
        nn.GELU(),
        nn.Linear(hidden_dim, hidden_dim),
        nn.GELU(),
        nn.Linear(hidden_dim, bottleneck_dim),
        L2Norm(),
        NormalizedLinear(bottleneck_dim, out_dim),
    )
    for layer in head:
        if isinstance(layer, nn.Linear):  # the official initialisation
            nn.init.trunc_normal_(layer.weight, std=0.02)
            nn.init.zeros_(layer.bias)
    return head
