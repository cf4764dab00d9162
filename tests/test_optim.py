"""The optimiser options DINO / AdaSim's setting needs: AdamW, parameter groups without decay on biases
and norms, the weight-decay and min-lr schedules, gradient clipping, DINO's frozen last layer."""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch
from test_engine import _states_equal, tiny
from test_host_sync import SyncingOps, _steps, masked_jitter, run_with_syncs_as_errors  # noqa: F401
from torch import nn

from isdretrieve.errors import RecipeError
from isdretrieve.models.backbones import build_backbone
from isdretrieve.models.heads import NormalizedLinear, dino_head
from isdretrieve.train.checkpointing import list_checkpoints
from isdretrieve.train.engine import Trainer
from isdretrieve.train.optim import build_optimizer, clip_gradients, param_groups, set_hyperparameters
from isdretrieve.train.recipe import OptimConfig, recipe_from_data
from isdretrieve.train.schedule import learning_rate, weight_decay

DINO_SETTING = {  # DINO's official optimiser (lr and schedule lengths scaled to a digits run)
    "optimizer": "adamw",
    "lr": 1e-3,
    "min_lr": 1e-6,
    "weight_decay": 0.04,
    "weight_decay_end": 0.4,
    "no_decay_bias_and_norm": True,
    "clip_grad": 3.0,
}


def _net() -> nn.Module:
    """Conv + BN (small_cnn), Linear + GELU + unit-row linear (DINO head) and a LayerNorm."""
    return nn.ModuleDict(
        {"cnn": build_backbone("small_cnn"), "head": dino_head(256, 32, 16, 64), "norm": nn.LayerNorm(64)}
    )


# ------------------------------------------------------------------------------ parameter groups


def test_biases_and_norm_weights_land_in_the_undecayed_group():
    net = _net()
    decayed, undecayed = (set(map(id, g["params"])) for g in param_groups(net, 0.04, True))
    expect_decayed, expect_undecayed = set(), set()
    for module in net.modules():
        if isinstance(module, (nn.Conv2d, nn.Linear, NormalizedLinear)):
            expect_decayed.add(id(module.weight))
        if isinstance(module, (nn.BatchNorm2d, nn.LayerNorm)):
            expect_undecayed |= {id(module.weight), id(module.bias)}
        if isinstance(module, (nn.Conv2d, nn.Linear)) and module.bias is not None:
            expect_undecayed.add(id(module.bias))
    assert expect_decayed and expect_undecayed
    assert (decayed, undecayed) == (expect_decayed, expect_undecayed)


def test_default_is_one_sgd_group_over_every_trainable_parameter_as_before():
    net = _net()
    net["norm"].requires_grad_(False)
    opt = build_optimizer(OptimConfig(lr=0.1), net)
    assert isinstance(opt, torch.optim.SGD) and len(opt.param_groups) == 1
    (group,) = opt.param_groups
    assert group["params"] == [p for p in net.parameters() if p.requires_grad]
    assert (group["lr"], group["momentum"], group["weight_decay"]) == (0.1, 0.9, 1e-4)


def test_adamw_groups_and_the_weight_decay_schedule_touches_the_decayed_group_only():
    opt = build_optimizer(OptimConfig(**DINO_SETTING, betas=(0.8, 0.99)), _net())
    assert isinstance(opt, torch.optim.AdamW)
    assert [(g["decay"], g["weight_decay"], g["betas"]) for g in opt.param_groups] == [
        (True, 0.04, (0.8, 0.99)),
        (False, 0.0, (0.8, 0.99)),
    ]
    set_hyperparameters(opt, 0.5, 0.3)
    assert [(g["lr"], g["weight_decay"]) for g in opt.param_groups] == [(0.5, 0.3), (0.5, 0.0)]


# ------------------------------------------------------------------------------------- schedules


def _cos(start: float, end: float, t: float) -> float:
    return end + 0.5 * (start - end) * (1 + math.cos(math.pi * t))


def test_weight_decay_follows_dinos_cosine_and_is_constant_by_default():
    cfg, total = OptimConfig(lr=1.0, weight_decay=0.04, weight_decay_end=0.4), 100
    for step in (0, 50, 99):
        assert weight_decay(cfg, step, total) == pytest.approx(_cos(0.04, 0.4, step / total), rel=1e-12)
    assert weight_decay(cfg, 0, total) == pytest.approx(0.04) and weight_decay(
        cfg, 50, total
    ) == pytest.approx(0.22)
    assert 0.3999 < weight_decay(cfg, 99, total) < 0.4
    assert {weight_decay(OptimConfig(lr=1.0), s, total) for s in range(total)} == {1e-4}


