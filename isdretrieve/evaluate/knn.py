"""k-NN classification on L2-normalised features (InstDisc/DINO voting) and the ISD linear probe.

Voting over the k nearest neighbours (cosine similarity s_i, label y_i):
- ``exp``: score_c = Σ exp(s_i / T) · 1[y_i = c]  (DINO k=20 T=0.07; InstDisc/lightly k=200 T=0.1);
- ``uniform``: score_c = Σ 1[y_i = c], ties broken by the larger summed similarity, then the lower
  class id — deterministic, unlike the official ISD evaluator's random tie-break.
Neighbours are searched once for the largest k; every k reads its prefix.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from isdretrieve.errors import InvalidArgument
from isdretrieve.evaluate.protocols import PRESETS, Weighting

if TYPE_CHECKING:
    import torch  # imported where a function needs it: classify (isd-knn's path) runs on NumPy alone

__all__ = [
    "PRESETS",
    "KnnResult",
    "Weighting",
    "classify",
    "knn_class_scores",
    "knn_top1",
    "vote",
]


@dataclass(frozen=True)
class KnnResult:
    k: int
    temperature: float
    weighting: Weighting
    top1: float
    top5: float
    queries: int
    per_class: dict[str, float] = field(default_factory=dict)  # class name (or id) -> top-1


def vote_weights(sims, temperature: float, weighting: Weighting, exp):
    """Each neighbour's vote from its similarity (float64 [Q, k] NumPy array or tensor; ``exp`` is
    ``np.exp`` or ``torch.exp``): the one place the two weightings are written down."""
    if weighting == "exp":
        return exp(sims / temperature)
    if weighting == "uniform":  # count first; the summed similarity (|Σ| ≤ k) only breaks ties
        return (2 * sims.shape[1] + 1) + sims
    raise InvalidArgument(f"unknown weighting '{weighting}' (expected exp or uniform)")


def vote(
    sims: torch.Tensor,
    neighbour_labels: torch.Tensor,
    num_classes: int,
    temperature: float,
    weighting: Weighting,
) -> torch.Tensor:
    """Class scores [Q, C] (float64) from the similarities and labels of each query's neighbours [Q, k]."""
    import torch

    weights = vote_weights(sims.double(), temperature, weighting, torch.exp)
    scores = torch.zeros(sims.shape[0], num_classes, dtype=torch.float64, device=sims.device)
    return scores.scatter_add_(1, neighbour_labels.long(), weights)


def vote_numpy(
    sims: np.ndarray, neighbour_labels: np.ndarray, num_classes: int, temperature: float, weighting: Weighting
) -> np.ndarray:
    """:func:`vote` on NumPy arrays (``isd-knn``'s path, which needs no torch)."""
    weights = vote_weights(sims.astype(np.float64), temperature, weighting, np.exp)
    q = sims.shape[0]
    flat = (np.arange(q)[:, None] * num_classes + neighbour_labels.astype(np.int64)).ravel()
    return np.bincount(flat, weights.ravel(), minlength=q * num_classes).reshape(q, num_classes)


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
    """Class scores [Q, C] by brute-force torch search (GEMM + top-k in chunks, on the inputs' device)."""
    import torch

    if k <= 0:
        raise InvalidArgument(f"k must be positive, got {k}")
    k = min(k, train_features.shape[0])
    num_classes = int(train_labels.max()) + 1 if num_classes is None else num_classes
    train_features = train_features.to(test_features.dtype)
    out = []
    with torch.no_grad():
        for start in range(0, test_features.shape[0], chunk_size):
            sims, idx = (test_features[start : start + chunk_size] @ train_features.T).topk(k, dim=1)
            out.append(vote(sims, train_labels[idx], num_classes, temperature, weighting))
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
    """Top-1 accuracy (fraction) of k-NN by brute-force torch search (the training monitor's path)."""
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


def classify(
    sims: np.ndarray,
    rows: np.ndarray,
    train_labels: np.ndarray,
    test_labels: np.ndarray,
    *,
    ks: tuple[int, ...],
    temperature: float,
    weighting: Weighting,
    class_names: list[str] | None = None,
) -> list[KnnResult]:
    """Accuracy for each k from one neighbour search: ``sims``/``rows`` [Q, ≥max(ks)] sorted by similarity."""
    num_classes = int(max(train_labels.max(), test_labels.max())) + 1
    neighbour_labels, truth = train_labels[rows], np.asarray(test_labels)
    results = []
    for k in ks:
        scores = vote_numpy(sims[:, :k], neighbour_labels[:, :k], num_classes, temperature, weighting)
        # best class first; equal scores: the lower class id (a stable sort of the negated scores)
        ranked = np.argsort(-scores, axis=1, kind="stable")[:, : min(5, num_classes)]
        top_scores = np.take_along_axis(scores, ranked, axis=1)
        hit1 = ranked[:, 0] == truth
        hit5 = ((ranked == truth[:, None]) & (top_scores > 0)).any(axis=1)  # no votes: no guess
        per_class = {}
        for c in np.unique(test_labels):
            name = class_names[c] if class_names and c < len(class_names) else str(int(c))
            per_class[name] = float(hit1[truth == int(c)].mean())
        results.append(
            KnnResult(
                k,
                temperature,
                weighting,
                float(hit1.mean()),
                float(hit5.mean()),
                len(truth),
                per_class,
            )
        )
    return results


def per_class_top1(scores: torch.Tensor, labels: torch.Tensor, num_classes: int) -> list[float | None]:
    """Top-1 accuracy of each class c (None where the queries hold no c) from class scores [Q, C]."""
    hit = scores.argmax(dim=1).cpu() == labels.cpu()
    out: list[float | None] = []
    for c in range(num_classes):
        rows = labels.cpu() == c
        out.append(hit[rows].double().mean().item() if rows.any() else None)
    return out


@dataclass(frozen=True)
class HeadTail:
    """Mean per-class accuracy over the ``n`` classes with the most (head) and fewest (tail) training
    images; ties in the counts go to the lower class id."""

    head: float
    tail: float
    head_classes: tuple[int, ...]
    tail_classes: tuple[int, ...]


def head_tail_accuracy(per_class: list[float | None], train_counts: list[int], n: int = 3) -> HeadTail:
    """Head/tail split of per-class accuracies by the training set's class counts."""
    if len(per_class) != len(train_counts) or not 0 < n <= len(per_class) // 2:
        raise ValueError(f"need one count per class and 0 < n <= C/2, got n={n} for {len(per_class)}")
    by_size = sorted(range(len(train_counts)), key=lambda c: (-train_counts[c], c))
    head, tail = tuple(by_size[:n]), tuple(sorted(by_size[-n:]))

    def mean(classes: tuple[int, ...]) -> float:
        values = [per_class[c] for c in classes]
        if any(v is None for v in values):
            raise ValueError(f"classes {classes} need test queries for a head/tail accuracy")
        return sum(values) / n  # type: ignore[arg-type]

    return HeadTail(mean(head), mean(tail), head, tail)
