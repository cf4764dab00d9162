"""The whole path on the CIFAR-10 copy: train an encoder, export train/test banks, an exact index,
then ``isd-knn``'s weighted k-NN must equal an independent NumPy computation of the same protocol."""

from __future__ import annotations

import json

import h5py
import numpy as np
import pytest
from click.testing import CliRunner

from isdretrieve.cli.index import main as index_cli
from isdretrieve.cli.knn import main as knn_cli
from isdretrieve.train import Trainer, recipe_from_data

pytestmark = [pytest.mark.cifar, pytest.mark.slow]


def numpy_weighted_knn(train, train_y, test, test_y, k, T, chunk=500):
    """Cosine top-k (float64), votes Σ exp(s/T) per class, argmax (lowest class on ties)."""
    correct = 0
    for start in range(0, len(test), chunk):
        sims = test[start : start + chunk] @ train.T
        top = np.argpartition(-sims, k - 1, axis=1)[:, :k]
        s = np.take_along_axis(sims, top, axis=1)
        scores = np.zeros((len(s), int(train_y.max()) + 1))
        np.add.at(scores, (np.arange(len(s))[:, None], train_y[top]), np.exp(s / T))
        correct += int((scores.argmax(axis=1) == test_y[start : start + chunk]).sum())
    return correct / len(test)


def _read(path):
    with h5py.File(path, "r") as f:
        return f["features"][:].astype(np.float64), f["labels"][:]


def test_cifar_encoder_banks_index_and_knn_match_numpy(cifar_root, tmp_path):
    recipe = recipe_from_data(
        {
            "method": {"name": "isd", "queue_size": 1024},
            "data": {"train": f"folder:{cifar_root},split=test", "preset": "cifar", "workers": 2},
            "model": {"arch": "small_cnn"},
            "optim": {"batch_size": 128, "epochs": 1, "max_steps": 8, "lr": 0.05},
            "monitor": {"every": 0},
        }
    )
    run = Trainer(recipe, tmp_path / "run", quiet=True).fit()
    runner = CliRunner()
    for split in ("train", "test"):
        args = ["build", "--checkpoint", str(run.checkpoint), "--data", f"folder:{cifar_root},split={split}"]
        result = runner.invoke(
            index_cli, [*args, "--out", str(tmp_path / split), "--index", "Flat", "--quiet"]
        )
        assert result.exit_code == 0, result.output
    args = ["--train", str(tmp_path / "train"), "--test", str(tmp_path / "test"), "--preset", "instdisc"]
    result = runner.invoke(knn_cli, [*args, "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert (report["train_size"], report["test_size"]) == (50000, 10000)
    (knn,) = report["results"]
    assert (knn["k"], knn["temperature"], knn["weighting"]) == (200, 0.1, "exp")

    train, train_y = _read(tmp_path / "train" / "bank.h5")
    test, test_y = _read(tmp_path / "test" / "bank.h5")
    assert knn["top1"] == numpy_weighted_knn(train, train_y, test, test_y, k=200, T=0.1)
    assert knn["top1"] > 0.2  # well above chance (0.1) even after 8 steps
