"""The baselines pinned to their official structure and formulas: MoCo-v2's head, BYOL's
summed loss, the ISD variant presets, shuffle-BN (split-batch BN on one device)."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from isdretrieve.errors import CheckpointError, RecipeError
from isdretrieve.models.backbones import build_backbone
from isdretrieve.train.methods.base import Batch
from isdretrieve.train.methods.byol import BYOL
from isdretrieve.train.methods.isd import ISD
from isdretrieve.train.methods.moco import MoCo
from isdretrieve.train.objectives import byol_loss
from isdretrieve.train.recipe import ISD_VARIANTS, ByolConfig, IsdConfig, MocoConfig, recipe_from_data
from isdretrieve.train.shuffle_bn import SplitBatchNorm, shuffled_forward, split_batch_norm_


def _backbone() -> nn.Module:
    torch.manual_seed(0)
    return build_backbone("small_cnn")


# -- MoCo-v2 head ---------------------------------------------------------------------------------
def test_moco_default_head_is_the_official_linear_relu_linear_without_bn():
    moco = MoCo(_backbone(), MocoConfig(shuffle_bn=False))
    head = moco.student.projector
    d = moco.student.backbone.feature_dim
    assert [type(m) for m in head] == [nn.Linear, nn.ReLU, nn.Linear]
    assert (head[0].in_features, head[0].out_features, head[2].out_features) == (d, d, 128)
    assert head[0].bias is not None and head[2].bias is not None
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in moco.student.projector.modules())


def test_moco_bn_head_is_the_named_option():
    moco = MoCo(_backbone(), MocoConfig(head="bn", shuffle_bn=False))
    head = moco.student.projector
    assert [type(m) for m in head] == [nn.Linear, nn.BatchNorm1d, nn.ReLU, nn.Linear]
    assert head[0].out_features == 2048


def test_old_bn_head_checkpoint_is_refused_with_the_fix():
    old = MoCo(_backbone(), MocoConfig(head="bn", proj_hidden=2048, shuffle_bn=False)).state_dict()
    new = MoCo(_backbone(), MocoConfig(shuffle_bn=False))
    with pytest.raises(CheckpointError, match=r"--set method.head=bn.*proj_hidden=2048"):
        new.load_state_dict(old)
    MoCo(_backbone(), MocoConfig(head="bn", shuffle_bn=False)).load_state_dict(old)  # the fix works


# -- BYOL loss ------------------------------------------------------------------------------------
def test_byol_loss_is_the_sum_of_both_directions():
    g = torch.Generator().manual_seed(0)
    p_a, p_b, z_a, z_b = (torch.randn(6, 8, generator=g) for _ in range(4))

    def term(p, z):  # ‖p/‖p‖ − z/‖z‖‖², batch mean
        return ((p / p.norm(dim=1, keepdim=True) - z / z.norm(dim=1, keepdim=True)) ** 2).sum(1).mean()

    expected = term(p_a, z_b) + term(p_b, z_a)
    assert torch.allclose(byol_loss(p_a, p_b, z_a, z_b), expected, atol=1e-6)
    cos = F.cosine_similarity
    assert torch.allclose(
        expected, (2 - 2 * cos(p_a, z_b)).mean() + (2 - 2 * cos(p_b, z_a)).mean(), atol=1e-6
    )


def test_byol_step_returns_the_sum_loss():
    torch.manual_seed(0)
    byol = BYOL(_backbone(), ByolConfig(proj_hidden=32, proj_dim=16))
    a, b = torch.rand(8, 3, 16, 16), torch.rand(8, 3, 16, 16)
    out, _ = byol.pair_step(a, b, 0.0)
    with torch.no_grad():
        target_a, target_b = byol.teacher(a), byol.teacher(b)
    pred_a, pred_b = byol.predictor(byol.student(a)), byol.predictor(byol.student(b))
    assert out.loss.item() > 2.0  # each term is ≈ 2 at initialisation, their sum ≈ 4
    assert torch.allclose(out.loss, byol_loss(pred_a, pred_b, target_a, target_b), atol=1e-5)


# -- variant presets ------------------------------------------------------------------------------
VARIANT_KEYS = [f.name for f in dataclasses.fields(ISD_VARIANTS["base"]) if f.name != "lr"]


@pytest.mark.parametrize("variant", ["base", "mlp"])
def test_isd_variant_fills_every_default(variant):
    recipe = recipe_from_data({"method": {"name": "isd", "variant": variant}})
    preset = ISD_VARIANTS[variant]
    for key in VARIANT_KEYS:
        assert getattr(recipe.method, key) == getattr(preset, key), key
    assert recipe.optim.lr == preset.lr


def test_isd_mlp_preset_values_are_the_official_ones():
    mlp = IsdConfig(variant="mlp")
    assert (mlp.projection, mlp.tau_teacher, mlp.tau_student, mlp.momentum) == (True, 0.01, 0.1, 0.99)
    assert (mlp.teacher_view, mlp.student_view) == ("weak", "strong")
    base = IsdConfig(variant="base")
    assert (base.projection, base.tau_teacher, base.tau_student, base.momentum) == (False, 0.02, 0.02, 0.999)


def test_explicit_keys_override_the_variant():
    recipe = recipe_from_data(
        {"method": {"name": "isd", "variant": "mlp", "momentum": 0.9}, "optim": {"lr": 0.3}}
    )
    assert (recipe.method.momentum, recipe.method.tau_student, recipe.optim.lr) == (0.9, 0.1, 0.3)


def test_no_variant_keeps_base_values_and_the_old_lr_default():
    recipe = recipe_from_data({"method": {"name": "isd"}})
    assert recipe.method == IsdConfig(variant=None)
    assert (recipe.method.tau_teacher, recipe.method.momentum, recipe.optim.lr) == (0.02, 0.999, 0.05)


def test_projection_without_a_variant_is_refused():
    with pytest.raises(RecipeError, match="method: projection: true without a variant.*variant: mlp"):
        recipe_from_data({"method": {"name": "isd", "projection": True}})
    with pytest.raises(RecipeError, match="method.isd: projection: true without a variant"):
        recipe_from_data({"method": {"name": "sepp", "base": "isd", "isd": {"projection": True}}})


def test_sepp_takes_its_base_variant_lr():
    recipe = recipe_from_data({"method": {"name": "sepp", "base": "isd", "isd": {"variant": "mlp"}}})
    assert recipe.optim.lr == ISD_VARIANTS["mlp"].lr and recipe.method.isd.projection


def test_shuffle_bn_setting_is_typed():
    assert recipe_from_data({"method": {"name": "moco", "shuffle_bn": False}}).method.shuffles is False
    assert recipe_from_data({"method": {"name": "moco"}}).method.shuffles is True
    assert recipe_from_data({"method": {"name": "isd", "shuffle_bn": "auto"}}).method.shuffles is True
    with pytest.raises(RecipeError, match="method.shuffle_bn"):
        recipe_from_data({"method": {"name": "moco", "shuffle_bn": "sometimes"}})
    with pytest.raises(RecipeError, match="method.shuffle_groups: must be positive"):
        recipe_from_data({"method": {"name": "isd", "shuffle_groups": 0}})


# -- shuffle-BN -----------------------------------------------------------------------------------
def test_split_batch_norm_uses_per_group_statistics():
    torch.manual_seed(0)
    bn = nn.BatchNorm2d(3)
    split = SplitBatchNorm(bn, groups=4)
    x = torch.randn(8, 3, 5, 5) * torch.arange(1, 9).view(8, 1, 1, 1)  # groups differ in scale
    out = split(x)
    for g in range(4):  # group g holds samples g and g + 4
        rows = x[g::4]
        mean = rows.mean(dim=(0, 2, 3), keepdim=True)
        var = rows.var(dim=(0, 2, 3), unbiased=False, keepdim=True)
        torch.testing.assert_close(out[g::4], (rows - mean) / torch.sqrt(var + bn.eps), atol=1e-5, rtol=1e-5)
    # running stats move by the mean of the groups' own statistics
    groups = x.view(2, 4, 3, 5, 5)
    expected_mean = 0.1 * groups.mean(dim=(0, 3, 4)).mean(dim=0)
    torch.testing.assert_close(split.running_mean, expected_mean, atol=1e-6, rtol=1e-5)
    assert split.running_mean is bn.running_mean and split.weight is bn.weight
    split.eval()
    torch.testing.assert_close(split(x), F.batch_norm(x, bn.running_mean, bn.running_var, eps=bn.eps))


def test_split_batch_norm_1d_and_a_batch_it_cannot_split():
    split = SplitBatchNorm(nn.BatchNorm1d(4), groups=2)
    x = torch.randn(6, 4)
    out = split(x)
    torch.testing.assert_close(out[0::2], F.batch_norm(x[0::2], None, None, training=True), atol=1e-5, rtol=0)
    with pytest.raises(RecipeError, match="cannot be split into 2"):
        split(torch.randn(5, 4))


def test_conversion_keeps_keys_and_parameter_order():
    model = ISD(_backbone(), IsdConfig(queue_size=64, shuffle_bn=False))
    keys, params = list(model.state_dict()), [id(p) for p in model.parameters()]
    split_batch_norm_(model, 4)
    assert list(model.state_dict()) == keys and [id(p) for p in model.parameters()] == params
    assert any(isinstance(m, SplitBatchNorm) for m in model.teacher.modules())


def test_shuffled_forward_is_an_exact_inverse_for_a_per_sample_network():
    lin = nn.Linear(5, 3)
    x = torch.randn(16, 5)
    out = shuffled_forward(lin, x, seed=3, progress=0.25)
    torch.testing.assert_close(out, lin(x).detach())


def test_single_device_shuffle_puts_keys_in_random_groups():
    """With shuffle-BN each key is normalised with a random group of the batch, not the unshuffled one."""
    torch.manual_seed(0)
    moco = MoCo(_backbone(), MocoConfig(queue_size=64, shuffle_groups=4))
    assert isinstance(moco.teacher.backbone.stage1[0].bn, SplitBatchNorm)
    x = torch.rand(16, 3, 16, 16)
    with torch.no_grad():
        plain = moco.teacher(x)  # groups of the unshuffled batch
        keyed = moco.key_forward(moco.teacher, x, progress=0.5)
        again = moco.key_forward(moco.teacher, x, progress=0.5)
        other = moco.key_forward(moco.teacher, x, progress=0.75)
    assert not torch.allclose(plain, keyed, atol=1e-4)
    torch.testing.assert_close(keyed, again)  # the same step draws the same permutation (resume)
    assert not torch.allclose(keyed, other, atol=1e-4)
    # the EMA update still pairs every teacher parameter with its student parameter
    from isdretrieve.train.methods.base import ema_update

    ema_update(moco.teacher, moco.student, 0.0)
    for t, s in zip(moco.teacher.parameters(), moco.student.parameters(), strict=True):
        assert torch.equal(t, s)


def test_shuffle_off_and_byol_keep_plain_batch_norm():
    moco = MoCo(_backbone(), MocoConfig(shuffle_bn=False))
    byol = BYOL(_backbone(), ByolConfig(proj_hidden=32, proj_dim=16))
    for model in (moco, byol):
        assert not any(isinstance(m, SplitBatchNorm) for m in model.modules())


def test_isd_step_with_shuffle_bn_trains():
    torch.manual_seed(0)
    isd = ISD(_backbone(), IsdConfig(queue_size=64))
    views = [torch.rand(16, 3, 16, 16) for _ in range(2)]
    out = isd(Batch(views, torch.arange(16), torch.zeros(16), progress=0.1))
    out.loss.backward()
    assert torch.isfinite(out.loss) and isd.student.backbone.stage1[0].bn.weight.grad is not None


@pytest.mark.slow
def test_compiled_split_batch_norm_step_matches_eager():
    """engine.compile with shuffle-BN: one ISD step's loss and gradients, compiled vs eager."""
    import copy

    torch.manual_seed(0)
    eager = ISD(_backbone(), IsdConfig(queue_size=256))
    compiled = copy.deepcopy(eager)
    compiled.student.compile()
    compiled.teacher.compile()
    views = [torch.rand(64, 3, 16, 16) for _ in range(2)]
    outs = [m(Batch(views, torch.arange(64), torch.zeros(64), progress=0.1)) for m in (eager, compiled)]
    for out in outs:
        out.loss.backward()
    torch.testing.assert_close(outs[1].loss, outs[0].loss, rtol=1e-5, atol=1e-6)
    for (name, p), q in zip(eager.named_parameters(), compiled.parameters(), strict=True):
        if p.grad is not None:
            torch.testing.assert_close(
                q.grad, p.grad, rtol=1e-3, atol=1e-4 * p.grad.abs().max().item(), msg=name
            )
