"""Evaluate banks: k-NN classification through an index (``isd-knn``) and the linear probe (on bank
features, or the ISD protocol on the images)."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from isdretrieve.errors import BankError
from isdretrieve.evaluate.knn import KnnResult, classify
from isdretrieve.evaluate.protocols import Weighting
from isdretrieve.files.bank import FeatureBank
from isdretrieve.index.backend import VectorIndex
from isdretrieve.index.recall import drop_self_matches

if TYPE_CHECKING:  # the probe needs torch; k-NN alone runs on FAISS and NumPy
    from isdretrieve.evaluate.linear_eval import ImageProbeConfig
    from isdretrieve.evaluate.linear_probe import ProbeConfig, ProbeResult


@dataclass
class KnnReport:
    """Every number of one ``isd-knn`` run with its protocol."""

    train: str
    test: str
    train_size: int
    test_size: int
    search: str  # the train index's factory string ("Flat" = exact)
    backend: str  # where it was searched: faiss or milvus
    exclude_self: bool
    features: str
    search_seconds: float
    total_seconds: float
    results: list[KnnResult] = field(default_factory=list)
    linear: ProbeResult | None = None


def open_test_bank(path: str | Path) -> FeatureBank:
    """A bank file, or the bank of an index directory."""
    path = Path(path)
    return FeatureBank.open(path / "bank.h5" if path.is_dir() else path)


def _labels(bank: FeatureBank, role: str) -> np.ndarray:
    labels = bank.labels()
    if (labels < 0).any():
        raise BankError(f"{role} bank {bank.path} has unlabelled rows: k-NN needs labels")
    return labels


def _same_bank(a: FeatureBank, b: FeatureBank) -> bool:
    try:
        if a.path.resolve().samefile(b.path.resolve()):
            return True
    except OSError:
        pass
    return a.fingerprint == b.fingerprint and a.data_spec == b.data_spec and len(a) == len(b)


def knn_evaluate(
    train: VectorIndex,
    test: FeatureBank,
    *,
    ks: tuple[int, ...] = (20,),
    temperature: float = 0.07,
    weighting: Weighting = "exp",
    linear: ProbeConfig | ImageProbeConfig | None = None,
    device: str = "auto",
) -> KnnReport:
    """k-NN accuracy of ``test`` rows against ``train``'s index for every k in ``ks`` (one search).

    ``linear``: a :class:`ProbeConfig` adds the linear probe on the banks' features; an
    :class:`ImageProbeConfig` the ISD linear evaluation on the images (``train``'s ``encoder.pt`` and
    the banks' data SPECs), run on ``device`` (auto: CUDA when present)."""
    started = time.perf_counter()
    if not ks or min(ks) < 1:
        raise BankError(f"k must be positive, got {list(ks)}")
    if test.fingerprint != train.bank.fingerprint:
        raise BankError(
            f"test bank {test.path} and train bank {train.bank.path} come from different encoders "
            f"(fingerprints {test.fingerprint} != {train.bank.fingerprint})"
        )
    train_labels, test_labels = _labels(train.bank, "train"), _labels(test, "test")
    exclude_self = _same_bank(train.bank, test)
    k_max = max(ks) + int(exclude_self)
    if k_max > len(train):
        raise BankError(f"k={max(ks)} is larger than the train bank ({len(train):,} rows)")
    queries = test.features()
    t0 = time.perf_counter()
    sims, rows = train.search(queries, k_max)
    search_seconds = time.perf_counter() - t0
    if exclude_self:
        sims, rows = drop_self_matches(sims, rows, np.arange(len(test)))
    results = classify(
        sims,
        rows,
        train_labels,
        test_labels,
        ks=ks,
        temperature=temperature,
        weighting=weighting,
        class_names=train.bank.classes,
    )
    probe = (
        None if linear is None else _probe(linear, train, test, train_labels, queries, test_labels, device)
    )
    return KnnReport(
        train=str(train.directory),
        test=str(test.path),
        train_size=len(train),
        test_size=len(test),
        search=train.manifest.factory,
        backend=train.backend,
        exclude_self=exclude_self,
        features="L2-normalised backbone features",
        search_seconds=round(search_seconds, 4),
        total_seconds=round(time.perf_counter() - started, 4),
        results=results,
        linear=probe,
    )


def _probe(
    linear: ProbeConfig | ImageProbeConfig,
    train: VectorIndex,
    test: FeatureBank,
    train_labels: np.ndarray,
    queries: np.ndarray,
    test_labels: np.ndarray,
    device: str,
) -> ProbeResult:
    """The linear evaluation ``linear`` asks for: on the banks' features, or on the images."""
    import torch  # the probes need torch; k-NN alone runs on FAISS and NumPy

    from isdretrieve.evaluate.linear_eval import ImageProbeConfig, linear_eval_from_banks
    from isdretrieve.evaluate.linear_probe import linear_probe

    if isinstance(linear, ImageProbeConfig):
        return linear_eval_from_banks(train.directory, train.bank, test, linear, device=device)
    return linear_probe(
        torch.from_numpy(train.bank.features()),
        torch.from_numpy(train_labels),
        torch.from_numpy(queries),
        torch.from_numpy(test_labels),
        linear,
    )
