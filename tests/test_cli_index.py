"""``isd-index`` / ``isd-knn`` and ``Retriever`` end to end on digits, through real files."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from isdretrieve.cli.index import main as index_cli
from isdretrieve.cli.knn import main as knn_cli
from isdretrieve.data.open import open_dataset
from isdretrieve.files.encoder_header import EncoderHeader
from isdretrieve.models.backbones import build_backbone
from isdretrieve.models.checkpoints import export_encoder
from isdretrieve.retrieve.retriever import Retriever


@pytest.fixture(scope="module")
def digits_indices(tmp_path_factory):
    """An encoder (random-init small CNN) and exact indices over the digits train and test splits."""
    root = tmp_path_factory.mktemp("idx")
    torch.manual_seed(0)
    header = EncoderHeader("small_cnn", False, 256, 16, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    export_encoder(build_backbone("small_cnn"), header, root / "enc.pt")
    for split in ("train", "test"):
        args = ["build", "--checkpoint", str(root / "enc.pt"), "--data", f"digits,split={split}"]
        result = CliRunner().invoke(index_cli, [*args, "--out", str(root / split), "--quiet"])
        assert result.exit_code == 0, result.output
        assert "Flat over" in result.output
    return root


def test_info_and_recall(digits_indices):
    runner = CliRunner()
    info = runner.invoke(index_cli, ["info", str(digits_indices / "train"), "--json"])
    assert info.exit_code == 0, info.output
    manifest = json.loads(info.output)
    assert manifest["factory"] == "Flat" and manifest["count"] == 1347 and manifest["recall"] == 1.0
    recall = runner.invoke(
        index_cli, ["recall", str(digits_indices / "train"), "-k", "5", "--queries", "100"]
    )
    assert recall.exit_code == 0 and "recall@5 = 1.0000" in recall.output


def test_knn_cli_presets_and_self_exclusion(digits_indices):
    args = [
        "--train",
        str(digits_indices / "train"),
        "--test",
        str(digits_indices / "test"),
        "-k",
        "1",
        "-k",
        "20",
    ]
    result = CliRunner().invoke(knn_cli, [*args, "--json", "--linear"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)  # --json: stdout holds the report and nothing else
    assert [r["k"] for r in report["results"]] == [1, 20] and not report["exclude_self"]
    assert report["results"][1]["top1"] > 0.9 and report["linear"]["top1"] > 0.8
    # the train bank against itself: each row's own entry is excluded, so k=1 is not trivially 1.0
    train = str(digits_indices / "train")
    same = CliRunner().invoke(knn_cli, ["--train", train, "--test", train, "--preset", "isd", "--json"])
    assert same.exit_code == 0, same.output
    report = json.loads(same.stdout)
    assert report["exclude_self"] and 0.8 < report["results"][0]["top1"] < 1.0


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["-k", "0"], "0 is not in the range x>=1"),
        (["-k", "5000"], "larger than the train bank"),
    ],
)
def test_knn_bad_k(digits_indices, args, message):
    base = ["--train", str(digits_indices / "train"), "--test", str(digits_indices / "test")]
    result = CliRunner().invoke(knn_cli, [*base, *args])
    assert result.exit_code == 2 and message in result.output and "Traceback" not in result.output


def test_retriever_images_and_features_agree(digits_indices, tmp_path):
    r = Retriever.open(digits_indices / "test")
    ds = open_dataset("digits", split="test")
    images = ds.load_all()[:3]
    by_tensor = r.search(images, k=3)
    assert [hits[0].index for hits in by_tensor] == [0, 1, 2]  # each test image finds itself first
    assert all(abs(hits[0].score - 1.0) < 1e-4 for hits in by_tensor)
    assert by_tensor[0][0].label == int(ds.labels[0]) and by_tensor[0][0].path == ds.path(0)
    features = r.encode(images)
    assert [h.row for h in r.search(features, k=3)[1]] == [h.row for h in by_tensor[1]]
    Image.fromarray(images[0].permute(1, 2, 0).numpy()).save(tmp_path / "q.png")
    by_path = r.search([tmp_path / "q.png"], k=1)[0][0]
    by_pil = r.search(Image.open(tmp_path / "q.png"), k=1)[0][0]
    assert by_path.index == by_pil.index == 0
    assert np.isclose(by_path.score, by_pil.score)


def test_index_refuses_a_bank_from_another_encoder(digits_indices, tmp_path):
    import shutil

    from isdretrieve.bank.arrays import write_bank
    from isdretrieve.files.bank import FeatureBank

    target = tmp_path / "idx"
    shutil.copytree(digits_indices / "test", target)
    with FeatureBank.open(target / "bank.h5") as bank:
        feats, labels = bank.features(), bank.labels()
    (target / "bank.h5").unlink()
    write_bank(target / "bank.h5", feats, labels=labels, fingerprint="0123456789abcdef")
    result = CliRunner().invoke(index_cli, ["info", str(target)])
    assert result.exit_code == 2 and "another encoder" in result.output


def test_sharded_export_then_join_equals_one_export(digits_indices, tmp_path, monkeypatch):
    from isdretrieve.files.bank import FeatureBank

    runner, enc = CliRunner(), str(digits_indices / "enc.pt")
    args = ["export", "--checkpoint", enc, "--data", "digits,split=test", "--quiet"]
    for rank in (0, 1):  # what two torchrun processes do
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("WORLD_SIZE", "2")
        result = runner.invoke(index_cli, [*args, "--out", str(tmp_path / "bank.h5")])
        assert result.exit_code == 0, result.output
    monkeypatch.delenv("RANK")
    monkeypatch.delenv("WORLD_SIZE")
    shards = sorted(str(p) for p in tmp_path.glob("bank.shard*.h5"))
    assert len(shards) == 2
    joined = runner.invoke(index_cli, ["join", *shards, "--out", str(tmp_path / "joined.h5")])
    assert joined.exit_code == 0 and "450 rows from 2 shards" in joined.output
    with (
        FeatureBank.open(tmp_path / "joined.h5") as a,
        FeatureBank.open(digits_indices / "test" / "bank.h5") as b,
    ):
        assert np.array_equal(a.features(), b.features()) and a.paths() == b.paths()


def test_knn_from_checkpoint_builds_banks_on_the_fly(digits_indices, tmp_path):
    args = [
        "--checkpoint",
        str(digits_indices / "enc.pt"),
        "--data",
        "digits",
        "--json",
    ]
    result = CliRunner().invoke(knn_cli, [*args, "--work-dir", str(tmp_path / "work")])
    assert result.exit_code == 0, result.output
    on_the_fly = json.loads(result.stdout)["results"][0]
    prebuilt = ["--train", str(digits_indices / "train"), "--test", str(digits_indices / "test")]
    again = CliRunner().invoke(knn_cli, [*prebuilt, "--json"])
    assert on_the_fly == json.loads(again.stdout)["results"][0]
    both = CliRunner().invoke(knn_cli, [*args, *prebuilt])
    assert both.exit_code == 2 and "give --train and --test, or --checkpoint with --data" in both.output
