"""``FrozenEncoder``: the one object that turns images into features.

It owns a backbone, its header (architecture, input size, normalisation), the encoder fingerprint, the
eval preprocessing, the device and the precision. Bank export, ``Retriever`` (and through it the search
service), the image linear evaluation and the training monitor all embed through it, so an encoder is
never used with another transform, normalisation or precision than its own.

    encoder = FrozenEncoder.load("runs/demo/run/encoder.pt")
    batch = encoder.prepare(["query.png"])   # uint8 [1, 3, S', S'] at the encoder's decode side
    features = encoder.embed(batch)          # float32 [1, D] on the CPU, rows of unit length

Eval preprocessing: encoders of up to 32 px (digits, CIFAR) see the image resized to their side; larger
ones the shorter side resized to side / 0.875 (256 for 224) and a centre crop; then the header's own
mean and std (:func:`isdretrieve.data.eval_transform`). Precision ``auto`` is bf16 autocast (and
channels_last inputs) on CUDA, fp32 on the CPU; features are always float32.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from isdretrieve.data.augment import eval_side, eval_transform
from isdretrieve.data.images import decode_image, pil_to_tensor
from isdretrieve.errors import DataError, InvalidArgument
from isdretrieve.files.encoder_header import EncoderHeader
from isdretrieve.models.checkpoints import load_backbone

ImageLike = str | Path | Image.Image
Queries = ImageLike | Sequence[ImageLike] | torch.Tensor | np.ndarray
Precision = Literal["auto", "fp32", "bf16"]
PRECISIONS = ("auto", "fp32", "bf16")
_PRESET_NAMES = {16: "digits", 32: "cifar", 224: "imagenet"}


def encoder_fingerprint(backbone: nn.Module, header: EncoderHeader) -> str:
    """First 16 hex digits of a SHA-256 over the weights and the input contract of an encoder.

    Hashed: every state-dict entry in sorted key order (name, dtype, shape, raw bytes) except the BN
    ``num_batches_tracked`` counters, which do not change eval features; then the header's arch,
    cifar_stem, image_size, mean and std. Identical weights give identical fingerprints.
    """
    digest = hashlib.sha256()
    state = backbone.state_dict()
    for name in sorted(state):
        if name.endswith("num_batches_tracked"):
            continue
        tensor = state[name].detach().cpu().contiguous()
        digest.update(f"{name}\0{tensor.dtype}\0{tuple(tensor.shape)}\0".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy())
    contract = {
        "arch": header.arch,
        "cifar_stem": header.cifar_stem,
        "image_size": header.image_size,
        "mean": [float(x) for x in header.mean],
        "std": [float(x) for x in header.std],
    }
    digest.update(json.dumps(contract, sort_keys=True).encode())
    return digest.hexdigest()[:16]


def transform_name(header: EncoderHeader) -> str:
    """The bank's ``transform`` attribute: ``eval:digits`` / ``eval:cifar`` / ``eval:imagenet`` for the
    presets' sizes (16, 32, 224), ``eval:resize{R}-crop{S}`` for any other."""
    size = int(header.image_size)
    name = _PRESET_NAMES.get(size)
    return f"eval:{name}" if name else f"eval:resize{eval_side(size)}-crop{size}"


def resolve_device(device: str | torch.device) -> torch.device:
    """``auto``: this process's GPU (LOCAL_RANK under torchrun) when CUDA is present, else the CPU."""
    if str(device) == "auto":
        if not torch.cuda.is_available():
            return torch.device("cpu")
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device(device)


def images_to_batch(images: Queries, side: int) -> torch.Tensor:
    """Paths, PIL images or an image batch ([B,3,H,W] or [3,H,W], uint8 or [0,1] float) as uint8; files
    and PIL images are decoded at ``side`` (shorter side resized, centre crop)."""
    if isinstance(images, np.ndarray):
        images = torch.from_numpy(images)
    if isinstance(images, torch.Tensor):
        x = images if images.ndim == 4 else images.unsqueeze(0)
        if x.ndim != 4 or x.shape[1] != 3:
            raise DataError(f"expected images [B,3,H,W] or [3,H,W], got shape {tuple(images.shape)}")
        return x if x.dtype == torch.uint8 else (x.float().clamp(0, 1) * 255).round().to(torch.uint8)
    items = [images] if isinstance(images, (str, Path, Image.Image)) else list(images)
    tensors = []
    for item in items:
        if isinstance(item, Image.Image):
            tensors.append(pil_to_tensor(item, side))
        elif Path(item).is_file():
            tensors.append(decode_image(Path(item), side))
        else:
            raise DataError(f"query image not found: {item}")
    return torch.stack(tensors)


