"""Data: SPEC strings, datasets of fixed-size uint8 images (webdataset shards too), crops taken in loader
workers, and batched on-device view augmentation."""

from isdretrieve.data.augment import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    PRESETS,
    VIEW_NAMES,
    ViewConfig,
    augment_views,
    eval_side,
    eval_transform,
    eval_view,
    normalize,
    size_groups,
    view_config,
)
from isdretrieve.data.datasets import (
    ArrayDataset,
    FileDataset,
    ImageDataset,
    SubsetDataset,
    decode_image,
    items_sha256,
    longtail_counts,
    longtail_indices,
    open_dataset,
    pil_to_tensor,
)
from isdretrieve.data.shards import ShardDataset, write_shards
from isdretrieve.data.specs import DataSpec, parse_spec

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "PRESETS",
    "VIEW_NAMES",
    "ArrayDataset",
    "DataSpec",
    "FileDataset",
    "ImageDataset",
    "ShardDataset",
    "SubsetDataset",
    "ViewConfig",
    "augment_views",
    "decode_image",
    "pil_to_tensor",
    "eval_side",
    "eval_transform",
    "eval_view",
    "items_sha256",
    "longtail_counts",
    "longtail_indices",
    "normalize",
    "open_dataset",
    "parse_spec",
    "size_groups",
    "view_config",
    "write_shards",
]
