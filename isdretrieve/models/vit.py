"""Vision Transformers: torchvision's ``VisionTransformer`` with DINO's sizes, returning the CLS token.

Why torchvision and not timm: torchvision is already a core dependency while timm is an optional extra
(``isdretrieve[timm]``), so ``vit_tiny`` / ``vit_small`` / ``vit_base`` work on a bare install; torchvision's
class takes any image size and patch (fixed per model, which the encoder header records), and our
exports keep torchvision key names as the ResNets do. DINO / AdaSim / timm checkpoints use timm's key
names; :func:`timm_to_torchvision` renames them (a fixed one-to-one table, the tensors unchanged), so
official weights load strictly without timm installed.

Sizes (DINO's): tiny 192 wide / 3 heads, small 384 / 6, base 768 / 12; MLP 4x wide, 12 blocks by default,
LayerNorm eps 1e-6. Features are the CLS token after the final LayerNorm, as DINO's evaluation takes them.

Other input sizes (DINO's local crops): torchvision's class accepts only its own image size, so ours
runs torchvision's forward at that size and, at any other multiple of the patch, the same steps with
the position embedding's patch grid interpolated bicubically to the input's grid
(:func:`resize_pos_embedding`: DINO's scale factor (grid + 0.1) / G by default); the class token's entry
is kept. Parameters and keys are torchvision's.

DINO's training options (``build_vit``'s ``init``, ``drop_path``, ``pos_interpolation``): the official
initialisation (:func:`dino_init_`), stochastic depth (:class:`DropPath`, rates rising linearly over
the blocks from 0 to ``drop_path``, active in train mode only) and the position-embedding interpolation.
"""

from __future__ import annotations

import functools
import math
import re

import torch
import torch.nn.functional as F
from torch import nn

from isdretrieve.util.torchvision import import_torchvision

VIT_WIDTHS = {"vit_tiny": (192, 3), "vit_small": (384, 6), "vit_base": (768, 12)}  # arch: (width, heads)
VIT_DEPTH = 12
MLP_RATIO = 4
VIT_INITS = ("dino", "torchvision")  # DINO's trunc-normal 0.02 init, or torchvision's own
POS_INTERPOLATIONS = ("dino", "resize")  # DINO's (grid + 0.1) / G scale factor, or resize to the grid


def default_patch(image_size: int) -> int:
    """Patch 16 for ImageNet-size images (224 -> 14 x 14 tokens), 4 for 32 px and smaller (32 -> 8 x 8)."""
    return 16 if image_size >= 64 else 4


def build_vit(
    arch: str,
    *,
    image_size: int,
    patch_size: int | None = None,
    depth: int | None = None,
    drop_path: float = 0.0,
    init: str = "dino",
    pos_interpolation: str = "dino",
) -> nn.Module:
    """A random-init ViT whose forward returns the final-norm CLS token [B, width].

    ``init``: ``dino`` (DINO's :func:`dino_init_`) or ``torchvision`` (torchvision's own). ``drop_path``:
    DINO's stochastic depth rate of the last block (0 = none). ``pos_interpolation``: how the position
    embedding meets another grid, ``dino`` or ``resize`` (:func:`resize_pos_embedding`)."""
    width, heads = VIT_WIDTHS[arch]
    patch = patch_size or default_patch(image_size)
    if patch < 1 or image_size % patch:
        raise ValueError(f"{arch}: image size {image_size} is not a multiple of the patch size {patch}")
    depth = depth or VIT_DEPTH
    if depth < 1:
        raise ValueError(f"{arch}: depth must be positive, got {depth}")
    if init not in VIT_INITS or pos_interpolation not in POS_INTERPOLATIONS:
        raise ValueError(f"{arch}: unknown init {init!r} or position interpolation {pos_interpolation!r}")
    if not 0 <= drop_path < 1:
        raise ValueError(f"{arch}: drop_path must be in [0, 1), got {drop_path}")
    model = _vit_class()(
        image_size=image_size,
        patch_size=patch,
        num_layers=depth,
        num_heads=heads,
        hidden_dim=width,
        mlp_dim=MLP_RATIO * width,
    )
    model.heads = nn.Identity()
    model.feature_dim = width
    model.pos_interpolation = pos_interpolation
    model.drop_paths = nn.ModuleList(DropPath(rate) for rate in drop_path_rates(drop_path, depth))
    if init == "dino":
        dino_init_(model)
    return model


