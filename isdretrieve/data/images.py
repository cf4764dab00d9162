"""Decoding pictures into uint8 tensors: RGB, the shorter side resized, a centre crop."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from isdretrieve.errors import DataError

NATIVE_MAX_SIDE = 96  # a square first image up to this side sets a folder's default size; else 256
LARGE_SIDE = 256


def decode_image(path: Path, size: int) -> torch.Tensor:
    """Decode an image file to uint8 [3,size,size]: RGB, shorter side resized to ``size``, centre crop."""
    try:
        with Image.open(path) as img:
            img.draft("RGB", (size, size))  # JPEG: decode at a reduced scale that stays >= size
            return pil_to_tensor(img, size)
    except Exception as exc:  # PIL raises many types for corrupt files
        raise DataError(f"cannot decode image '{path}': {exc}") from None


def to_rgb(img: Image.Image) -> Image.Image:
    """A PIL image (any mode; palette transparency honoured) converted to RGB."""
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    return img.convert("RGB")


def pil_to_tensor(img: Image.Image, size: int) -> torch.Tensor:
    """A PIL image (any mode) as uint8 [3,size,size]: RGB, shorter side resized to ``size``, centre crop."""
    rgb = to_rgb(img)
    w, h = rgb.size
    if (w, h) != (size, size):
        side = min(w, h)
        left, top = (w - side) / 2, (h - side) / 2
        box = (left, top, left + side, top + side)
        rgb = rgb.resize((size, size), Image.Resampling.BILINEAR, box=box)
    array = np.array(rgb, dtype=np.uint8)
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()


def default_side(width: int, height: int) -> int:
    """The decoding side a first image of ``width`` x ``height`` implies: its side if square and small
    (e.g. 32 for CIFAR), else 256."""
    return width if width == height and width <= NATIVE_MAX_SIDE else LARGE_SIDE
