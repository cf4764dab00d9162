"""Backbones and heads: shapes, key names, feature dims."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from isdretrieve.models.backbones import ARCHS, build_backbone, feature_dim
from isdretrieve.models.heads import isd_base_predictor, projection_mlp
from isdretrieve.util.torchvision import import_torchvision


@pytest.mark.parametrize(
    ("arch", "cifar_stem", "size"),
    [
        ("resnet18", True, 32),
        ("resnet18", False, 64),
        ("resnet50", False, 64),
        ("small_cnn", False, 16),
        ("small_cnn", False, 32),
    ],
)
def test_output_shape_and_feature_dim(arch: str, cifar_stem: bool, size: int) -> None:
    model = build_backbone(arch, cifar_stem=cifar_stem).eval()
    with torch.no_grad():
        out = model(torch.randn(2, 3, size, size))
    assert out.shape == (2, feature_dim(arch))
    assert model.feature_dim == feature_dim(arch)


def test_feature_dims() -> None:
    assert [feature_dim(a) for a in ARCHS] == [512, 2048, 256, 192, 384, 768]


def test_unknown_arch_lists_choices() -> None:
    with pytest.raises(ValueError, match="resnet18, resnet50, small_cnn"):
        build_backbone("vgg11")
    with pytest.raises(ValueError, match="choose one of"):
        feature_dim("resnet34")


@pytest.mark.parametrize("cifar_stem", [False, True])
def test_resnet18_keys_are_torchvision_minus_fc(cifar_stem: bool) -> None:
    reference = import_torchvision().models.resnet18(weights=None)
    expected = {k: v.shape for k, v in reference.state_dict().items() if not k.startswith("fc.")}
    model = build_backbone("resnet18", cifar_stem=cifar_stem)
    got = {k: v.shape for k, v in model.state_dict().items()}
    assert list(got) == list(expected)
    assert isinstance(model.fc, nn.Identity)
    if cifar_stem:
        assert got.pop("conv1.weight") == (64, 3, 3, 3)
        expected.pop("conv1.weight")
        assert model.conv1.stride == (1, 1) and model.conv1.padding == (1, 1) and model.conv1.bias is None
        assert isinstance(model.maxpool, nn.Identity)
    assert got == expected


def test_cifar_stem_keeps_resolution() -> None:
    model = build_backbone("resnet18", cifar_stem=True).eval()
    with torch.no_grad():
        stem = model.maxpool(model.relu(model.bn1(model.conv1(torch.randn(1, 3, 32, 32)))))
    assert stem.shape == (1, 64, 32, 32)


def test_small_cnn_size_and_keys() -> None:
    model = build_backbone("small_cnn", cifar_stem=True)  # the stem flag is ignored
    n_params = sum(p.numel() for p in model.parameters())
    assert 400_000 <= n_params <= 1_500_000
    keys = model.state_dict()
    assert "stage1.0.conv.weight" in keys and "stage4.1.bn.running_var" in keys
    assert not any(k.startswith(("conv1.", "layer")) for k in keys)


def test_small_cnn_trains() -> None:
    model = build_backbone("small_cnn")
    out = model(torch.randn(4, 3, 16, 16))
    out.pow(2).mean().backward()
    assert all(p.grad is not None for p in model.parameters())


def test_projection_mlp_keys() -> None:
    head = projection_mlp(512, 1024, 128)
    shapes = {k: tuple(v.shape) for k, v in head.state_dict().items()}
    assert shapes == {
        "0.weight": (1024, 512),
        "0.bias": (1024,),
        "1.weight": (1024,),
        "1.bias": (1024,),
        "1.running_mean": (1024,),
        "1.running_var": (1024,),
        "1.num_batches_tracked": (),
        "3.weight": (128, 1024),
        "3.bias": (128,),
    }
    assert head(torch.randn(4, 512)).shape == (4, 128)


def test_isd_base_predictor_keys() -> None:
    head = isd_base_predictor(512)
    shapes = {k: tuple(v.shape) for k, v in head.state_dict().items()}
    assert shapes == {
        "0.weight": (512, 512),
        "1.weight": (512,),
        "1.bias": (512,),
        "1.running_mean": (512,),
        "1.running_var": (512,),
        "1.num_batches_tracked": (),
        "3.weight": (512, 512),
        "3.bias": (512,),
    }
    assert isinstance(head[2], nn.ReLU)
    assert head(torch.randn(4, 512)).shape == (4, 512)


@pytest.mark.parametrize(("arch", "width"), [("vit_tiny", 192), ("vit_small", 384), ("vit_base", 768)])
def test_vit_sizes_and_torchvision_keys(arch: str, width: int) -> None:
    model = build_backbone(arch, image_size=32, patch_size=4, depth=1).eval()
    heads = {"vit_tiny": 3, "vit_small": 6, "vit_base": 12}[arch]
    reference = import_torchvision().models.VisionTransformer(32, 4, 1, heads, width, 4 * width)
    expected = {k: v.shape for k, v in reference.state_dict().items() if not k.startswith("heads.")}
    assert {k: v.shape for k, v in model.state_dict().items()} == expected
    assert model.encoder.layers[0].self_attention.num_heads == heads
    with torch.no_grad():
        assert model(torch.randn(2, 3, 32, 32)).shape == (2, width) == (2, model.feature_dim)


def test_vit_default_patch_follows_the_image_size() -> None:
    assert build_backbone("vit_tiny", image_size=224, depth=1).patch_size == 16
    assert build_backbone("vit_tiny", image_size=32, depth=1).patch_size == 4
