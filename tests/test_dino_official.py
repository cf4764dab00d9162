"""DINO and AdaSim-DINO as their official code (facebookresearch/dino, tileb1/AdaSim), each piece pinned
to the official formula: the ViT's initialisation, stochastic depth (student only, train mode only),
the position embedding interpolated for local crops, the teacher's EMA right after the optimiser's step,
the learning-rate warm-up from 0, the teacher-temperature warm-up and the head's options; and the
defaults that leave every other method and recipe as it was."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import train_until_checkpoint
from test_engine import _states_equal, tiny
from torch import nn

from isdretrieve.errors import RecipeError
from isdretrieve.models.heads import NormalizedLinear, dino_head
from isdretrieve.models.vit import DropPath, build_vit, resize_pos_embedding
from isdretrieve.train.engine import Trainer
from isdretrieve.train.methods.base import Batch, ema_copy
from isdretrieve.train.methods.dino import DINO, teacher_temperature
from isdretrieve.train.objectives import dino_multicrop_loss
from isdretrieve.train.optim import param_groups
from isdretrieve.train.recipe import DinoConfig, OptimConfig, load_recipe, recipe_from_data
from isdretrieve.train.schedule import learning_rate
from isdretrieve.util.torchvision import import_torchvision
from isdretrieve.util.typed_config import to_dict

REPO = Path(__file__).resolve().parents[1]
HEAD = {"out_dim": 64, "head_hidden": 32, "bottleneck": 16}


# ------------------------------------------------------------------------------- 1. initialisation
def test_vit_small_starts_from_dinos_initialisation() -> None:
    """ViT-S/16 at 224 px: every Linear weight and the qkv projection N(0, 0.02) truncated at ±2, biases
    0, LayerNorms 1 / 0, class token and position embedding N(0, 0.02); the patch conv keeps PyTorch's
    Conv2d default (DINO's init skips it): U(±1/√fan_in) bias, weight std 1/√(3·fan_in)."""
    torch.manual_seed(0)
    vit = build_vit("vit_small", image_size=224, patch_size=16)
    fan_in = 3 * 16 * 16
    for name, p in vit.named_parameters():
        p = p.detach()
        if name.endswith(("in_proj_weight", "out_proj.weight", "mlp.0.weight", "mlp.3.weight")):
            assert p.std().item() == pytest.approx(0.02, rel=0.02), name
            assert abs(p.mean().item()) < 2e-4, name
        elif name.endswith(("in_proj_bias", "out_proj.bias", "mlp.0.bias", "mlp.3.bias")) or (
            name.endswith("bias") and ".ln" in name
        ):
            assert torch.count_nonzero(p) == 0, name
        elif name.endswith("weight") and ".ln" in name:
            assert torch.equal(p, torch.ones_like(p)), name
        elif name == "class_token":
            assert p.std().item() == pytest.approx(0.02, rel=0.15)
        elif name == "encoder.pos_embedding":
            assert p.std().item() == pytest.approx(0.02, rel=0.03)
        elif name == "conv_proj.weight":
            assert p.std().item() == pytest.approx((3 * fan_in) ** -0.5, rel=0.02)
        elif name == "conv_proj.bias":
            assert p.abs().max().item() <= fan_in**-0.5
            assert p.std().item() == pytest.approx(fan_in**-0.5 / 3**0.5, rel=0.15)
        else:
            raise AssertionError(f"unexpected parameter {name}")


def test_torchvision_init_is_torchvisions_vit_as_before() -> None:
    torch.manual_seed(0)
    ours = build_vit("vit_tiny", image_size=32, patch_size=4, depth=2, init="torchvision")
    torch.manual_seed(0)
    reference = import_torchvision().models.VisionTransformer(
        image_size=32, patch_size=4, num_layers=2, num_heads=3, hidden_dim=192, mlp_dim=768
    )
    reference.heads = nn.Identity()
    assert _states_equal(ours.state_dict(), reference.state_dict())
    assert torch.count_nonzero(ours.class_token) == 0  # torchvision's class token starts at 0


# --------------------------------------------------------------------------------- 2. drop path
def test_drop_path_is_dinos_per_sample_mask() -> None:
    """DINO's ``drop_path``: mask = floor(1 − p + U[0, 1)) per sample, out = x / (1 − p) · mask."""
    drop, x = DropPath(0.25), torch.randn(4000, 3, 5)
    torch.manual_seed(7)
    out = drop(x)
    torch.manual_seed(7)
    mask = torch.floor(0.75 + torch.rand(4000, 1, 1))
    assert torch.equal(out, x.div(0.75) * mask)
    dropped, kept = (out == 0).flatten(1).all(1), torch.isclose(out, x / 0.75).flatten(1).all(1)
    assert (dropped ^ kept).all() and kept.float().mean().item() == pytest.approx(0.75, abs=0.03)
    assert torch.equal(drop.eval()(x), x) and torch.equal(DropPath(0.0)(x), x)


def test_stochastic_depth_rates_rise_over_the_blocks_and_train_the_student_only() -> None:
    torch.manual_seed(0)
    vit = build_vit("vit_tiny", image_size=16, patch_size=4, depth=12, drop_path=0.1)
    assert [d.p for d in vit.drop_paths] == pytest.approx([0.1 * i / 11 for i in range(12)], abs=1e-7)
    vit = build_vit("vit_tiny", image_size=16, patch_size=4, depth=4, drop_path=0.5)
    plain = build_vit("vit_tiny", image_size=16, patch_size=4, depth=4)
    plain.load_state_dict(vit.state_dict())
    x = torch.randn(8, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        vit.eval(), plain.eval()
        assert torch.equal(vit(x), plain(x)) and torch.equal(vit(x[..., :8, :8]), plain(x[..., :8, :8]))
        vit.train(), plain.train()
        assert not torch.allclose(vit(x), plain(x), atol=1e-3)  # on in training
        teacher = ema_copy(vit).train()  # DINO's teacher is built without drop path
        assert torch.equal(teacher(x), plain(x))


# ------------------------------------------------------------------- 3. local-crop position embedding
def _keys_cubic(d: float, a: float = -0.75) -> float:
    d = abs(d)
    if d <= 1:
        return (a + 2) * d**3 - (a + 3) * d**2 + 1
    return a * d**3 - 5 * a * d**2 + 8 * a * d - 4 * a if d < 2 else 0.0


def _cubic_matrix(side: int, out: int, step: float) -> np.ndarray:
    """[out, side]: output k samples the source at (k + 0.5) · step − 0.5 with the cubic convolution
    kernel (a = −0.75) over its 4 nearest rows, rows past the border clamped to it."""
    matrix = np.zeros((out, side))
    for k in range(out):
        src = (k + 0.5) * step - 0.5
        first = math.floor(src) - 1
        for tap in range(first, first + 4):
            matrix[k, min(max(tap, 0), side - 1)] += _keys_cubic(tap - src)
    return matrix


@pytest.mark.parametrize(("side", "grid"), [(14, (6, 6)), (4, (2, 3)), (8, (12, 12))])
def test_local_crop_position_embedding_is_dinos_interpolation(side: int, grid: tuple[int, int]) -> None:
    """DINO's ``interpolate_pos_encoding``: bicubic with the scale factor (g + 0.1) / G, so output k
    samples the source grid at (k + 0.5) · G / (g + 0.1) − 0.5; ``resize`` samples at G / g. 14 -> 6 is
    a 96-px local crop on ViT-S/16."""
    pos = torch.randn(1, 1 + side * side, 3, generator=torch.Generator().manual_seed(side))
    patches = pos[0, 1:].reshape(side, side, 3).double().numpy()
    got = {}
    for mode, offset in (("dino", 0.1), ("resize", 0.0)):
        rows = _cubic_matrix(side, grid[0], side / (grid[0] + offset))
        cols = _cubic_matrix(side, grid[1], side / (grid[1] + offset))
        expected = np.einsum("ki,ijc,lj->klc", rows, patches, cols).reshape(-1, 3)
        got[mode] = resize_pos_embedding(pos, grid, mode)
        np.testing.assert_allclose(got[mode][0, 1:].double().numpy(), expected, atol=1e-5, rtol=0)
        assert torch.equal(got[mode][:, 0], pos[:, 0])
    assert (got["dino"] - got["resize"]).abs().max() > 1e-2
    assert torch.equal(resize_pos_embedding(pos, grid), got["dino"])  # the default is DINO's


def test_vit_interpolates_as_configured() -> None:
    torch.manual_seed(0)
    dino = build_vit("vit_tiny", image_size=32, patch_size=4, depth=1).eval()
    resize = build_vit("vit_tiny", image_size=32, patch_size=4, depth=1, pos_interpolation="resize").eval()
    resize.load_state_dict(dino.state_dict())
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(dino(x), resize(x))  # its own size: nothing to interpolate
        assert not torch.allclose(dino(x[..., :16, :16]), resize(x[..., :16, :16]), atol=1e-4)


# --------------------------------------------------------------------------------------- 4. the EMA
def _three_steps(order: str) -> dict:
    """Plain DINO, a one-block ViT, 3 AdamW steps at a constant lr, momentum 0.5 (big updates), no
    frozen layer: every parameter moves every step."""
    data = tiny(
        "byol",
        optim={"epochs": 1, "max_steps": 3, "optimizer": "adamw", "lr": 1e-3, "warmup_epochs": 0},
        model={"arch": "vit_tiny", "depth": 1, "patch": 4},
    )
    dino = {**HEAD, "momentum": 0.5, "freeze_last_layer": 0, "teacher_update": order}
    data["method"] = {"name": "adasim", "base": "dino", "mode": "plain", "dino": dino}
    return data


def _ema(start: list[torch.Tensor], students: list, momenta: list[float]) -> list[torch.Tensor]:
    """θ_t ← m·θ_t + (1 − m)·θ_s for each (student, m) in turn, from ``start`` (DINO's formula)."""
    teacher = [p.clone() for p in start]
    for student, m in zip(students, momenta, strict=True):
        teacher = [m * t + (1 - m) * s for t, s in zip(teacher, student, strict=True)]
    return teacher


def test_teacher_is_updated_after_each_step_with_that_steps_momentum(
    tmp_path, monkeypatch, one_thread
) -> None:
    """main_dino.py: at iteration it the optimiser steps, then θ_t ← m_it·θ_t + (1 − m_it)·θ_s with
    m_it = 1 + ½(m − 1)(1 + cos(π·it/T)). ``next_step`` (the earlier order) updates at the start of the
    next step with the next momentum, so the final teacher misses the last update."""
    momenta = [1 + 0.5 * (0.5 - 1) * (1 + math.cos(math.pi * it / 3)) for it in range(3)]
    real, finals = Trainer.optimize, {}
    for order in ("after_step", "next_step"):
        trainer = Trainer(recipe_from_data(_three_steps(order)), tmp_path / order, quiet=True)
        students = [[p.detach().clone() for p in trainer.method.student.parameters()]]
        assert all(
            torch.equal(s, t) for s, t in zip(students[0], trainer.method.teacher.parameters(), strict=True)
        )

        def optimize(self, *args, students=students, **kwargs):
            out = real(self, *args, **kwargs)
            students.append([p.detach().clone() for p in self.method.student.parameters()])
            return out

        with monkeypatch.context() as patch:
            patch.setattr(Trainer, "optimize", optimize)
            trainer.fit()
        assert trainer.step == 3 and len(students) == 4
        assert all(not torch.equal(a, b) for a, b in zip(students[2], students[3], strict=True))
        teacher = [p.detach() for p in trainer.method.teacher.parameters()]
        after = _ema(students[0], students[1:], momenta)  # step it, then its EMA with m_it
        before = _ema(students[0], students[:3], momenta)  # step it's EMA first: the last one missing
        expected, other = (after, before) if order == "after_step" else (before, after)
        for t, e in zip(teacher, expected, strict=True):
            torch.testing.assert_close(t, e, rtol=1e-5, atol=1e-7)
        assert any(
            not torch.allclose(t, o, rtol=1e-5, atol=1e-7) for t, o in zip(teacher, other, strict=True)
        )
        finals[order] = teacher
    assert any(not torch.equal(a, b) for a, b in zip(finals["after_step"], finals["next_step"], strict=True))


# ----------------------------------------------------------------------------------- 5. the warm-up
def test_warmup_starts_at_zero_as_dinos_cosine_scheduler() -> None:
    """utils.cosine_scheduler(lr, min_lr, epochs, niter, warmup_epochs): linspace(0, lr, W) then the
    cosine over the remaining steps; ``first_step`` keeps lr · (s + 1) / W."""
    lr, min_lr, per_epoch, epochs = 1e-3, 1e-6, 7, 20
    total, warm = per_epoch * epochs, per_epoch * 2
    iters = np.arange(total - warm)
    cosine = min_lr + 0.5 * (lr - min_lr) * (1 + np.cos(np.pi * iters / len(iters)))
    dino = np.concatenate((np.linspace(0, lr, warm), cosine))
    cfg = OptimConfig(lr=lr, min_lr=min_lr, warmup_epochs=2, warmup_from="zero")
    ours = [learning_rate(cfg, s, per_epoch, total) for s in range(total)]
    assert ours[0] == 0.0 and ours[:warm] == np.linspace(0, lr, warm).tolist()
    np.testing.assert_allclose(ours, dino, rtol=1e-12, atol=0)
    before = OptimConfig(lr=lr, warmup_epochs=2, warmup_from="first_step")
    assert [learning_rate(before, s, per_epoch, total) for s in range(warm)] == [
        lr * (s + 1) / warm for s in range(warm)
    ]


def test_defaults_are_dinos_under_dino_and_as_before_elsewhere() -> None:
    """Left out: DINO's warm-up from 0 and drop path 0.1 for a ViT under DINO; the other methods (and a
    CNN under DINO) keep the first-step warm-up and no drop path. The shipped recipes resolve so."""
    for name in ("isd", "moco", "byol", "sepp", "adasim"):
        recipe = recipe_from_data({"method": {"name": name}, "model": {"arch": "vit_tiny"}})
        assert (recipe.optim.warmup_from, recipe.model.drop_path) == ("first_step", 0.0), name
    dino = {"method": {"name": "adasim", "base": "dino"}}
    assert recipe_from_data(dino).model.drop_path == 0.0  # small_cnn
    recipe = recipe_from_data({**dino, "model": {"arch": "vit_small"}})
    assert (recipe.optim.warmup_from, recipe.model.drop_path) == ("zero", 0.1)
    assert (recipe.model.vit_init, recipe.model.pos_interpolation) == ("dino", "dino")
    assert recipe.method.dino.teacher_update == "after_step"
    for path in sorted((REPO / "training").glob("*.yaml")):
        recipe = load_recipe(path)
        vit_dino = recipe.model.arch.startswith("vit_") and recipe.method.name == "adasim"
        vit_dino = vit_dino and recipe.method.base == "dino"
        expected = ("zero", 0.1) if vit_dino else ("first_step", 0.0)
        assert (recipe.optim.warmup_from, recipe.model.drop_path) == expected, path.name


VITS16 = (
    "imagenet-adasim-dino-vits16.yaml",
    "imagenet-dino-vits16.yaml",
    "imagenet-dino-vits16-naive-nn.yaml",
)


def test_vit_s16_recipes_set_dinos_published_values_and_differ_only_in_mode() -> None:
    """DINO's ViT-S/16 runs: teacher temperature 0.04 -> 0.07 over 30 epochs, no last-layer
    normalisation, drop path 0.1, DINO's init; the controls equal AdaSim's recipe but for the mode."""
    recipes = [to_dict(load_recipe(REPO / "training" / name)) for name in VITS16]
    assert [r["method"].pop("mode") for r in recipes] == ["adaptive", "plain", "naive"]
    assert recipes[0] == recipes[1] == recipes[2]
    dino, model, optim = recipes[0]["method"]["dino"], recipes[0]["model"], recipes[0]["optim"]
    assert (dino["warmup_tau_teacher"], dino["tau_teacher"], dino["warmup_tau_teacher_epochs"]) == (
        0.04,
        0.07,
        30,
    )
    assert (dino["norm_last_layer"], dino["teacher_update"], dino["head_layers"], dino["head_bn"]) == (
        False,
        "after_step",
        3,
        False,
    )
    assert (model["arch"], model["patch"], model["vit_init"], model["drop_path"]) == (
        "vit_small",
        16,
        "dino",
        0.1,
    )
    assert (optim["warmup_epochs"], optim["warmup_from"]) == (10, "zero")


# -------------------------------------------------------------------------- 6. teacher temperature
def test_teacher_temperature_is_dinos_schedule() -> None:
    """DINOLoss.teacher_temp_schedule: linspace(warmup, τ_t, W) per epoch, then τ_t; W = 0 by default."""
    cfg = DinoConfig(tau_teacher=0.07, warmup_tau_teacher=0.04, warmup_tau_teacher_epochs=30)
    dino = np.concatenate((np.linspace(0.04, 0.07, 30), np.ones(100 - 30) * 0.07))
    assert [teacher_temperature(cfg, epoch) for epoch in range(100)] == dino.tolist()
    assert teacher_temperature(cfg, 0) == 0.04 and teacher_temperature(cfg, 29) == 0.07
    default = DinoConfig()
    assert default.warmup_tau_teacher == default.tau_teacher == 0.04
    assert {teacher_temperature(default, epoch) for epoch in range(50)} == {0.04}


def test_dino_step_sharpens_with_its_epochs_temperature(one_thread) -> None:
    torch.manual_seed(0)
    cfg = DinoConfig(**HEAD, tau_teacher=0.07, warmup_tau_teacher=0.04, warmup_tau_teacher_epochs=3)
    method = DINO(build_vit("vit_tiny", image_size=16, patch_size=4, depth=1), cfg)
    a, b = torch.rand(2, 4, 3, 16, 16, generator=torch.Generator().manual_seed(2))
    rows, losses = torch.arange(4), []
    for epoch, tau in ((0, 0.04), (1, 0.055), (7, 0.07)):
        assert teacher_temperature(cfg, epoch) == pytest.approx(tau)
        center = method.center.clone()
        with torch.no_grad():
            student = list(method.student(torch.cat([a, b])).chunk(2))
            expected = dino_multicrop_loss(student, [method.teacher(a), method.teacher(b)], center, 0.1, tau)
        out = method(Batch([a, b], rows, rows, 0.0, epoch=epoch))
        torch.testing.assert_close(out.loss.detach(), expected, rtol=1e-5, atol=1e-6)
        assert out.logs["tau_teacher"] == pytest.approx(tau)
        losses.append(out.loss.item())
    assert len(set(losses)) == 3


def test_dino_vit_with_drop_path_and_temperature_warmup_resumes_exactly(tmp_path, monkeypatch, one_thread):
    """A 3-block ViT (drop path 0, 0.05, 0.1 by default) with the teacher temperature rising over 2
    epochs: the engine hands the method its epoch, and a run resumed from its epoch-1 checkpoint ends
    where the straight run ends (the drop-path masks come from (seed, step))."""
    data = tiny("byol", optim={"epochs": 2}, model={"arch": "vit_tiny", "depth": 3, "patch": 4})
    data["data"]["train"], data["engine"]["log_every"] = "digits,split=test", 1  # 7 steps an epoch
    dino = {**HEAD, "tau_teacher": 0.07, "warmup_tau_teacher": 0.04, "warmup_tau_teacher_epochs": 2}
    data["method"] = {"name": "adasim", "base": "dino", "mode": "plain", "dino": dino}
    recipe = recipe_from_data(data)
    assert recipe.model.drop_path == 0.1
    straight = Trainer(recipe, tmp_path / "a", quiet=True)
    assert [d.p for d in straight.method.student.backbone.drop_paths] == pytest.approx([0, 0.05, 0.1])
    straight.fit()
    records = [json.loads(line) for line in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    taus = {(r["epoch"], r["tau_teacher"]) for r in records if "tau_teacher" in r}
    assert taus == {(0, 0.04), (1, 0.07)}

    train_until_checkpoint(recipe, tmp_path / "b", monkeypatch)
    resumed = Trainer(recipe, tmp_path / "b", resume=True, quiet=True)
    assert (resumed.epoch, resumed.step) == (1, 7)
    resumed.fit()
    assert _states_equal(straight.method.state_dict(), resumed.method.state_dict())


# ------------------------------------------------------------------------------------ the head
def test_head_options_are_dinos_head() -> None:
    default = dino_head(192, 32, 16, 64)
    kinds = [type(m).__name__ for m in default]
    assert kinds == ["Linear", "GELU", "Linear", "GELU", "Linear", "L2Norm", "NormalizedLinear"]
    assert list(default.state_dict()) == [f"{i}.{k}" for i in (0, 2, 4) for k in ("weight", "bias")] + [
        "6.weight"
    ]  # the keys of earlier releases' checkpoints
    one = dino_head(192, 32, 16, 64, layers=1)
    assert [type(m).__name__ for m in one] == ["Linear", "L2Norm", "NormalizedLinear"]
    assert one[0].weight.shape == (16, 192)
    bn = dino_head(192, 32, 16, 64, layers=3, batch_norm=True)
    assert [type(m).__name__ for m in bn][:7] == ["Linear", "BatchNorm1d", "GELU"] * 2 + ["Linear"]
    with pytest.raises(ValueError, match="at least one layer"):
        dino_head(192, 32, 16, 64, layers=0)


def test_last_layer_is_torchs_weight_norm_with_the_gain_fixed_or_learnt() -> None:
    x = torch.randn(5, 16, generator=torch.Generator().manual_seed(0))
    for norm_last_layer in (True, False):
        ours = NormalizedLinear(16, 64, norm_last_layer)
        reference = nn.utils.parametrizations.weight_norm(nn.Linear(16, 64, bias=False))
        with torch.no_grad():
            reference.parametrizations.weight.original1.copy_(ours.weight)
            reference.parametrizations.weight.original0.fill_(1.0)
            if not norm_last_layer:  # weight_g: [out, 1], starting at 1 as DINO fills it
                assert ours.weight_g.shape == (64, 1) and torch.equal(ours.weight_g, torch.ones(64, 1))
                ours.weight_g.uniform_(0.5, 2.0)
                reference.parametrizations.weight.original0.copy_(ours.weight_g)
        assert [n for n, _ in ours.named_parameters()] == (
            ["weight"] if norm_last_layer else ["weight", "weight_g"]
        )
        torch.testing.assert_close(ours(x), reference(x), rtol=1e-5, atol=1e-6)


def test_a_learnt_gain_is_decayed_and_frozen_with_the_last_layer() -> None:
    """As DINO's parameter groups (weight_g is 2-D: decayed) and cancel_gradients_last_layer."""
    method = DINO(
        build_vit("vit_tiny", image_size=16, patch_size=4, depth=1), DinoConfig(**HEAD, norm_last_layer=False)
    )
    last = method.student.projector[-1]
    assert method.frozen_parameters(0) == [last.weight, last.weight_g] and method.frozen_parameters(1) == []
    decayed, _ = (set(map(id, g["params"])) for g in param_groups(method.student, 0.04, True))
    assert {id(last.weight), id(last.weight_g)} <= decayed
    assert torch.equal(method.teacher.projector[-1].weight_g, last.weight_g)


# ------------------------------------------------------------------------------------ bad recipes
def _vit_dino(dino=None, model=None, optim=None, method=None) -> dict:
    method = method or {"name": "adasim", "base": "dino", "dino": dino or {}}
    return {"method": method, "model": {"arch": "vit_tiny", **(model or {})}, "optim": optim or {}}


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (_vit_dino({"head_layers": 0}), "method.dino.head_layers: must be positive, got 0"),
        (
            _vit_dino({"warmup_tau_teacher_epochs": -1}),
            "method.dino.warmup_tau_teacher_epochs: must not be negative, got -1",
        ),
        (_vit_dino({"warmup_tau_teacher": 0}), "method.dino.warmup_tau_teacher: must be positive, got 0"),
        (_vit_dino({"teacher_update": "before"}), "method.dino.teacher_update: expected one of after_step"),
        (_vit_dino(model={"drop_path": 1.0}), "model.drop_path: must be in [0, 1), got 1.0"),
        (_vit_dino(model={"vit_init": "timm"}), "model.vit_init: expected one of dino, torchvision"),
        (_vit_dino(model={"pos_interpolation": "linear"}), "model.pos_interpolation: expected one of dino"),
        (_vit_dino(optim={"warmup_from": "one"}), "optim.warmup_from: expected one of zero, first_step"),
        (_vit_dino(model={"drop_path": 0.1}, method={"name": "isd"}), "stochastic depth is DINO's"),
        (_vit_dino(model={"arch": "resnet18", "drop_path": 0.1}), "has resnet18 and adasim: set it to 0"),
    ],
)
def test_bad_dino_settings_are_one_line_naming_the_key(data: dict, message: str) -> None:
    with pytest.raises(RecipeError) as info:
        recipe_from_data(data)
    assert message in str(info.value) and "\n" not in str(info.value)
