"""The ISD linear evaluation on images (frozen backbone, crop + flip each epoch) on real digits."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from click.testing import CliRunner

import isdretrieve.evaluate.linear_eval as linear_eval
from isdretrieve.cli.knn import main as knn_cli
from isdretrieve.errors import BankError
from isdretrieve.evaluate.knn_eval import knn_evaluate
from isdretrieve.evaluate.linear_eval import IMAGE_PROTOCOL, ImageProbeConfig, linear_eval_from_banks
from isdretrieve.files.bank import FeatureBank
from isdretrieve.index.search import SearchIndex
from isdretrieve.pipeline import build_index_from_checkpoint

FAST = ImageProbeConfig(epochs=3, milestones=(2,), lr=0.1, batch_size=128)


@pytest.fixture(scope="module")
def digits_dirs(tmp_path_factory, make_encoder):
    root = tmp_path_factory.mktemp("lin")
    encoder = make_encoder(root / "enc.pt")
    for split in ("train", "test"):
        build_index_from_checkpoint(encoder, f"digits,split={split}", root / split, device="cpu", workers=0)
    return root


def test_image_linear_eval_learns_digits_and_augments_every_epoch(digits_dirs, monkeypatch):
    seen = []
    real = linear_eval.augment_views

    def spy(images, cfg, generator, **kwargs):
        out = real(images, cfg, generator, **kwargs)
        seen.append((images[:4].clone(), cfg, out[:4].clone()))
        return out

    monkeypatch.setattr(linear_eval, "augment_views", spy)
    with (
        FeatureBank.open(digits_dirs / "train" / "bank.h5") as train,
        FeatureBank.open(digits_dirs / "test" / "bank.h5") as test,
    ):
        result = linear_eval_from_banks(digits_dirs / "train", train, test, FAST, device="cpu")
    assert result.protocol == IMAGE_PROTOCOL and result.epochs == 3
    assert result.top1 > 0.5, result  # ten classes: chance is 0.1
    # crop (scale 0.08-1) + flip, no colour, every batch of every epoch
    steps_per_epoch = -(-1347 // FAST.batch_size)
    assert len(seen) == 3 * steps_per_epoch
    cfg = seen[0][1]
    assert (cfg.scale, cfg.flip_p, cfg.jitter_p, cfg.gray_p, cfg.blur_p) == ((0.08, 1.0), 0.5, 0.0, 0.0, 0.0)
    # the same images in two epochs get different views
    by_image: dict[tuple, list[torch.Tensor]] = {}
    for images, _, views in seen:
        for img, view in zip(images, views, strict=True):
            by_image.setdefault(tuple(img.flatten().tolist()), []).append(view)
    repeated = [views for views in by_image.values() if len(views) > 1]
    assert repeated and all(not torch.allclose(v[0], v[1]) for v in repeated)


def test_knn_evaluate_dispatches_the_image_protocol(digits_dirs):
    with (
        SearchIndex.open(digits_dirs / "train") as train,
        FeatureBank.open(digits_dirs / "test" / "bank.h5") as test,
    ):
        report = knn_evaluate(
            train, test, ks=(20,), linear=dataclasses.replace(FAST, epochs=1, milestones=())
        )
        bank = knn_evaluate(train, test, ks=(20,), linear=linear_eval.ProbeConfig(epochs=2))
    assert report.linear.protocol == IMAGE_PROTOCOL and report.linear.top1 > 0.3
    assert bank.linear.protocol == "bank features, no augmentation"


def test_image_linear_eval_needs_the_encoder(digits_dirs, tmp_path):
    with (
        FeatureBank.open(digits_dirs / "train" / "bank.h5") as train,
        pytest.raises(BankError, match="needs"),
    ):
        linear_eval_from_banks(tmp_path, train, train, FAST)


def test_cli_linear_option(digits_dirs):
    args = ["--train", str(digits_dirs / "train"), "--test", str(digits_dirs / "test"), "-k", "20"]
    bad = CliRunner().invoke(knn_cli, [*args, "--linear", "pixels"])
    assert bad.exit_code == 2 and "'pixels' is not one of 'bank', 'images'" in bad.output
    bank = CliRunner().invoke(knn_cli, [*args, "--linear"])  # the flag alone: today's bank probe
    assert bank.exit_code == 0, bank.output
    assert "linear probe (ISD protocol, bank features, no augmentation)" in bank.output
