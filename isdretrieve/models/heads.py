"""Projection and prediction heads with the official ISD module indices.

Both are ``nn.Sequential`` of (0 Linear, 1 BatchNorm1d, 2 ReLU, 3 Linear), so their state-dict keys
(``0.weight``, ``1.running_mean``, ``3.bias``, ...) match the official ISD checkpoints.
"""

from __future__ import annotations

from torch import nn


def projection_mlp(in_dim: int, hidden_dim: int, out_dim: int) -> nn.Sequential:
    """Linear(bias) - BN1d - ReLU - Linear(bias): ISD-MLP projection (D -> 2D -> D/4), MoCo-v2/BYOL heads."""
    return nn.Sequential(
        nn.Linear(in_dim, hidden_dim),
        nn.BatchNorm1d(hidden_dim),
        nn.ReLU(inplace=True),
        nn.Linear(hidden_dim, out_dim),
    )


def isd_base_predictor(dim: int) -> nn.Sequential:
    """ISD-base student predictor: Linear(D -> D, no bias) - BN1d(D) - ReLU - Linear(D -> D, bias)."""
    return nn.Sequential(
        nn.Linear(dim, dim, bias=False),
        nn.BatchNorm1d(dim),
        nn.ReLU(inplace=True),
        nn.Linear(dim, dim),
    )
