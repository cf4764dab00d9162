"""Backbones, heads and checkpoint I/O."""

from isdretrieve.models.backbones import ARCHS, SmallCNN, build_backbone, feature_dim, is_timm, is_vit
from isdretrieve.models.checkpoints import (
    CHECKPOINT_FORMAT,
    ENCODER_FORMAT,
    IMAGENET_MEAN,
    IMAGENET_STD,
    EncoderHeader,
    atomic_save,
    export_encoder,
    extract_backbone_state,
    file_sha256,
    load_backbone,
    load_init,
    safe_load,
)
from isdretrieve.models.heads import dino_head, isd_base_predictor, moco_v2_head, projection_mlp

__all__ = [
    "ARCHS",
    "CHECKPOINT_FORMAT",
    "ENCODER_FORMAT",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "EncoderHeader",
    "SmallCNN",
    "atomic_save",
    "build_backbone",
    "dino_head",
    "export_encoder",
    "extract_backbone_state",
    "feature_dim",
    "file_sha256",
    "isd_base_predictor",
    "is_timm",
    "is_vit",
    "load_backbone",
    "load_init",
    "moco_v2_head",
    "projection_mlp",
    "safe_load",
]
