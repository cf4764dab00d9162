"""encoder.safetensors + encoder.json: written by training and ``isd-index convert``, read by every
checkpoint loader, never unpickled; a bank made from it is byte-identical to one made from encoder.pt."""

from __future__ import annotations

import json
import os
import pickle
from datetime import UTC, datetime
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from isdretrieve.bank.export import export_bank
from isdretrieve.cli.index import main as index_cli
from isdretrieve.errors import CheckpointError
from isdretrieve.models.backbones import build_backbone
from isdretrieve.models.checkpoints import convert_checkpoint, load_backbone
from isdretrieve.train.engine import Trainer
from isdretrieve.train.recipe import recipe_from_data


def invoke(*args):
    return CliRunner().invoke(index_cli, [str(a) for a in args])


def _same_state(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.mark.slow
def test_training_writes_the_pair_beside_encoder_pt(tmp_path):
    recipe = {
        "method": {"name": "isd", "queue_size": 256},
        "data": {"train": "digits", "preset": "digits"},
        "model": {"arch": "small_cnn"},
        "optim": {"batch_size": 64, "epochs": 1, "max_steps": 3, "lr": 0.05},
        "monitor": {"every": 0},
    }
    Trainer(recipe_from_data(recipe), tmp_path, quiet=True).fit()
    config = json.loads((tmp_path / "encoder.json").read_text())
    assert config["format"] == "isdretrieve.encoder-config/1" and config["weights"] == "encoder.safetensors"
    pt, pt_header = load_backbone(tmp_path / "encoder.pt")
    for path in (tmp_path / "encoder.safetensors", tmp_path / "encoder.json"):
        model, header = load_backbone(path)
        assert _same_state(model, pt) and header == pt_header


class _Frozen(datetime):
    @classmethod
    def now(cls, tz=None):
        return datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)


def test_converted_encoder_gives_a_byte_identical_bank(tmp_path, make_encoder, monkeypatch):
    encoder = make_encoder(tmp_path / "run" / "encoder.pt")
    result = invoke("convert", encoder, "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["weights"] == str(tmp_path / "run" / "encoder.safetensors")
    monkeypatch.setattr("isdretrieve.files.bank.datetime", _Frozen)  # the bank's "created" attribute
    data = "digits,split=test"
    pt = export_bank(encoder, data, tmp_path / "pt.h5", workers=0).path
    st = export_bank(tmp_path / "run" / "encoder.safetensors", data, tmp_path / "st.h5", workers=0).path
    assert pt.read_bytes() == st.read_bytes()
    built = invoke(
        "build", "--checkpoint", tmp_path / "run" / "encoder.json", "--data", data, "--out", tmp_path / "idx",
        "--index", "Flat", "--workers", 0, "--quiet",
    )  # fmt: skip
    assert built.exit_code == 0, built.output


class _RemovesCanary:
    def __init__(self, canary: Path) -> None:
        self.canary = canary

    def __reduce__(self):
        return (os.remove, (str(self.canary),))


def test_a_pickle_named_safetensors_runs_nothing(tmp_path):
    canary = tmp_path / "canary"
    canary.write_text("still here")
    evil = tmp_path / "encoder.safetensors"
    with open(evil, "wb") as f:
        pickle.dump({"state_dict": {}, "payload": _RemovesCanary(canary)}, f)
    with pytest.raises(CheckpointError, match=r"cannot read .*encoder\.safetensors: not a safetensors file"):
        load_backbone(evil)
    result = invoke("convert", evil, "--out", tmp_path / "out")
    assert result.exit_code == 2 and "not a safetensors file" in result.output
    assert canary.exists()  # never unpickled
    with open(evil, "rb") as f:  # the control: unpickling this file does run its payload
        pickle.load(f)
    assert not canary.exists()


def test_config_problems_are_one_line(tmp_path, make_encoder):
    weights = convert_checkpoint(make_encoder(tmp_path / "encoder.pt"), tmp_path / "pair")
    config = weights.with_suffix(".json")
    good = json.loads(config.read_text())
    cases = {
        "weights outside": ({**good, "weights": "../encoder.pt"}, "must name a .safetensors file beside it"),
        "other weights": ({**good, "weights_sha256": "0" * 64}, "describes other weights than"),
        "not ours": ({"architecture": "resnet50"}, "is not an encoder config"),
    }
    for content, message in cases.values():
        config.write_text(json.dumps(content))
        with pytest.raises(CheckpointError, match=message):
            load_backbone(config)
        if content.get("format"):  # our config beside the weights is read and checked too
            with pytest.raises(CheckpointError, match=message):
                load_backbone(weights)
    assert load_backbone(weights)[1].arch == "small_cnn"  # another tool's JSON beside them is left alone
    config.unlink()  # the weights alone: the header is in their metadata
    model, header = load_backbone(weights)
    assert header.arch == "small_cnn" and header.image_size == 16


def test_another_tools_safetensors_is_a_plain_state_dict(tmp_path):
    import safetensors.torch

    torch.manual_seed(0)
    net = build_backbone("resnet18", cifar_stem=True)
    safetensors.torch.save_file(net.state_dict(), str(tmp_path / "model.safetensors"))
    model, header = load_backbone(tmp_path / "model.safetensors")
    assert (header.arch, header.cifar_stem, header.source) == ("resnet18", True, "model.safetensors:student")
    assert _same_state(model, net)


def test_convert_keeps_the_same_encoder_and_refuses_another(tmp_path, make_encoder):
    first = make_encoder(tmp_path / "a.pt", seed=0)
    weights = convert_checkpoint(first, tmp_path / "out")
    assert convert_checkpoint(first, tmp_path / "out") == weights
    result = invoke("convert", make_encoder(tmp_path / "b.pt", seed=1), "--out", tmp_path / "out")
    assert result.exit_code == 2 and "holds another encoder" in result.output
    assert _same_state(load_backbone(weights)[0], load_backbone(first)[0])
