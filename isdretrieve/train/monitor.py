"""Online k-NN monitor: weighted k-NN of the student backbone on a held-out split during training.

The backbone is scored as it would be exported: through :class:`~isdretrieve.frozen_encoder.FrozenEncoder`
with the run's encoder header (eval transform, normalisation, precision)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from isdretrieve.data.datasets import ImageDataset
from isdretrieve.encoder import FrozenEncoder
from isdretrieve.evaluate.knn import knn_top1

_CACHE_LIMIT_BYTES = 1 << 30


@dataclass(frozen=True)
class KnnResult:
    top1: float
    k: int
    temperature: float
    train_size: int
    test_size: int


class KnnMonitor:
    """Holds the memory and query images (on the device when small) and scores a backbone on them."""

    def __init__(
        self,
        train: ImageDataset,
        test: ImageDataset,
        *,
        k: int,
        temperature: float,
        device: torch.device,
        max_train: int | None = None,
        max_test: int | None = None,
        seed: int = 0,
    ) -> None:
        train_images, self.train_labels = _sample(train, max_train, seed)
        test_images, self.test_labels = _sample(test, max_test, seed + 1)
        small = train_images.numel() + test_images.numel() <= _CACHE_LIMIT_BYTES
        place = device if small else torch.device("cpu")
        self.train_images, self.test_images = train_images.to(place), test_images.to(place)
        self.train_labels, self.test_labels = self.train_labels.to(device), self.test_labels.to(device)
        self.k, self.temperature = k, temperature

    def evaluate(self, encoder: FrozenEncoder) -> KnnResult:
        """Weighted k-NN top-1 of ``encoder`` (features kept on its device)."""
        train = encoder.embed(self.train_images, on_device=True)
        test = encoder.embed(self.test_images, on_device=True)
        top1 = knn_top1(
            train, self.train_labels, test, self.test_labels, k=self.k, temperature=self.temperature
        )
        return KnnResult(top1, self.k, self.temperature, len(train), len(test))


def _sample(dataset: ImageDataset, limit: int | None, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """All images and labels, or a fixed random subset of ``limit`` of them (decoding only those)."""
    if limit is None or limit >= len(dataset):
        return dataset.load_all(), dataset.labels
    keep = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed))[:limit].sort()[0]
    return torch.stack([dataset[int(i)][0] for i in keep]), dataset.labels[keep]