def dino_init_(vit: nn.Module) -> None:
    """DINO's initialisation of a ViT (``VisionTransformer._init_weights``): every Linear weight, the
    qkv projection (torchvision's ``in_proj_weight``), the class token and the position embedding
    from a normal of std 0.02 truncated at ±2; Linear and qkv biases 0; LayerNorms 1 / 0. DINO's patch
    embedding is a plain ``nn.Conv2d`` that its init skips, so ours gets PyTorch's default conv init."""
    nn.init.trunc_normal_(vit.encoder.pos_embedding, std=0.02)
    nn.init.trunc_normal_(vit.class_token, std=0.02)
    vit.conv_proj.reset_parameters()
    for module in vit.modules():
        if isinstance(module, nn.Linear):
            nn.init.trunc_normal_(module.weight, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.MultiheadAttention):
            nn.init.trunc_normal_(module.in_proj_weight, std=0.02)
            nn.init.zeros_(module.in_proj_bias)
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)


def drop_path_rates(rate: float, depth: int) -> list[float]:
    """DINO's stochastic depth decay rule: block i of ``depth`` drops its paths with probability
    ``linspace(0, rate, depth)[i]``."""
    return [x.item() for x in torch.linspace(0, rate, depth)]


class DropPath(nn.Module):
    """DINO's stochastic depth of a residual branch: in train mode each sample's branch is dropped
    with probability ``p`` and kept ones are scaled by 1 / (1 − p); the identity in eval mode or at
    p = 0. The mask is floor(1 − p + U[0, 1)) from the global random stream, as in DINO."""

    def __init__(self, p: float) -> None:
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.p == 0 or not self.training:
            return x
        keep = 1 - self.p
        mask = (
            keep + torch.rand((x.shape[0],) + (1,) * (x.ndim - 1), dtype=x.dtype, device=x.device)
        ).floor_()
        return x.div(keep) * mask

    def extra_repr(self) -> str:
        return f"p={self.p}"


def disable_drop_path(module: nn.Module) -> None:
    """Stochastic depth off in every ViT inside ``module`` (DINO's teacher is built without it)."""
    for child in module.modules():
        if isinstance(child, DropPath):
            child.p = 0.0


def resize_pos_embedding(pos: torch.Tensor, grid: tuple[int, int], mode: str = "dino") -> torch.Tensor:
    """A ViT position embedding [1, 1 + G*G, D] (class token first, then a square G x G patch grid) for a
    ``grid`` (h, w) of patches: the patch part interpolated bicubically (align_corners False, no
    antialias), the class token's entry as it is. Returned unchanged when the grid is G x G already.

    ``mode: dino`` is DINO's ``interpolate_pos_encoding``: the scale factor (h + 0.1) / G, (w + 0.1) / G,
    so output row i samples the source at (i + 0.5) · G / (h + 0.1) − 0.5. ``mode: resize`` resizes to
    the grid (scale h / G; timm's ``dynamic_img_size`` without its antialiasing)."""
    side = math.isqrt(pos.shape[1] - 1)
    if tuple(grid) == (side, side):
        return pos
    cls, patches = pos[:, :1], pos[:, 1:]
    patches = patches.reshape(1, side, side, -1).permute(0, 3, 1, 2).float()
    if mode == "dino":
        scale = ((grid[0] + 0.1) / side, (grid[1] + 0.1) / side)
        patches = F.interpolate(patches, scale_factor=scale, mode="bicubic", align_corners=False)
    else:
        patches = F.interpolate(patches, size=tuple(grid), mode="bicubic", align_corners=False)
    if tuple(patches.shape[-2:]) != tuple(grid):  # pragma: no cover - the + 0.1 keeps floor() exact
        raise ValueError(f"position embedding interpolated to {tuple(patches.shape[-2:])}, not {grid}")
    patches = patches.to(pos.dtype).permute(0, 2, 3, 1).reshape(1, grid[0] * grid[1], -1)
    return torch.cat([cls, patches], dim=1)


def _block_forward(block: nn.Module, x: torch.Tensor, drop: DropPath) -> torch.Tensor:
    """torchvision's ``EncoderBlock.forward`` with DINO's drop path on both residual branches."""
    y = block.ln_1(x)
    y, _ = block.self_attention(y, y, y, need_weights=False)
    x = x + drop(block.dropout(y))
    return x + drop(block.mlp(block.ln_2(x)))


