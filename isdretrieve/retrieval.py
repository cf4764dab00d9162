"""``Retriever``: search an index directory with images or feature vectors, from Python or a notebook.

    r = Retriever.open("indices/cifar10-train")
    hits = r.search(["query.jpg"], k=5)        # or PIL images, a uint8/float image batch, or features
    hits[0][0].path, hits[0][0].score, hits[0][0].label

Images are embedded with the index's own encoder (``encoder.pt`` in the index directory, checked against
the bank's fingerprint) and its eval transform.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from isdretrieve.bank import encoder_fingerprint, preset_for
from isdretrieve.data import decode_image, eval_view, pil_to_tensor
from isdretrieve.errors import BankError, DataError
from isdretrieve.index import SearchIndex
from isdretrieve.models import EncoderHeader, load_backbone

ImageLike = str | Path | Image.Image
Queries = ImageLike | Sequence[ImageLike] | torch.Tensor | np.ndarray


@dataclass(frozen=True)
class Hit:
    """One search result: the bank row, its dataset index, cosine similarity, label (−1 unknown), path."""

    row: int
    index: int
    score: float
    label: int
    path: str


class Retriever:
    def __init__(self, index: SearchIndex, index_dir: Path, device: str = "auto") -> None:
        self.index, self.index_dir = index, index_dir
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.device = torch.device(device)
        bank = index.bank
        self._labels, self._indices, self._paths = bank.labels(), bank.indices(), bank.paths()
        self._encoder: torch.nn.Module | None = None
        self._header: EncoderHeader | None = None

    @classmethod
    def open(cls, index_dir: str | Path, *, device: str = "auto") -> Retriever:
        """Open ``indices/NAME`` (index.faiss, manifest.json, bank.h5, encoder.pt)."""
        return cls(SearchIndex.open(index_dir), Path(index_dir), device)

    @property
    def dim(self) -> int:
        return self.index.bank.dim

    def _load_encoder(self) -> tuple[torch.nn.Module, EncoderHeader]:
        if self._encoder is None:
            path = self.index_dir / "encoder.pt"
            if not path.is_file():
                raise BankError(f"{self.index_dir} has no encoder.pt: search it with feature vectors instead")
            encoder, header = load_backbone(path)
            found, expected = encoder_fingerprint(encoder, header), self.index.bank.fingerprint
            if found != expected:
                raise BankError(f"{path} does not match the bank (fingerprint {found} != {expected})")
            self._encoder, self._header = encoder.to(self.device).eval(), header
        return self._encoder, self._header

    @torch.no_grad()
    def encode(self, images: Queries, batch_size: int = 256) -> torch.Tensor:
        """L2-normalised float32 features [Q, D] (on CPU) of images: paths, PIL images or an image batch."""
        encoder, header = self._load_encoder()
        preset = preset_for(header)
        batch = self._as_uint8_batch(images, 256 if preset == "imagenet" else header.image_size)
        feats = []
        for start in range(0, len(batch), batch_size):
            x = eval_view(batch[start : start + batch_size].to(self.device), preset)
            feats.append(F.normalize(encoder(x).float(), dim=1).cpu())
        return torch.cat(feats)

    def search(self, queries: Queries, k: int = 10) -> list[list[Hit]]:
        """The k nearest bank rows of each query (images, or feature vectors [Q, D] / [D])."""
        features = self._as_features(queries)
        scores, rows = self.index.search(features, k)
        return [
            [
                Hit(int(r), int(self._indices[r]), float(s), int(self._labels[r]), self._paths[r])
                for s, r in zip(score_row, row_row, strict=True)
                if r >= 0
            ]
            for score_row, row_row in zip(scores, rows, strict=True)
        ]

    def _as_features(self, queries: Queries) -> np.ndarray:
        if (
            isinstance(queries, (np.ndarray, torch.Tensor))
            and queries.ndim in (1, 2)
            and queries.shape[-1] == self.dim
        ):
            x = torch.as_tensor(queries, dtype=torch.float32).reshape(-1, self.dim)
            return F.normalize(x, dim=1).numpy()
        return self.encode(queries).numpy()

    @staticmethod
    def _as_uint8_batch(images: Queries, size: int) -> torch.Tensor:
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
                tensors.append(pil_to_tensor(item, size))
            elif Path(item).is_file():
                tensors.append(decode_image(Path(item), size))
            else:
                raise DataError(f"query image not found: {item}")
        return torch.stack(tensors)
