"""Backbones: torchvision ResNets without their classifier, ViTs (CLS token), a small CNN for CPU demos,
and ``timm:NAME`` for any timm model (the optional extra ``isdretrieve[timm]``).

Every backbone maps images [B, 3, H, W] to pooled features [B, D] and carries ``feature_dim = D``.
ResNet state-dict keys are exactly torchvision's (minus ``fc.*``), so official ISD weights load directly;
ViTs are torchvision's ``VisionTransformer`` (see ``models/vit.py`` for why, and for DINO's key names).
"""

from __future__ import annotations

from torch import Tensor, nn

from isdretrieve.models.timm_backbone import TIMM_PREFIX, build_timm
from isdretrieve.models.vit import VIT_WIDTHS, build_vit
from isdretrieve.util.torchvision import import_torchvision

ARCHS = ("resnet18", "resnet50", "small_cnn", *VIT_WIDTHS)
_FEATURE_DIMS = {"resnet18": 512, "resnet50": 2048, "small_cnn": 256} | {
    a: w for a, (w, _) in VIT_WIDTHS.items()
}

# small_cnn: output widths of the 3x3 conv blocks in each stage; a 2x2 max-pool follows stages 1-3.
SMALL_CNN_STAGES: tuple[tuple[int, ...], ...] = ((32,), (64,), (128,), (256, 256))


def _check_arch(arch: str) -> None:
    if arch not in ARCHS and not is_timm(arch):
        raise ValueError(f"unknown architecture {arch!r}; choose one of: {', '.join(ARCHS)}, timm:NAME")


def is_timm(arch: str) -> bool:
    return arch.startswith(TIMM_PREFIX) and len(arch) > len(TIMM_PREFIX)


def is_vit(arch: str) -> bool:
    return arch in VIT_WIDTHS


def feature_dim(arch: str) -> int:
    """Dimension of the pooled feature that ``build_backbone(arch)`` returns (``timm:`` models: build
    one and read its ``feature_dim``)."""
    _check_arch(arch)
    if is_timm(arch):
        raise ValueError(f"the feature dimension of {arch} is known once it is built")
    return _FEATURE_DIMS[arch]


def _init_conv(conv: nn.Conv2d) -> None:
    # same init as torchvision's ResNet (and the official ISD ResNet): N(0, sqrt(2 / (k*k*out_channels)))
    nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")


class _ConvBlock(nn.Module):
    """3x3 conv (no bias) - BatchNorm - ReLU."""

    def __init__(self, in_ch: int, out_ch: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_ch, out_ch, kernel_size=3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(out_ch)
        self.relu = nn.ReLU(inplace=True)
        _init_conv(self.conv)

    def forward(self, x: Tensor) -> Tensor:
        return self.relu(self.bn(self.conv(x)))


class SmallCNN(nn.Module):
    """Four conv stages (widths 32, 64, 128, 256-256), max-pool after stages 1-3, global average pool.

    About 0.98M parameters; works from 16x16 inputs (digits) upwards. Keys read ``stage{i}.{j}.conv.weight``.
    """

    def __init__(self, stages: tuple[tuple[int, ...], ...] = SMALL_CNN_STAGES) -> None:
        super().__init__()
        in_ch = 3
        for i, widths in enumerate(stages, start=1):
            blocks = []
            for width in widths:
                blocks.append(_ConvBlock(in_ch, width))
                in_ch = width
            if i < len(stages):
                blocks.append(nn.MaxPool2d(2))
            self.add_module(f"stage{i}", nn.Sequential(*blocks))
        self.num_stages = len(stages)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.feature_dim = in_ch

    def forward(self, x: Tensor) -> Tensor:
        for i in range(1, self.num_stages + 1):
            x = getattr(self, f"stage{i}")(x)
        return self.pool(x).flatten(1)


def build_backbone(
    arch: str,
    *,
    cifar_stem: bool = False,
    image_size: int = 224,
    patch_size: int | None = None,
    depth: int | None = None,
    dynamic_size: bool = False,
    vit_init: str = "dino",
    drop_path: float = 0.0,
    pos_interpolation: str = "dino",
) -> nn.Module:
    """Build a randomly initialised backbone whose forward returns [B, model.feature_dim].

    ``cifar_stem`` (ResNets only) swaps the 7x7/2 conv1 + max-pool for a 3x3/1 conv1 and no pooling,
    the usual stem for 32x32 images. ViTs and fixed-size timm models are built for ``image_size``
    (square) with ``patch_size`` (ViTs: None = 16 from 64 px up, else 4); ``depth`` sets a ViT's number
    of blocks (None = 12). Convolutional models ignore the three. Our ViTs take other multiples of the
    patch too; ``dynamic_size`` asks the same of ``timm:`` ViTs (timm's ``dynamic_img_size``).
    ``vit_init``, ``drop_path`` and ``pos_interpolation`` shape our ViTs only (``build_vit``).
    """
    _check_arch(arch)
    if arch == "small_cnn":
        return SmallCNN()
    if is_vit(arch):
        return build_vit(
            arch,
            image_size=image_size,
            patch_size=patch_size,
            depth=depth,
            init=vit_init,
            drop_path=drop_path,
            pos_interpolation=pos_interpolation,
        )
    if is_timm(arch):
        return build_timm(arch, image_size=image_size, patch_size=patch_size, dynamic_size=dynamic_size)
    tv = import_torchvision()
    model = getattr(tv.models, arch)(weights=None)
    model.fc = nn.Identity()
    if cifar_stem:
        model.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
        _init_conv(model.conv1)
        model.maxpool = nn.Identity()
    model.feature_dim = _FEATURE_DIMS[arch]
    return model