@functools.cache
def _vit_class() -> type[nn.Module]:
    """torchvision's ``VisionTransformer`` taking any input size that is a multiple of the patch
    (built on first use: torchvision is imported lazily)."""
    tv = import_torchvision()

    class VisionTransformer(tv.models.VisionTransformer):
        pos_interpolation = "dino"
        drop_paths: nn.ModuleList

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            height, width = x.shape[-2:]
            dropping = self.training and any(drop.p > 0 for drop in self.drop_paths)
            if height == width == self.image_size and not dropping:
                return super().forward(x)  # torchvision's own forward, bit for bit
            p = self.patch_size
            if height % p or width % p:
                raise ValueError(f"input {height}x{width} is not a multiple of the ViT patch size {p}")
            n = x.shape[0]
            x = self.conv_proj(x)  # torchvision's steps, the position embedding interpolated
            grid = (x.shape[-2], x.shape[-1])
            x = x.reshape(n, self.hidden_dim, grid[0] * grid[1]).permute(0, 2, 1)
            x = torch.cat([self.class_token.expand(n, -1, -1), x], dim=1)
            encoder = self.encoder
            x = encoder.dropout(x + resize_pos_embedding(encoder.pos_embedding, grid, self.pos_interpolation))
            if dropping:
                for block, drop in zip(encoder.layers, self.drop_paths, strict=True):
                    x = _block_forward(block, x, drop)
            else:
                x = encoder.layers(x)
            return self.heads(encoder.ln(x)[:, 0])

    return VisionTransformer


# ------------------------------------------------------------------------------------------- weights
_BLOCK = "encoder.layers.encoder_layer_{}."
_BLOCK_PARTS = {
    "norm1.": "ln_1.",
    "attn.qkv.weight": "self_attention.in_proj_weight",
    "attn.qkv.bias": "self_attention.in_proj_bias",
    "attn.proj.": "self_attention.out_proj.",
    "norm2.": "ln_2.",
    "mlp.fc1.": "mlp.0.",
    "mlp.fc2.": "mlp.3.",
}
_TOP = {
    "cls_token": "class_token",
    "pos_embed": "encoder.pos_embedding",
    "patch_embed.proj.weight": "conv_proj.weight",
    "patch_embed.proj.bias": "conv_proj.bias",
    "norm.weight": "encoder.ln.weight",
    "norm.bias": "encoder.ln.bias",
}
_BLOCK_KEY = re.compile(r"blocks\.(\d+)\.(.+)")
_LAYER_KEY = re.compile(r"encoder\.layers\.encoder_layer_(\d+)\.")


def is_timm_vit_state(state: dict[str, torch.Tensor]) -> bool:
    """Keys in timm / DINO naming (``cls_token``, ``blocks.N.*``)."""
    return "cls_token" in state and any(k.startswith("blocks.") for k in state)


def timm_to_torchvision(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename a timm / DINO ViT state dict to torchvision's names; keys without a counterpart stay as
    they are (so a strict load reports them). qkv is [3D, D] in q, k, v order in both, as is in_proj."""
    out = {}
    for key, value in state.items():
        match = _BLOCK_KEY.fullmatch(key)
        if match:
            block, rest = match.groups()
            for old, new in _BLOCK_PARTS.items():
                if rest.startswith(old):
                    key = _BLOCK.format(block) + new + rest[len(old) :]
                    break
        else:
            key = _TOP.get(key, key)
        out[key] = value
    return out


def vit_shape(state: dict[str, torch.Tensor]) -> tuple[str, int, int, int] | None:
    """(arch, patch, image size, depth) read off torchvision-named ViT weights, None if not a ViT or
    its width is not one of ours. Image size = sqrt(tokens - 1) * patch, from the position embedding."""
    cls, proj, pos = (
        state.get("class_token"),
        state.get("conv_proj.weight"),
        state.get("encoder.pos_embedding"),
    )
    if cls is None or proj is None or pos is None:
        return None
    width = int(cls.shape[-1])
    arch = next((name for name, (w, _) in VIT_WIDTHS.items() if w == width), None)
    if arch is None:
        return None
    patch = int(proj.shape[-1])
    grid = math.isqrt(int(pos.shape[1]) - 1)
    depth = len({m.group(1) for k in state if (m := _LAYER_KEY.match(k))})
    return arch, patch, grid * patch, depth
