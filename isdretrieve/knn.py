"""k-NN classification on L2-normalised features (InstDisc/DINO voting), chunked, on any device."""

from __future__ import annotations

from typing import Literal

import torch

Weighting = Literal["exp", "uniform"]


@torch.no_grad()
def knn_class_scores(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    test_features: torch.Tensor,
    *,
    k: int,
    temperature: float = 0.07,
    weighting: Weighting = "exp",
    num_classes: int | None = None,
    chunk_size: int = 1024,
) -> torch.Tensor:
    """Class scores [Q, C]: Σ over the k nearest train rows (cosine) of exp(s/T) (or 1) per label.

    Features must be L2-normalised; labels are in 0..C−1.
    """
    if k <= 0:
        raise ValueError(f"k must be positive, got {k}")
    k = min(k, train_features.shape[0])
    num_classes = int(train_labels.max()) + 1 if num_classes is None else num_classes
    train_features = train_features.to(test_features.dtype)
    out = []
    for start in range(0, test_features.shape[0], chunk_size):
        sims, idx = (test_features[start : start + chunk_size] @ train_features.T).topk(k, dim=1)
        votes = (sims / temperature).exp() if weighting == "exp" else torch.ones_like(sims)
        scores = torch.zeros(sims.shape[0], num_classes, dtype=torch.float64, device=sims.device)
        scores.scatter_add_(1, train_labels[idx], votes.double())
        out.append(scores)
    return torch.cat(out)


def knn_top1(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    test_features: torch.Tensor,
    test_labels: torch.Tensor,
    *,
    k: int,
    temperature: float = 0.07,
    weighting: Weighting = "exp",
) -> float:
    """Top-1 accuracy (fraction) of weighted k-NN."""
    num_classes = int(max(train_labels.max(), test_labels.max())) + 1
    scores = knn_class_scores(
        train_features,
        train_labels,
        test_features,
        k=k,
        temperature=temperature,
        weighting=weighting,
        num_classes=num_classes,
    )
    return (scores.argmax(dim=1) == test_labels.to(scores.device)).double().mean().item()