def test_cosine_lr_ends_at_min_lr_and_is_bit_for_bit_the_old_one_without_it():
    cfg = OptimConfig(lr=1.0, min_lr=1e-6, warmup_epochs=1)
    spe, total, warmup = 10, 100, 10
    for step in (warmup, 55, total - 1):
        expected = _cos(1.0, 1e-6, (step - warmup) / (total - warmup))
        assert learning_rate(cfg, step, spe, total) == pytest.approx(expected, rel=1e-12)
    assert learning_rate(cfg, warmup, spe, total) == 1.0
    assert 1e-6 < learning_rate(cfg, total - 1, spe, total) < 1e-3
    old = OptimConfig(lr=0.05, warmup_epochs=1)
    for step in range(warmup, total):  # the formula before min_lr existed
        assert learning_rate(old, step, spe, total) == 0.05 * 0.5 * (
            1 + math.cos(math.pi * (step - warmup) / (total - warmup))
        )


# -------------------------------------------------------------------------------------- clipping


def _params_with_grads(*grads: list) -> list[nn.Parameter]:
    params = [nn.Parameter(torch.zeros(torch.tensor(g).shape)) for g in grads]
    for p, g in zip(params, grads, strict=True):
        p.grad = torch.tensor(g, dtype=torch.float32)
    return params


def test_per_parameter_clipping_scales_each_gradient_to_its_own_norm():
    grads = [[3.0, 4.0], [[0.3, 0.0], [0.0, 0.4]], [12.0, -5.0, 0.0]]  # norms 5, 0.5, 13
    params = _params_with_grads(*grads)
    total = clip_gradients(params, 1.0, "per_param", want_norm=True)
    assert total.item() == pytest.approx(math.sqrt(25 + 0.25 + 169))  # before clipping
    for p, g in zip(params, grads, strict=True):
        g = torch.tensor(g)
        expected = g * min(1.0, 1.0 / (g.norm().item() + 1e-6))
        torch.testing.assert_close(p.grad, expected, rtol=1e-6, atol=0)
    assert torch.equal(params[1].grad, torch.tensor(grads[1]))  # under the threshold: untouched


def test_global_clipping_equals_torchs_clip_grad_norm():
    torch.manual_seed(0)
    grads = [torch.randn(4, 3).tolist(), (10 * torch.randn(7)).tolist()]
    ours, theirs = _params_with_grads(*grads), _params_with_grads(*grads)
    total = clip_gradients(ours, 2.0, "global", want_norm=True)
    expected = torch.nn.utils.clip_grad_norm_(theirs, 2.0)
    assert torch.equal(total, expected)
    assert all(torch.equal(a.grad, b.grad) for a, b in zip(ours, theirs, strict=True))
    assert clip_gradients(ours, 2.0, "global", want_norm=False) is None  # no norm to read back


def test_without_clipping_gradients_stay_and_the_norm_is_the_total():
    grads = [[3.0, 4.0], [12.0]]
    params = _params_with_grads(*grads)
    assert clip_gradients(params, None, want_norm=False) is None
    assert clip_gradients(params, None, want_norm=True).item() == pytest.approx(13.0)
    assert [p.grad.tolist() for p in params] == grads


# ------------------------------------------------------------------------- the engine, end to end


def _adasim_dino(**optim) -> dict:
    data = tiny("byol", optim={"epochs": 2, "max_steps": 24, **optim}, engine={"log_every": 4})
    data["method"] = {
        "name": "adasim",
        "base": "dino",
        "mode": "plain",
        "dino": {"out_dim": 64, "head_hidden": 32, "bottleneck": 16},
    }
    return data


def test_dinos_last_layer_is_frozen_in_the_first_epoch_only(tmp_path, monkeypatch, one_thread):
    trainer = Trainer(recipe_from_data(_adasim_dino()), tmp_path, quiet=True)
    student = trainer.method.base.student
    watched = {
        "last": student.projector[-1].weight,
        "head": student.projector[0].weight,
        "conv": student.backbone.stage1[0].conv.weight,
    }
    snapshots = [{k: p.detach().clone() for k, p in watched.items()}]
    real = Trainer._train_epoch

    def train_epoch(self):
        real(self)
        snapshots.append({k: p.detach().clone() for k, p in watched.items()})

    monkeypatch.setattr(Trainer, "_train_epoch", train_epoch)
    trainer.fit()
    assert trainer.step == 24 and len(snapshots) == 3  # 21 steps in epoch 1, 3 in epoch 2
    start, epoch1, epoch2 = snapshots
    assert torch.equal(start["last"], epoch1["last"])
    assert not torch.equal(epoch1["last"], epoch2["last"])
    assert not torch.equal(start["head"], epoch1["head"]) and not torch.equal(start["conv"], epoch1["conv"])
    assert (
        trainer.method.frozen_parameters(0) == [watched["last"]] and trainer.method.frozen_parameters(1) == []
    )


