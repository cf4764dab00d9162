"""The engine end to end on digits: resume equality, NaN stop, checkpoints, the encoder export."""

from __future__ import annotations

import pytest
import torch
from conftest import train_until_checkpoint

from isdretrieve.errors import RecipeError, TrainingDiverged
from isdretrieve.models.checkpoints import load_backbone, safe_load
from isdretrieve.train.checkpointing import list_checkpoints
from isdretrieve.train.engine import Trainer
from isdretrieve.train.recipe import recipe_from_data


def tiny(method: str = "isd", **sections) -> dict:
    data = {
        "method": {"name": method, "queue_size": 256}
        if method != "byol"
        else {"name": method, "proj_hidden": 64},
        "data": {"train": "digits", "preset": "digits"},
        "model": {"arch": "small_cnn"},
        "optim": {"batch_size": 64, "epochs": 3, "lr": 0.05, "warmup_epochs": 1},
        "engine": {"seed": 3, "log_every": 5},
        "monitor": {"every": 0},
    }
    for key, value in sections.items():
        data[key] = {**data.get(key, {}), **value}
    return data


def _states_equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("method", ["isd", "moco", "byol"])
def test_interrupted_and_resumed_run_ends_with_identical_weights(tmp_path, monkeypatch, method):
    straight = Trainer(recipe_from_data(tiny(method)), tmp_path / "a", quiet=True)
    straight.fit()

    train_until_checkpoint(recipe_from_data(tiny(method)), tmp_path / "b", monkeypatch)
    assert [p.name for p in list_checkpoints(tmp_path / "b")] == ["epoch-0001.pt"]

    resumed = Trainer(recipe_from_data(tiny(method)), tmp_path / "b", resume=True, quiet=True)
    assert (resumed.epoch, resumed.step) == (1, 21)
    resumed.fit()
    assert resumed.step == straight.step == 63
    assert _states_equal(straight.method.state_dict(), resumed.method.state_dict())
    a, b = straight.optimizer.state_dict()["state"], resumed.optimizer.state_dict()["state"]
    assert all(torch.equal(a[i]["momentum_buffer"], b[i]["momentum_buffer"]) for i in a)


def test_existing_run_needs_resume(tmp_path):
    Trainer(recipe_from_data(tiny(optim={"epochs": 1})), tmp_path, quiet=True).fit()
    with pytest.raises(RecipeError, match="--resume"):
        Trainer(recipe_from_data(tiny(optim={"epochs": 1})), tmp_path, quiet=True)


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path, monkeypatch):
    import isdretrieve.train.methods.isd as isd_module

    calls = {"n": 0}
    real = isd_module.distillation_kl

    def poisoned(*args):
        calls["n"] += 1
        loss = real(*args)
        return loss * float("nan") if calls["n"] > 30 else loss  # epoch 1 is steps 1-21

    monkeypatch.setattr(isd_module, "distillation_kl", poisoned)
    trainer = Trainer(recipe_from_data(tiny()), tmp_path, quiet=True)
    with pytest.raises(TrainingDiverged, match="NaN/inf in epoch 2.*epoch-0001.pt"):
        trainer.fit()
    assert [p.name for p in list_checkpoints(tmp_path)] == ["epoch-0001.pt"]
    state = safe_load(tmp_path / "checkpoints" / "epoch-0001.pt")
    assert state["epoch"] == 1
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())


def test_run_writes_metrics_checkpoints_and_a_loadable_encoder(tmp_path):
    recipe = tiny(optim={"epochs": 2}, monitor={"every": 1, "k": 5}, engine={"keep_checkpoints": 1})
    result = Trainer(recipe_from_data(recipe), tmp_path, quiet=True).fit()
    assert [p.name for p in list_checkpoints(tmp_path)] == ["epoch-0002.pt"]
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert any('"grad_norm"' in line for line in lines) and any('"knn_top1"' in line for line in lines)
    assert result.knn is not None and result.knn_init is not None and result.knn.test_size == 450
    backbone, header = load_backbone(result.encoder)
    assert header.arch == "small_cnn" and header.image_size == 16
    state = safe_load(result.checkpoint)["model"]  # the exported encoder is the run's student backbone
    student = {
        k.removeprefix("student.backbone."): v for k, v in state.items() if k.startswith("student.backbone.")
    }
    assert _states_equal(student, backbone.state_dict())


def test_compiled_run_captures_graphs_and_trains_like_eager(tmp_path):
    """``engine.compile`` (the GPU recipes' setting), here with inductor on CPU: the student and teacher
    are really traced (no silent fallback to eager), and 3 steps end where eager ends up to float noise."""
    from torch._dynamo.utils import counters

    def run(compile_: bool, out) -> dict:
        recipe = tiny(optim={"epochs": 1, "max_steps": 3}, engine={"compile": compile_})
        # plain BN: split-batch BN's groups of 16 amplify float noise over 3 steps beyond the tolerance;
        # its compiled forward and backward match eager in test_baselines.py
        recipe["method"]["shuffle_bn"] = False
        trainer = Trainer(recipe_from_data(recipe), out, quiet=True)
        trainer.fit()
        return trainer.method.state_dict()

    torch._dynamo.reset()
    counters.clear()
    eager = run(False, tmp_path / "eager")
    assert counters["stats"]["unique_graphs"] == 0
    compiled = run(True, tmp_path / "compiled")
    assert counters["stats"]["unique_graphs"] >= 2  # the student's and the teacher's forward
    assert eager.keys() == compiled.keys()  # in-place compile: checkpoints keep their keys
    for key, value in eager.items():
        torch.testing.assert_close(compiled[key], value, rtol=1e-4, atol=1e-5, msg=key)
    torch._dynamo.reset()
