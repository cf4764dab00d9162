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
    """DINO's last layer: a weight-normalised linear map without bias, w_i = g_i · v_i / ‖v_i‖ per output
    row. With ``norm_last_layer`` (DINO's default) the gain g is fixed at 1 and is no parameter; without
    it g is a parameter ``weight_g`` [out, 1] starting at 1, as DINO's ``weight_g`` (2-D, so weight
    decay applies to it, as in DINO's parameter groups)."""

    def __init__(self, in_dim: int, out_dim: int, norm_last_layer: bool = True) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(out_dim, in_dim))
        nn.init.kaiming_uniform_(self.weight, a=5**0.5)  # nn.Linear's default
        self.weight_g = None if norm_last_layer else nn.Parameter(torch.ones(out_dim, 1))

    def forward(self, x: Tensor) -> Tensor:
        weight = F.normalize(self.weight, dim=1)
        return F.linear(x, weight if self.weight_g is None else self.weight_g * weight)


def dino_head(
    in_dim: int,
    hidden_dim: int,
    bottleneck_dim: int,
    out_dim: int,
    *,
    layers: int = 3,
    batch_norm: bool = False,
    norm_last_layer: bool = True,
) -> nn.Sequential:
    """DINO's head (``DINOHead``): an MLP of ``layers`` Linear layers to the bottleneck (GELU between
    them, each hidden Linear followed by BatchNorm1d when ``batch_norm``; one layer: a single Linear),
    then L2 norm and the weight-normalised last layer (:class:`NormalizedLinear`). The defaults are
    DINO's: 3 layers, no BN, ``norm_last_layer``."""
    if layers < 1:
        raise ValueError(f"a DINO head needs at least one layer, got {layers}")
    widths = [in_dim, *[hidden_dim] * (layers - 1), bottleneck_dim]
    mlp: list[nn.Module] = []
    for k in range(layers):
        mlp.append(nn.Linear(widths[k], widths[k + 1]))
        if k < layers - 1:
            mlp.extend([nn.BatchNorm1d(hidden_dim)] if batch_norm else [])
            mlp.append(nn.GELU())
    head = nn.Sequential(*mlp, L2Norm(), NormalizedLinear(bottleneck_dim, out_dim, norm_last_layer))
    for layer in head:
        if isinstance(layer, nn.Linear):  # the official initialisation
            nn.init.trunc_normal_(layer.weight, std=0.02)
            nn.init.zeros_(layer.bias)
    return head
