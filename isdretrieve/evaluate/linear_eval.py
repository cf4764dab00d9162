"""Linear evaluation on images, the ISD paper's protocol (official ``eval_linear.py``).

The backbone is frozen (eval mode, no gradient). Every epoch each training image is seen as a new
random-resized crop (scale 0.08–1, the torchvision default) with a horizontal flip (p = 0.5); its
backbone feature is L2-normalised and standardised with fixed per-dimension statistics of the
L2-normalised train features under the eval transform (the official "full-batch BN"), then a linear
layer is trained with SGD (lr 0.01, momentum 0.9, wd 1e-4, batch 256, 40 epochs, ×0.1 at epochs 15
and 30). Test accuracy is measured on the eval transform (resize + centre crop, or the plain image at
CIFAR/digits size). :mod:`isdretrieve.linear_probe` is the cheaper probe on fixed bank features.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from isdretrieve.data.augment import ViewConfig, augment_views
from isdretrieve.data.datasets import ImageDataset
from isdretrieve.data.open import open_dataset
from isdretrieve.encoder import FrozenEncoder
from isdretrieve.errors import BankError
from isdretrieve.evaluate.linear_probe import (
    ProbeConfig,
    ProbeResult,
    fit_linear,
    standardiser,
    topk_accuracy,
)
from isdretrieve.files.bank import FeatureBank

IMAGE_PROTOCOL = "images: random-resized crop (0.08-1) + flip per epoch, frozen backbone, eval-view test"


@dataclass(frozen=True)
class ImageProbeConfig(ProbeConfig):
    """:class:`ProbeConfig` (the ISD schedule) plus the training augmentation."""

    crop_scale: tuple[float, float] = (0.08, 1.0)
    flip_p: float = 0.5
    embed_batch: int = 512


def linear_eval_images(
    encoder: FrozenEncoder,
    train: ImageDataset,
    test: ImageDataset,
    cfg: ImageProbeConfig = ImageProbeConfig(),
) -> ProbeResult:
    """Train the linear layer on augmented train images of a frozen encoder; test on eval views (embedded
    ``encoder.batch_size`` images at a time)."""
    if (train.labels < 0).any() or (test.labels < 0).any():
        raise BankError("linear evaluation needs labelled train and test images")
    train_images, test_images = train.load_all(), test.load_all()
    train_labels, test_labels = train.labels.long(), test.labels.long()
    standardise = standardiser(encoder.embed(train_images))  # statistics of the eval view
    header = encoder.header
    view = ViewConfig(
        header.image_size,
        scale=cfg.crop_scale,
        flip_p=cfg.flip_p,
        jitter_p=0.0,
        gray_p=0.0,
        blur_p=0.0,
        mean=header.mean,
        std=header.std,
    )  # crop + flip, normalised as the encoder's eval view
    generator = torch.Generator().manual_seed(cfg.seed)

    def batch_features(idx: torch.Tensor) -> torch.Tensor:
        return standardise(encoder.embed_views(augment_views(train_images[idx], view, generator)).cpu())

    num_classes = int(max(train_labels.max(), test_labels.max())) + 1
    head = fit_linear(batch_features, train_labels, encoder.dim, num_classes, cfg, generator)
    with torch.no_grad():
        train_top1 = topk_accuracy(head(standardise(encoder.embed(train_images))), train_labels)[0]
        top1, top5 = topk_accuracy(head(standardise(encoder.embed(test_images))), test_labels)
    return ProbeResult(top1, top5, train_top1, cfg.epochs, IMAGE_PROTOCOL)


def _encoder_of(
    index_dir: Path, bank: FeatureBank, device: str | torch.device, batch_size: int
) -> FrozenEncoder:
    path = index_dir / "encoder.pt"
    if not path.exists():
        raise BankError(
            f"--linear images needs the encoder of {index_dir} (encoder.pt, written by "
            "`isd-index build --checkpoint`); this index holds none"
        )
    encoder = FrozenEncoder.load(path, device=device, batch_size=batch_size)
    if bank.fingerprint and encoder.fingerprint != bank.fingerprint:
        raise BankError(f"{path} is not the encoder of {bank.path} (fingerprints differ)")
    return encoder


def linear_eval_from_banks(
    train_dir: str | Path,
    train_bank: FeatureBank,
    test_bank: FeatureBank,
    cfg: ImageProbeConfig = ImageProbeConfig(),
    *,
    device: str | torch.device = "auto",
    open_data: Callable[[str], ImageDataset] = open_dataset,
) -> ProbeResult:
    """:func:`linear_eval_images` with the encoder and data SPECs recorded in the index directories."""
    encoder = _encoder_of(Path(train_dir), train_bank, device, cfg.embed_batch)
    specs = []
    for role, bank in (("train", train_bank), ("test", test_bank)):
        if not bank.data_spec:
            raise BankError(f"{role} bank {bank.path} records no data SPEC: cannot reread its images")
        specs.append(bank.data_spec)
    return linear_eval_images(encoder, open_data(specs[0]), open_data(specs[1]), cfg)
