"""The CIFAR-10-LT experiment's pieces: the two training sets, head/tail accuracy, the cells' recipes."""

from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from isdretrieve.data.open import open_dataset
from isdretrieve.data.specs import parse_spec
from isdretrieve.errors import DataError
from isdretrieve.evaluate.knn import head_tail_accuracy, knn_class_scores, per_class_top1
from isdretrieve.train.recipe import recipe_from_data

DRIVER = Path(__file__).resolve().parents[1] / "training" / "experiments" / "lt_balance.py"


def _driver():
    spec = importlib.util.spec_from_file_location("lt_balance", DRIVER)
    module = importlib.util.module_from_spec(spec)
    sys.modules["lt_balance"] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def test_longtail_and_balanced_twins_on_cifar(cifar_root):
    lt = open_dataset(f"folder:{cifar_root},split=train,longtail=100")
    bal = open_dataset(f"folder:{cifar_root},split=train,balanced={len(lt)}")
    lt_counts = np.bincount(lt.labels.numpy(), minlength=10).tolist()
    bal_counts = np.bincount(bal.labels.numpy(), minlength=10).tolist()
    assert len(lt) == len(bal) == 12_406
    assert lt_counts == [5000, 2997, 1796, 1077, 645, 387, 232, 139, 83, 50]
    assert bal_counts == [1241] * 6 + [1240] * 4
    test = open_dataset(f"folder:{cifar_root},split=test,balanced=100")  # test splits stay whole
    assert len(test) == 10_000


def test_balanced_spec_round_trips_and_refuses_bad_values():
    spec = parse_spec("digits,split=train,balanced=500")
    assert spec.balanced == 500 and str(spec) == "digits,split=train,balanced=500"
    subset = open_dataset(spec)
    assert np.bincount(subset.labels.numpy()).tolist() == [50] * 10
    with pytest.raises(DataError, match="balanced must be a positive integer"):
        parse_spec("digits,balanced=0")
    with pytest.raises(DataError, match="exclude each other"):
        parse_spec("digits,balanced=10,longtail=10")
    with pytest.raises(DataError, match="needs 1348 images of class 0"):
        open_dataset("digits,split=train,balanced=13475")


def test_head_tail_accuracy_from_knn_scores():
    g = torch.Generator().manual_seed(0)
    train = torch.nn.functional.normalize(torch.randn(60, 8, generator=g), dim=1)
    train_labels = torch.arange(60) % 6
    scores = knn_class_scores(train, train_labels, train, k=1, temperature=0.1)  # each row finds itself
    per_class = per_class_top1(scores, train_labels, 6)
    assert per_class == [1.0] * 6
    wrong = scores.clone()
    wrong[train_labels == 5] = 0
    wrong[train_labels == 5, 0] = 1  # class 5 always predicted as class 0
    per_class = per_class_top1(wrong, train_labels, 6)
    split = head_tail_accuracy(per_class, [50, 40, 30, 20, 10, 5], n=3)
    assert (split.head_classes, split.tail_classes) == ((0, 1, 2), (3, 4, 5))
    assert split.head == 1.0 and split.tail == pytest.approx(2 / 3)
    with pytest.raises(ValueError, match="0 < n <= C/2"):
        head_tail_accuracy(per_class, [1] * 6, n=4)


def test_every_cell_has_a_valid_recipe_with_one_budget(tmp_path):
    lt = _driver()
    args = argparse.Namespace(root=tmp_path, batch=256, steps=600, queue=4096, workers=0)
    cells = lt.cells([0, 1], [0])
    assert len(cells) == 12 and {c.data for c in cells} == {"lt", "balanced"}
    untrained = [c for c in cells if c.method == "untrained"]
    assert [c.name for c in untrained] == ["untrained-lt", "untrained-balanced"]
    budgets = set()
    for cell in cells:
        if cell.method == "untrained":
            continue
        recipe = recipe_from_data(lt.recipe_for(cell, args, tmp_path / "pairs.h5"))
        budgets.add((recipe.optim.batch_size, recipe.optim.max_steps, recipe.model.arch))
        method = recipe.method.isd if recipe.method.name == "sepp" else recipe.method
        assert method.shuffles and method.queue_size == 4096
        if cell.method == "moco":
            assert method.head == "official"
        assert ("longtail=100" in recipe.data.train) == (cell.data == "lt")
    assert budgets == {(256, 600, "small_cnn")}


def test_untrained_encoder_is_the_seeded_start_of_a_run(tmp_path):
    """The untrained rows score exactly the network a seed-0 run starts from."""
    lt = _driver()
    path = lt.untrained_encoder(tmp_path / "untrained", 0)
    from isdretrieve.models.checkpoints import load_backbone
    from isdretrieve.train.engine import Trainer

    recipe = recipe_from_data(
        {
            "data": {"train": "digits", "preset": "cifar"},
            "model": {"arch": "small_cnn"},
            "monitor": {"every": 0},
        }
    )
    trainer = Trainer(recipe, tmp_path / "run", quiet=True)
    start = trainer.method.student.backbone.state_dict()
    loaded, header = load_backbone(path)
    assert header.image_size == 32
    assert all(torch.equal(start[k], v) for k, v in loaded.state_dict().items())


def test_summary_means_and_spreads():
    lt = _driver()
    rows = [
        {
            "name": f"isd-lt-s{s}",
            "method": "isd",
            "data": "lt",
            "partners": "mined",
            "top1": t,
            "tail": 0.0,
            "full_memory": {"top1": t + 0.1, "head": 0.5, "tail": 0.2},
        }
        for s, t in ((0, 0.25), (1, 0.35))
    ]
    text = lt.summary(rows)
    assert "| isd (lt) | 2 | 0.3000 ± 0.0500 | 0.0000 ± 0.0000 | 0.4000 ± 0.0500 |" in text
