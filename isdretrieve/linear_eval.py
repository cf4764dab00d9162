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

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from isdretrieve.bank import FeatureBank, _input_affine, encoder_fingerprint, preset_for
from isdretrieve.data import ImageDataset, augment_views, eval_view, open_dataset, view_config
from isdretrieve.errors import BankError
from isdretrieve.linear_probe import ProbeConfig, ProbeResult, fit_linear, standardiser, topk_accuracy
from isdretrieve.models import EncoderHeader, load_backbone

IMAGE_PROTOCOL = "images: random-resized crop (0.08-1) + flip per epoch, frozen backbone, eval-view test"


@dataclass(frozen=True)
class ImageProbeConfig(ProbeConfig):
    """:class:`ProbeConfig` (the ISD schedule) plus the training augmentation."""

    crop_scale: tuple[float, float] = (0.08, 1.0)
    flip_p: float = 0.5
    embed_batch: int = 512


class FrozenFeatures:
    """L2-normalised features of a frozen backbone for uint8 images: eval view or an augmented view."""

    def __init__(self, backbone: nn.Module, header: EncoderHeader, device: torch.device) -> None:
        self.backbone = backbone.to(device).eval().requires_grad_(False)
        self.preset, self.device = preset_for(header), device
        self.affine = _input_affine(header)

    @torch.no_grad()
    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """Features of normalised float images [B,3,S,S] (ImageNet mean/std, as ``eval_view`` gives)."""
        if self.affine is not None:
            x = x * self.affine[0].to(x.device) + self.affine[1].to(x.device)
        return F.normalize(self.backbone(x.to(self.device)).float(), dim=1)

    def eval_features(self, images: torch.Tensor, batch: int) -> torch.Tensor:
        views = (eval_view(images[i : i + batch], self.preset) for i in range(0, len(images), batch))
        return torch.cat([self(x) for x in views])


def linear_eval_images(
    backbone: nn.Module,
    header: EncoderHeader,
    train: ImageDataset,
    test: ImageDataset,
    cfg: ImageProbeConfig = ImageProbeConfig(),
    *,
    device: str | torch.device = "auto",
) -> ProbeResult:
    """Train the linear layer on augmented train images of a frozen backbone; test on eval views."""
    if (train.labels < 0).any() or (test.labels < 0).any():
        raise BankError("linear evaluation needs labelled train and test images")
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    features = FrozenFeatures(backbone, header, torch.device(device))
    train_images, test_images = train.load_all(), test.load_all()
    train_labels, test_labels = train.labels.long(), test.labels.long()
    standardise = standardiser(features.eval_features(train_images, cfg.embed_batch).cpu())  # val transform
    view = dataclasses.replace(view_config("weak", features.preset), scale=cfg.crop_scale, flip_p=cfg.flip_p)
    generator = torch.Generator().manual_seed(cfg.seed)

    def batch_features(idx: torch.Tensor) -> torch.Tensor:
        return standardise(features(augment_views(train_images[idx], view, generator)).cpu())

    num_classes = int(max(train_labels.max(), test_labels.max())) + 1
    head = fit_linear(batch_features, train_labels, header.feature_dim, num_classes, cfg, generator)
    with torch.no_grad():
        train_eval = features.eval_features(train_images, cfg.embed_batch).cpu()
        train_top1 = topk_accuracy(head(standardise(train_eval)), train_labels)[0]
        test_eval = features.eval_features(test_images, cfg.embed_batch).cpu()
        top1, top5 = topk_accuracy(head(standardise(test_eval)), test_labels)
    return ProbeResult(top1, top5, train_top1, cfg.epochs, IMAGE_PROTOCOL)


def _encoder_of(index_dir: Path, bank: FeatureBank) -> tuple[nn.Module, EncoderHeader]:
    path = index_dir / "encoder.pt"
    if not path.exists():
        raise BankError(
            f"--linear images needs the encoder of {index_dir} (encoder.pt, written by "
            "`isd-index build --checkpoint`); this index holds none"
        )
    backbone, header = load_backbone(path)
    if bank.fingerprint and encoder_fingerprint(backbone, header) != bank.fingerprint:
        raise BankError(f"{path} is not the encoder of {bank.path} (fingerprints differ)")
    return backbone, header


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
    backbone, header = _encoder_of(Path(train_dir), train_bank)
    specs = []
    for role, bank in (("train", train_bank), ("test", test_bank)):
        if not bank.data_spec:
            raise BankError(f"{role} bank {bank.path} records no data SPEC: cannot reread its images")
        specs.append(bank.data_spec)
    return linear_eval_images(backbone, header, open_data(specs[0]), open_data(specs[1]), cfg, device=device)
