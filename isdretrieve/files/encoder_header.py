"""An encoder's header: what a consumer needs to use its weights (architecture, input size, normalisation,
provenance). Plain data without torch, so that banks and indices can carry and read it cheaply."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from isdretrieve.errors import CheckpointError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class EncoderHeader:
    """What a consumer needs to use an encoder: architecture, input size and normalisation, provenance."""

    arch: str
    cifar_stem: bool
    feature_dim: int
    image_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    source: str = ""  # where the weights came from: "<file name>:<student|teacher>"
    source_sha256: str = ""  # sha256 of the source file ("" if unknown)
    patch_size: int = 0  # ViTs' (and timm patch models') patch side; 0 for convolutional backbones

    def to_dict(self) -> dict[str, Any]:
        """Plain-type dict (mean/std as lists), safe to pickle with weights_only and to write as JSON."""
        d = dataclasses.asdict(self)
        d["mean"], d["std"] = list(self.mean), list(self.std)
        return d

    @classmethod
    def from_dict(cls, d: Any) -> EncoderHeader:
        """Inverse of ``to_dict``; ignores unknown keys, raises CheckpointError for missing/ill-typed ones."""
        if not isinstance(d, dict):
            raise CheckpointError(f"invalid encoder header: expected a dict, got {type(d).__name__}")
        required = [f.name for f in dataclasses.fields(cls) if f.default is dataclasses.MISSING]
        missing = [name for name in required if name not in d]
        if missing:
            raise CheckpointError(f"invalid encoder header: missing {', '.join(missing)}")
        try:
            mean = tuple(float(x) for x in d["mean"])
            std = tuple(float(x) for x in d["std"])
            if len(mean) != 3 or len(std) != 3:
                raise ValueError("mean and std need 3 values each")
            if not isinstance(d["cifar_stem"], bool) or not isinstance(d["arch"], str):
                raise ValueError("arch must be a string and cifar_stem a boolean")
            return cls(
                arch=d["arch"],
                cifar_stem=d["cifar_stem"],
                feature_dim=int(d["feature_dim"]),
                image_size=int(d["image_size"]),
                mean=mean,  # type: ignore[arg-type]
                std=std,  # type: ignore[arg-type]
                source=str(d.get("source", "")),
                source_sha256=str(d.get("source_sha256", "")),
                patch_size=int(d.get("patch_size", 0)),
            )
        except (TypeError, ValueError) as exc:
            raise CheckpointError(f"invalid encoder header: {exc}") from exc