@pytest.mark.parametrize("mode", ["per_param", "global"])
def test_dino_setting_interrupted_and_resumed_ends_with_identical_weights(tmp_path, mode, one_thread):
    """AdamW, both groups, the wd schedule, clipping and the frozen last layer: a run resumed from the
    epoch-1 checkpoint (the layer frozen before it, not after) ends where the straight run ends."""
    recipe = recipe_from_data(_adasim_dino(**DINO_SETTING, clip_grad_mode=mode, warmup_epochs=0.5))
    straight = Trainer(recipe, tmp_path / "a", quiet=True)
    straight.fit()
    assert [p.name for p in list_checkpoints(tmp_path / "a")] == ["epoch-0001.pt", "epoch-0002.pt"]
    (tmp_path / "b" / "checkpoints").mkdir(parents=True)
    shutil.copy(tmp_path / "a" / "checkpoints" / "epoch-0001.pt", tmp_path / "b" / "checkpoints")

    resumed = Trainer(recipe, tmp_path / "b", resume=True, quiet=True)
    assert (resumed.epoch, resumed.step) == (1, 21)
    resumed.fit()
    assert resumed.step == straight.step == 24
    assert _states_equal(straight.method.state_dict(), resumed.method.state_dict())
    a, b = straight.optimizer.state_dict(), resumed.optimizer.state_dict()
    assert a["param_groups"] == b["param_groups"] and len(a["param_groups"]) == 2
    assert a["state"].keys() == b["state"].keys()
    assert all(_states_equal(a["state"][i], b["state"][i]) for i in a["state"])

    records = [json.loads(line) for line in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "grad_norm" in r]
    wds = [r["weight_decay"] for r in steps]
    assert len(wds) == 5 and wds == sorted(wds) and 0.04 < wds[0] < wds[-1] < 0.4
    assert all(r["weight_decay"] == pytest.approx(_cos(0.04, 0.4, (r["step"] - 1) / 24)) for r in steps)


@pytest.mark.usefixtures("masked_jitter")
@pytest.mark.parametrize("mode", ["per_param", "global"])
def test_the_dino_setting_adds_no_op_that_syncs_on_a_gpu(tmp_path, mode):
    data = _adasim_dino(**DINO_SETTING, clip_grad_mode=mode)
    data["engine"]["device"] = "cpu"
    trainer = Trainer(recipe_from_data(data), tmp_path, quiet=True)
    steps = _steps(trainer, 3)
    next(steps)  # builds AdamW's state
    # AdamW (not capturable, not fused) keeps its step counts on the host even on a GPU: reading
    # them back waits for nothing; every other read would
    counts = {id(s["step"]) for s in trainer.optimizer.state.values()}

    class Probe(SyncingOps):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func is torch.ops.aten._local_scalar_dense.default and id(args[0]) in counts:
                return func(*args, **(kwargs or {}))
            return super().__torch_dispatch__(func, types, args, kwargs)

    probe = Probe()
    with probe:
        for _ in steps:
            pass
    assert not probe.found, f"ops that would sync a GPU: {sorted(probe.found)}"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("mode", ["per_param", "global"])
def test_dino_setting_steps_on_cuda_never_wait_for_the_gpu(tmp_path, mode):
    data = _adasim_dino(**DINO_SETTING, clip_grad_mode=mode)
    data["engine"]["device"] = "cuda"
    run_with_syncs_as_errors(Trainer(recipe_from_data(data), tmp_path, quiet=True))


# ----------------------------------------------------------------------------------- bad recipes


@pytest.mark.parametrize(
    ("optim", "message"),
    [
        ({"optimizer": "adam"}, "optim.optimizer: expected one of sgd, adamw, got 'adam'"),
        ({"clip_grad": -1}, "optim.clip_grad: must be positive"),
        ({"clip_grad": 0}, "optim.clip_grad: must be positive"),
        ({"clip_grad_mode": "norm"}, "optim.clip_grad_mode: expected one of per_param, global"),
        ({"betas": [0.9]}, "optim.betas: expected 2 values"),
        ({"betas": [0.9, 1.5]}, "optim.betas[1]: must be in [0, 1), got 1.5"),
        ({"weight_decay_end": -0.1}, "optim.weight_decay_end: must not be negative"),
        ({"no_decay_bias_and_norm": "yes"}, "optim.no_decay_bias_and_norm: expected true or false"),
        ({"min_lr": 0.5, "lr": 0.1}, "optim.min_lr: must not exceed optim.lr"),
        ({"min_lr": 1e-6, "schedule": "step"}, "optim.min_lr: only the cosine schedule"),
    ],
)
def test_bad_optimiser_settings_are_one_line_naming_the_key(optim, message):
    with pytest.raises(RecipeError) as info:
        recipe_from_data({"optim": optim})
    assert message in str(info.value) and "\n" not in str(info.value)


@pytest.mark.parametrize(
    ("value", "message"),
    [
        (-1, "method.dino.freeze_last_layer: must not be negative"),
        (0.5, "method.dino.freeze_last_layer: expected"),
    ],
)
def test_bad_freeze_last_layer_names_the_key(value, message):
    with pytest.raises(RecipeError, match=message.replace(".", r"\.")):
        recipe_from_data({"method": {"name": "adasim", "base": "dino", "dino": {"freeze_last_layer": value}}})
