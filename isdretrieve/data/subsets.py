"""Subsets of a labelled split: CIFAR-LT style long tails and class-balanced draws (fixed seed)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from isdretrieve.errors import DataError


def longtail_counts(class_counts: Sequence[int], ratio: float) -> list[int]:
    """Images kept per class: ``floor(n_max * ratio ** (-c / (C - 1)))``, at least 1, capped at the count."""
    counts = [int(n) for n in class_counts]
    if len(counts) < 2:
        return counts
    n_max, last = max(counts), len(counts) - 1
    return [min(n, max(1, int(n_max * ratio ** (-c / last) + 1e-9))) for c, n in enumerate(counts)]


def longtail_indices(
    labels: Sequence[int] | np.ndarray | torch.Tensor, num_classes: int, ratio: float
) -> np.ndarray:
    """Sorted indices of a long-tailed subset (see :func:`longtail_counts`), drawn with ``default_rng(0)``."""
    y = np.asarray(labels, dtype=np.int64)
    keep = longtail_counts(np.bincount(y[y >= 0], minlength=num_classes).tolist(), ratio)
    rng = np.random.default_rng(0)
    chosen = []
    for c in range(num_classes):
        members = np.flatnonzero(y == c)
        chosen.append(members if keep[c] >= len(members) else rng.choice(members, keep[c], replace=False))
    return np.sort(np.concatenate(chosen)) if chosen else np.zeros(0, dtype=np.int64)


def balanced_indices(
    labels: Sequence[int] | np.ndarray | torch.Tensor, num_classes: int, total: int
) -> np.ndarray:
    """Sorted indices of ``total`` images, as equal a number per class as possible, ``default_rng(0)``."""
    y = np.asarray(labels, dtype=np.int64)
    per_class = [total // num_classes + (c < total % num_classes) for c in range(num_classes)]
    rng = np.random.default_rng(0)
    chosen = []
    for c, want in enumerate(per_class):
        members = np.flatnonzero(y == c)
        if want > len(members):
            raise DataError(f"balanced={total} needs {want} images of class {c}, the data has {len(members)}")
        chosen.append(rng.choice(members, want, replace=False))
    return np.sort(np.concatenate(chosen))
