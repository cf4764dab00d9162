"""Pictures of bank rows and queries, and their thumbnails.

A bank row's picture is read from the bank's data SPEC (in-memory data sets such as ``digits`` and
``cifar10:`` too), checked against the path the bank records for the row; never from a path a request
names. The data set is opened on first use (so a Retriever that only searches vectors imports no torch).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from isdretrieve.errors import IsdError
from isdretrieve.retrieve.queries import NeighbourQuery

if TYPE_CHECKING:
    import torch

    from isdretrieve.data.datasets import ImageDataset

THUMB = 128  # side of a thumbnail (HTML report, service)
EMPTY = (236, 236, 236)  # the grey of a missing picture


class ImageSource:
    """Pictures of bank rows and queries: rows from the bank's data SPEC (checked against the row's path),
    else from the row's path as a file; queries from their file or PIL image. None when unreadable."""

    def __init__(self, data_spec: str) -> None:
        self.data_spec = data_spec
        self.problem = ""
        self._dataset: ImageDataset | None = None
        self._opened = False

    def _data(self) -> ImageDataset | None:
        if not self._opened:
            self._opened = True
            if self.data_spec:
                from isdretrieve.data.open import open_dataset

                try:
                    self._dataset = open_dataset(self.data_spec)
                except IsdError as exc:
                    self.problem = str(exc)
        return self._dataset

    def row(self, index: int, path: str) -> Image.Image | None:
        """Dataset item ``index`` if the data set still names it ``path``, else the file ``path``."""
        if self.names(index, path):
            return self.dataset_row(index, path)
        return open_image(Path(path)) if path else None

    def names(self, index: int, path: str) -> bool:
        """Whether the bank's data set still holds item ``index`` under the name ``path``."""
        data = self._data()
        return data is not None and 0 <= index < len(data) and data.path(index) == path

    def dataset_row(self, index: int, path: str) -> Image.Image | None:
        """Dataset item ``index`` read from the data set only (never from a path the bank names), or None
        when the data set cannot be opened, no longer names it ``path``, or cannot decode it."""
        if not self.names(index, path):
            return None
        try:
            return tensor_to_pil(self._data()[index][0])
        except IsdError:
            return None

    def query(self, query: NeighbourQuery) -> Image.Image | None:
        if query.image is not None:
            return query.image.convert("RGB")
        if query.row is not None and query.index is not None:
            return self.row(query.index, query.path)
        return open_image(Path(query.path))


def tensor_to_pil(image: torch.Tensor) -> Image.Image:
    """A uint8 [3,H,W] tensor as an RGB PIL image."""
    return Image.fromarray(np.ascontiguousarray(image.permute(1, 2, 0).numpy()), "RGB")


def open_image(path: Path) -> Image.Image | None:
    """An image file as RGB (at most 512 px a side), or None if it is missing or unreadable."""
    try:
        if not path.is_file():
            return None
        with Image.open(path) as img:
            img.draft("RGB", (512, 512))
            rgb = img.convert("RGB")
        rgb.thumbnail((512, 512))
        return rgb
    except Exception:  # PIL raises many types for corrupt files
        return None


def fit(image: Image.Image | None, side: int) -> Image.Image:
    """``image`` scaled to fit a ``side`` square (small ones enlarged without blur), centred on grey;
    a grey square with a question mark when ``image`` is None."""
    tile = Image.new("RGB", (side, side), EMPTY)
    if image is None:
        draw, font = ImageDraw.Draw(tile), load_font(side // 4)
        left, top, right, bottom = draw.textbbox((0, 0), "?", font=font)
        draw.text(
            ((side - right - left) // 2, (side - bottom - top) // 2), "?", fill=(120, 120, 120), font=font
        )
        return tile
    scale = side / max(image.size)
    size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    small = scale >= 2  # CIFAR-sized images: keep their pixels sharp
    scaled = image.resize(size, Image.Resampling.NEAREST if small else Image.Resampling.LANCZOS)
    tile.paste(scaled, ((side - size[0]) // 2, (side - size[1]) // 2))
    return tile


def load_font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size)
    except (TypeError, OSError, ImportError):  # Pillow without FreeType: the fixed bitmap font
        return ImageFont.load_default()
