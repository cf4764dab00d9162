"""k-NN voting and the linear probe against independent NumPy computations on real digits features."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from isdretrieve.data.augment import eval_view
from isdretrieve.data.open import open_dataset
from isdretrieve.evaluate.knn import classify, knn_top1
from isdretrieve.evaluate.linear_probe import linear_probe
from isdretrieve.index.recall import drop_self_matches
from isdretrieve.models.backbones import build_backbone


@pytest.fixture(scope="module")
def digits_features():
    torch.manual_seed(0)
    net = build_backbone("small_cnn").eval()
    out = {}
    for split in ("train", "test"):
        ds = open_dataset("digits", split=split)
        with torch.no_grad():
            f = torch.nn.functional.normalize(net(eval_view(ds.load_all(), "digits")), dim=1)
        out[split] = (f.numpy().astype(np.float64), ds.labels.numpy())
    return out


def numpy_knn(train, train_y, test, test_y, k, T, weighting):
    """The protocol written out plainly: brute-force cosine top-k, then per-query votes."""
    correct = 0
    for q, y in zip(test, test_y, strict=True):
        sims = train @ q
        nn = np.argsort(-sims, kind="stable")[:k]
        scores = {}
        for i in nn:
            w = np.exp(sims[i] / T) if weighting == "exp" else 1.0
            scores[train_y[i]] = scores.get(train_y[i], 0.0) + w
        if weighting == "exp":
            pred = max(scores, key=lambda c: (scores[c], -c))
        else:  # majority, then larger summed similarity, then lower class id
            summed = {c: sims[nn][train_y[nn] == c].sum() for c in scores}
            pred = max(scores, key=lambda c: (scores[c], summed[c], -c))
        correct += pred == y
    return correct / len(test_y)


def _search(train, test, k):
    sims = test @ train.T
    rows = np.argsort(-sims, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(sims, rows, axis=1), rows


@pytest.mark.parametrize(("ks", "T", "weighting"), [((20, 200), 0.07, "exp"), ((1, 20), 0.07, "uniform")])
def test_classify_matches_numpy_reference(digits_features, ks, T, weighting):
    (train, train_y), (test, test_y) = digits_features["train"], digits_features["test"]
    sims, rows = _search(train, test, max(ks))
    results = classify(sims, rows, train_y, test_y, ks=ks, temperature=T, weighting=weighting)
    for result, k in zip(results, ks, strict=True):
        assert result.k == k and result.queries == len(test_y)
        assert result.top1 == numpy_knn(train, train_y, test, test_y, k, T, weighting)
        assert result.top1 <= result.top5 <= 1.0
        assert set(result.per_class) == {str(c) for c in range(10)}


def test_torch_monitor_path_agrees(digits_features):
    (train, train_y), (test, test_y) = digits_features["train"], digits_features["test"]
    got = knn_top1(*(torch.from_numpy(a) for a in (train, train_y, test, test_y)), k=20, temperature=0.07)
    assert got == numpy_knn(train, train_y, test, test_y, 20, 0.07, "exp")


def test_uniform_ties_break_by_similarity_then_class():
    sims = np.array([[0.9, 0.8, 0.7, 0.6]])
    labels = np.array([3, 1, 1, 3])
    rows = np.array([[0, 1, 2, 3]])
    # two votes each; class 3 sums 1.5, class 1 sums 1.5 too -> lower class id wins
    r = classify(sims, rows, labels, np.array([1]), ks=(4,), temperature=0.1, weighting="uniform")
    assert r[0].top1 == 1.0
    sims = np.array([[0.9, 0.8, 0.7, 0.65]])  # class 3 sums 1.55 > 1.5
    r = classify(sims, rows, labels, np.array([3]), ks=(4,), temperature=0.1, weighting="uniform")
    assert r[0].top1 == 1.0


def test_drop_self_matches():
    sims = np.array([[1.0, 0.5, 0.4], [0.9, 0.8, 0.7]])
    rows = np.array([[7, 2, 3], [4, 5, 6]])
    s, r = drop_self_matches(sims, rows, np.array([7, 1]))
    assert r.tolist() == [[2, 3], [4, 5]] and s.tolist() == [[0.5, 0.4], [0.9, 0.8]]


def test_linear_probe_learns_digits(digits_features):
    (train, train_y), (test, test_y) = digits_features["train"], digits_features["test"]
    result = linear_probe(*(torch.from_numpy(a) for a in (train, train_y, test, test_y)))
    assert result.top1 > 0.85 and result.top5 >= result.top1 and result.train_top1 > 0.9


def test_top5_counts_only_classes_that_got_votes():
    sims, rows = np.array([[0.9], [0.8]]), np.array([[0], [1]])
    labels = np.array([7, 7])
    (r,) = classify(sims, rows, labels, np.array([7, 0]), ks=(1,), temperature=0.1, weighting="exp")
    assert r.top1 == 0.5 and r.top5 == 0.5  # class 0 got no vote: not a top-5 hit by tie order