class FrozenEncoder:
    """A backbone used for features only: ``embed(uint8 images) -> L2-normalised float32 [B, D]``.

    Built from a file with :meth:`load` (the module is moved to ``device``, put in eval mode and frozen)
    or around a live network (the training monitor): then :meth:`embed` switches it to eval mode for the
    forward and restores its mode afterwards, and neither its device nor its gradients are touched.
    """

    def __init__(
        self,
        backbone: nn.Module,
        header: EncoderHeader,
        *,
        device: str | torch.device | None = None,
        precision: Precision = "auto",
        batch_size: int = 256,
    ) -> None:
        if precision not in PRECISIONS:
            raise InvalidArgument(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
        if batch_size < 1:
            raise InvalidArgument(f"batch_size must be positive, got {batch_size}")
        if device is None:
            device = next(backbone.parameters()).device
        self.backbone, self.header, self.batch_size = backbone, header, batch_size
        self.device = resolve_device(device)
        use_bf16 = precision == "bf16" or (precision == "auto" and self.device.type == "cuda")
        self.autocast_dtype: torch.dtype | None = torch.bfloat16 if use_bf16 else None

    @classmethod
    def load(
        cls,
        path: str | Path,
        *,
        which: str = "student",
        device: str | torch.device = "auto",
        precision: Precision = "auto",
        batch_size: int = 256,
    ) -> FrozenEncoder:
        """The ``which`` backbone of any checkpoint :func:`~isdretrieve.models.load_backbone` reads."""
        backbone, header = load_backbone(path, which=which)
        device = resolve_device(device)
        backbone = backbone.to(device).eval().requires_grad_(False)
        if device.type == "cuda":
            backbone = backbone.to(memory_format=torch.channels_last)
        return cls(backbone, header, device=device, precision=precision, batch_size=batch_size)

    @functools.cached_property
    def fingerprint(self) -> str:
        """:func:`encoder_fingerprint` of the weights and header (computed once, on first use)."""
        return encoder_fingerprint(self.backbone, self.header)

    @property
    def dim(self) -> int:
        return int(getattr(self.backbone, "feature_dim", self.header.feature_dim))

    @property
    def image_size(self) -> int:
        return int(self.header.image_size)

    @property
    def decode_side(self) -> int:
        """The side images are best decoded at for this encoder (256 for a 224-px one)."""
        return eval_side(self.image_size)

    @property
    def transform_name(self) -> str:
        return transform_name(self.header)

    def prepare(self, images: Queries) -> torch.Tensor:
        """Paths, PIL images or an image batch as the uint8 batch :meth:`embed` takes (files decoded at
        :attr:`decode_side`); decoding apart from embedding lets several callers share one forward."""
        return images_to_batch(images, self.decode_side)

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """The eval view of uint8 (or [0,1] float) images, on this encoder's device."""
        x = images.to(self.device, non_blocking=True)
        return eval_transform(x, self.image_size, self.header.mean, self.header.std)

    @torch.no_grad()
    def embed(self, images: torch.Tensor, *, on_device: bool = False) -> torch.Tensor:
        """L2-normalised float32 features [B, D] of uint8 images [B,3,H,W] (any size: the eval view is
        taken here), ``batch_size`` images per forward; on the CPU unless ``on_device``."""
        if images.ndim != 4 or images.shape[1] != 3:
            raise DataError(f"expected images [B,3,H,W], got shape {tuple(images.shape)}")
        chunks = [
            self.embed_views(self.preprocess(images[a : a + self.batch_size]))
            for a in range(0, images.shape[0], self.batch_size)
        ]
        features = torch.cat(chunks) if chunks else torch.zeros((0, self.dim), device=self.device)
        return features if on_device else features.cpu()

    @torch.no_grad()
    def embed_views(self, views: torch.Tensor) -> torch.Tensor:
        """Features (on the device) of views already preprocessed: normalised float [B,3,S,S] with this
        header's mean/std, e.g. the augmented views of the image linear evaluation."""
        was_training = self.backbone.training
        self.backbone.eval()
        try:
            x = views.to(self.device, non_blocking=True)
            if self.device.type == "cuda":
                x = x.contiguous(memory_format=torch.channels_last)
            dtype = self.autocast_dtype
            with torch.autocast(self.device.type, dtype=dtype, enabled=dtype is not None):
                y = self.backbone(x)
            return F.normalize(y.float(), dim=1)
        finally:
            self.backbone.train(was_training)
