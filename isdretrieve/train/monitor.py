"""Online k-NN monitor: weighted k-NN of the student backbone on a held-out split during training."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from isdretrieve.data import ImageDataset, eval_view
from isdretrieve.knn import knn_top1

_CACHE_LIMIT_BYTES = 1 << 30


@dataclass(frozen=True)
class KnnResult:
    top1: float
    k: int
    temperature: float
    train_size: int
    test_size: int


@torch.no_grad()
def embed(
    backbone: nn.Module,
    images: torch.Tensor,
    preset: str,
    *,
    batch_size: int = 512,
    autocast_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """L2-normalised float32 backbone features of uint8 images, in eval mode (restored afterwards)."""
    was_training = backbone.training
    backbone.eval()
    device = next(backbone.parameters()).device
    feats = []
    for start in range(0, images.shape[0], batch_size):
        x = eval_view(images[start : start + batch_size].to(device), preset)
        with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            feats.append(torch.nn.functional.normalize(backbone(x).float(), dim=1))
    backbone.train(was_training)
    return torch.cat(feats)


class KnnMonitor:
    """Holds the memory and query images (on the device when small) and scores a backbone on them."""

    def __init__(
        self,
        train: ImageDataset,
        test: ImageDataset,
        *,
        preset: str,
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
        self.preset, self.k, self.temperature = preset, k, temperature

    def evaluate(self, backbone: nn.Module, autocast_dtype: torch.dtype | None = None) -> KnnResult:
        train = embed(backbone, self.train_images, self.preset, autocast_dtype=autocast_dtype)
        test = embed(backbone, self.test_images, self.preset, autocast_dtype=autocast_dtype)
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
