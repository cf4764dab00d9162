"""The one opener: a data SPEC -> its :class:`~isdretrieve.data.datasets.ImageDataset`."""

from __future__ import annotations

from isdretrieve.data.datasets import ImageDataset
from isdretrieve.data.shards import open_shards
from isdretrieve.data.sources import open_cifar10, open_digits, open_files
from isdretrieve.data.specs import DataSpec, parse_spec
from isdretrieve.data.subsets import balanced_indices, longtail_indices
from isdretrieve.errors import DataError


def open_dataset(spec: str | DataSpec, *, split: str | None = None) -> ImageDataset:
    """Open the dataset a SPEC names; ``split`` (if given) overrides the SPEC's split."""
    spec = parse_spec(spec)
    if split is not None:
        spec = spec.with_split(split)
    if spec.kind == "digits":
        dataset: ImageDataset = open_digits(spec)
    elif spec.kind == "cifar10":
        dataset = open_cifar10(spec)
    elif spec.kind == "wds":
        dataset = open_shards(spec)
    else:
        dataset = open_files(spec)
    if spec.longtail is not None and dataset.spec.split != "test":
        if not dataset.classes:
            raise DataError(f"longtail needs labels, but '{dataset.spec}' is unlabeled")
        dataset = dataset.subset(longtail_indices(dataset.labels, len(dataset.classes), spec.longtail))
    if spec.balanced is not None and dataset.spec.split != "test":
        if not dataset.classes:
            raise DataError(f"balanced needs labels, but '{dataset.spec}' is unlabeled")
        dataset = dataset.subset(balanced_indices(dataset.labels, len(dataset.classes), spec.balanced))
    return dataset
