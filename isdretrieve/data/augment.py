"""Batched view augmentation that runs on the batch's own device (CPU or CUDA).

:func:`augment_views` makes one random view of every image of a batch with tensor ops only: a random
resized crop and horizontal flip as one ``grid_sample`` call, then colour jitter (per-sample factors and
per-sample random op order, as torchvision's ``ColorJitter``), grayscale and Gaussian blur, each applied
to the samples a Bernoulli draw selects. Every random number comes from the ``torch.Generator`` passed
in, so equal seeds give bit-identical views. The colour ops are small public functions taking one factor
per sample, so they can be checked one by one. Solarisation (DINO's second global view) follows the blur.

Views are named: ``strong`` (MoCo-v2 / ISD) and ``weak`` (crop + flip), and DINO's three
(:func:`view_config`): ``dino_global1`` and ``dino_global2`` (the asymmetric pair T1 / T2 of DINO's
global crops) and ``dino_local`` (its smaller local crops: multi-crop).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F

from isdretrieve.files.encoder_header import IMAGENET_MEAN, IMAGENET_STD

GRAY_WEIGHTS = (0.299, 0.587, 0.114)  # ITU-R 601-2 luma, as PIL's convert("L")
PRESETS = ("digits", "cifar", "imagenet")
STRENGTHS = ("strong", "weak")
DINO_VIEWS = ("dino_global1", "dino_global2", "dino_local")
VIEW_NAMES = (*STRENGTHS, *DINO_VIEWS)
PRESET_SIZES = {"digits": 16, "cifar": 32, "imagenet": 224}
SMALL_SIDE = 32  # eval views up to this side are a plain resize (digits, CIFAR)
EVAL_CROP_FRACTION = 0.875  # larger ones: shorter side to size / 0.875 (224 -> 256), centre crop
# DINO's local crops: 96 px at 224 (DINO's); ours at 32 and 16 px: half the side, so a ViT's default
# patch (4 at <= 32 px) still divides it, leaving 4 x 4 and 2 x 2 patches (DINO's ratio 96/224 is 0.43)
LOCAL_SIZES = {"digits": 8, "cifar": 16, "imagenet": 96}
DINO_GLOBAL_SCALE = (0.4, 1.0)  # DINO's default global_crops_scale (AdaSim's too)
DINO_LOCAL_SCALE = (0.05, 0.4)  # DINO's default local_crops_scale
DINO_JITTER = (0.4, 0.4, 0.2, 0.1)
CROP_TRIES = 10


@dataclass(frozen=True)
class ViewConfig:
    """Parameters of one random view; the defaults are the MoCo-v2 / ISD strong augmentation (no
    solarisation)."""

    size: int
    scale: tuple[float, float] = (0.2, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    flip_p: float = 0.5
    jitter: tuple[float, float, float, float] = (0.4, 0.4, 0.4, 0.1)  # brightness, contrast, saturation, hue
    jitter_p: float = 0.8
    gray_p: float = 0.2
    blur_p: float = 0.5
    blur_sigma: tuple[float, float] = (0.1, 2.0)
    solarize_p: float = 0.0
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD

    def __post_init__(self) -> None:
        if self.size <= 0:
            raise ValueError(f"size must be positive, got {self.size}")
        if not 0 < self.scale[0] <= self.scale[1] or not 0 < self.ratio[0] <= self.ratio[1]:
            raise ValueError(f"scale and ratio must be 0 < low <= high, got {self.scale}, {self.ratio}")
        for name in ("flip_p", "jitter_p", "gray_p", "blur_p", "solarize_p"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {getattr(self, name)}")
        if min(self.jitter) < 0 or self.jitter[3] > 0.5:
            raise ValueError(f"jitter must be >= 0 with hue <= 0.5, got {self.jitter}")

    @property
    def blur_kernel(self) -> int:
        """Gaussian kernel side: about 10% of the output size, odd (23 at 224)."""
        return blur_kernel_size(self.size)


def blur_kernel_size(size: int) -> int:
    """``int(0.1 * size)`` made odd: 23 for 224, 3 for 32, 1 (no blur) for 16."""
    k = int(0.1 * size)
    return k + 1 - k % 2


def view_config(strength: str, preset: str) -> ViewConfig:
    """The view of a preset (digits, cifar, imagenet) named ``strength`` (one of :data:`VIEW_NAMES`).

    ``strong``: MoCo-v2 (blur only at imagenet); ``weak``: crop + flip. DINO's views, as in its official
    code: ``dino_global1`` crop scale (0.4, 1), flip 0.5, colour jitter (0.4, 0.4, 0.2, 0.1) with p 0.8,
    grayscale 0.2, blur always; ``dino_global2`` the same with blur p 0.1 and solarisation p 0.2;
    ``dino_local`` crop scale (0.05, 0.4), blur p 0.5, at :data:`LOCAL_SIZES` (96 px at imagenet).
    """
    if strength not in VIEW_NAMES:
        raise ValueError(f"unknown augmentation strength '{strength}' (expected {', '.join(VIEW_NAMES)})")
    if preset not in PRESETS:
        raise ValueError(f"unknown augmentation preset '{preset}' (expected {', '.join(PRESETS)})")
    size = PRESET_SIZES[preset]
    if strength == "weak":
        return ViewConfig(size, jitter_p=0.0, gray_p=0.0, blur_p=0.0)
    if strength == "strong":
        return ViewConfig(size, blur_p=0.5 if preset == "imagenet" else 0.0)
    dino = ViewConfig(size, scale=DINO_GLOBAL_SCALE, jitter=DINO_JITTER, jitter_p=0.8, gray_p=0.2, blur_p=1.0)
    if strength == "dino_global1":
        return dino
    if strength == "dino_global2":
        return replace(dino, blur_p=0.1, solarize_p=0.2)
    return replace(dino, size=LOCAL_SIZES[preset], scale=DINO_LOCAL_SCALE, blur_p=0.5)


def size_groups(views: Sequence[ViewConfig]) -> list[list[int]]:
    """Positions of the views that share a size, one list per size in the order the sizes first appear:
    ``[[0, 1], [2, 3]]`` for two global views and two local ones."""
    groups: dict[int, list[int]] = {}
    for position, view in enumerate(views):
        groups.setdefault(view.size, []).append(position)
    return list(groups.values())


def to_float(images: torch.Tensor) -> torch.Tensor:
    """uint8 images to float32 in [0, 1]; float images are taken to be in [0, 1] already."""
    if images.dtype == torch.uint8:
        return images.to(torch.float32).div_(255.0)
    return images.to(torch.float32)


def normalize(images_float01: torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
    """``(x - mean) / std`` per channel, for [3,H,W] or [B,3,H,W] images."""
    x = images_float01
    m = constant(mean, x.device, x.dtype).view(-1, 1, 1)
    s = constant(std, x.device, x.dtype).view(-1, 1, 1)
    return (x - m) / s


def constant(
    values: tuple[float, ...], device: torch.device, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """``torch.tensor(values)`` on ``device``, made once per (values, device, dtype); do not modify it.

    Copying Python numbers to a GPU waits for all the work queued before it (a host sync), so the
    per-batch paths reuse one copy. Inside ``torch.compile`` it is a constant of the graph instead.
    """
    if torch.compiler.is_compiling():
        return torch.tensor(values, dtype=dtype, device=device)
    return _cached_constant(tuple(values), torch.device(device), dtype)


@functools.lru_cache(maxsize=64)
def _cached_constant(values: tuple[float, ...], device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    with torch.inference_mode(False):  # a normal tensor even when first asked for under inference mode
        return torch.tensor(values, dtype=dtype, device=device)


def _uniform(generator: torch.Generator, shape: tuple[int, ...], low: float, high: float) -> torch.Tensor:
    u = torch.rand(shape, generator=generator, device=generator.device)
    return low + (high - low) * u


def sample_crop_boxes(
    batch: int,
    height: int,
    width: int,
    scale: tuple[float, float],
    ratio: tuple[float, float],
    generator: torch.Generator,
) -> torch.Tensor:
    """Random-resized-crop boxes as int64 [B,4] ``(top, left, h, w)``, as torchvision samples them.

    Area fraction ~ U(scale), log aspect ~ U(log ratio), first of 10 tries that fits; else the centre crop
    of the whole image clamped to the ratio range.
    """
    area = height * width
    frac = _uniform(generator, (batch, CROP_TRIES), scale[0], scale[1])
    aspect = torch.exp(_uniform(generator, (batch, CROP_TRIES), math.log(ratio[0]), math.log(ratio[1])))
    pos = torch.rand((batch, 2), generator=generator, device=generator.device)
    w = torch.round(torch.sqrt(area * frac * aspect))
    h = torch.round(torch.sqrt(area * frac / aspect))
    fits = (w > 0) & (w <= width) & (h > 0) & (h <= height)
    first = fits.float().argmax(dim=1, keepdim=True)  # index of the first try that fits
    found = fits.any(dim=1)
    in_ratio = width / height
    if in_ratio < ratio[0]:
        fallback_w, fallback_h = width, round(width / ratio[0])
    elif in_ratio > ratio[1]:
        fallback_w, fallback_h = round(height * ratio[1]), height
    else:
        fallback_w, fallback_h = width, height
    w = torch.where(found, w.gather(1, first).squeeze(1), float(fallback_w))
    h = torch.where(found, h.gather(1, first).squeeze(1), float(fallback_h))
    top = torch.minimum(torch.floor(pos[:, 0] * (height - h + 1)), height - h)
    left = torch.minimum(torch.floor(pos[:, 1] * (width - w + 1)), width - w)
    top = torch.where(found, top, torch.div(height - h, 2, rounding_mode="floor"))
    left = torch.where(found, left, torch.div(width - w, 2, rounding_mode="floor"))
    return torch.stack([top, left, h, w], dim=1).to(torch.int64)


def resized_crop(images: torch.Tensor, boxes: torch.Tensor, size: int, flip: torch.Tensor) -> torch.Tensor:
    """Crop float images to their boxes, resize to ``size``, mirror where ``flip``: one grid_sample call."""
    b, _, height, width = images.shape
    top, left, h, w = boxes.to(device=images.device, dtype=images.dtype).unbind(1)
    sx, sy = w / width, h / height
    sx = torch.where(flip.to(images.device), -sx, sx)
    theta = torch.zeros((b, 2, 3), dtype=images.dtype, device=images.device)
    theta[:, 0, 0] = sx
    theta[:, 0, 2] = (2 * left + w) / width - 1
    theta[:, 1, 1] = sy
    theta[:, 1, 2] = (2 * top + h) / height - 1
    grid = F.affine_grid(theta, [b, 3, size, size], align_corners=False)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="border", align_corners=False)


def _per_sample(factor: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return factor.to(device=x.device, dtype=x.dtype).view(-1, 1, 1, 1)


def _blend(x: torch.Tensor, other: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    f = _per_sample(factor, x)
    return (x * f + other * (1.0 - f)).clamp_(0.0, 1.0)


def rgb_to_grayscale(images: torch.Tensor) -> torch.Tensor:
    """Luma of float [B,3,H,W] images as [B,1,H,W] (weights 0.299, 0.587, 0.114)."""
    r, g, b = images.unbind(dim=-3)
    return (GRAY_WEIGHTS[0] * r + GRAY_WEIGHTS[1] * g + GRAY_WEIGHTS[2] * b).unsqueeze(-3)


def adjust_brightness(images: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """Multiply each image by its factor, clamped to [0, 1]."""
    return (images * _per_sample(factor, images)).clamp_(0.0, 1.0)


def adjust_contrast(images: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """Blend each image with the mean of its grayscale."""
    mean = rgb_to_grayscale(images).mean(dim=(-3, -2, -1), keepdim=True)
    return _blend(images, mean, factor)


def adjust_saturation(images: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """Blend each image with its grayscale."""
    return _blend(images, rgb_to_grayscale(images), factor)


def adjust_hue(images: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """Rotate each image's hue by its shift (in turns, e.g. -0.1..0.1) via RGB -> HSV -> RGB."""
    r, g, b = images.unbind(dim=-3)
    maxc, _ = images.max(dim=-3)
    minc, _ = images.min(dim=-3)
    delta = maxc - minc
    sat = torch.where(maxc > 0, delta / torch.where(maxc > 0, maxc, 1.0), 0.0)
    safe = torch.where(delta > 0, delta, 1.0)
    hue = torch.where(
        maxc == r,
        (g - b) / safe,
        torch.where(maxc == g, 2.0 + (b - r) / safe, 4.0 + (r - g) / safe),
    )
    hue = torch.where(delta > 0, hue / 6.0, 0.0)
    hue6 = torch.remainder(hue + shift.to(device=images.device, dtype=images.dtype).view(-1, 1, 1), 1.0) * 6
    # closed form of HSV -> RGB: c_n = v - v s clamp(min(k, 4 - k), 0, 1), k = (n + 6h) mod 6, n = 5, 3, 1
    out = []
    for n in (5.0, 3.0, 1.0):
        k = torch.remainder(n + hue6, 6.0)
        out.append(maxc - maxc * sat * torch.minimum(k, 4.0 - k).clamp(0.0, 1.0))
    return torch.stack(out, dim=-3)


def grayscale(images: torch.Tensor) -> torch.Tensor:
    """Grayscale replicated to 3 channels."""
    return rgb_to_grayscale(images).expand_as(images)


def gaussian_blur(images: torch.Tensor, sigma: torch.Tensor, kernel_size: int) -> torch.Tensor:
    """Blur each image with its own sigma: separable depthwise convolution, reflect padding."""
    b, c, h, w = images.shape
    pad = min(kernel_size // 2, h - 1, w - 1)
    kernel_size = 2 * pad + 1
    if kernel_size == 1:
        return images
    t = torch.arange(kernel_size, device=images.device, dtype=images.dtype) - pad
    s = sigma.to(device=images.device, dtype=images.dtype).view(-1, 1)
    kernel = torch.exp(-0.5 * (t / s) ** 2)
    kernel = (kernel / kernel.sum(dim=1, keepdim=True)).repeat_interleave(c, dim=0)  # [B*C, k]
    x = F.pad(images.reshape(1, b * c, h, w), (pad, pad, pad, pad), mode="reflect")
    x = F.conv2d(x, kernel.view(b * c, 1, 1, kernel_size), groups=b * c)
    x = F.conv2d(x, kernel.view(b * c, 1, kernel_size, 1), groups=b * c)
    return x.reshape(b, c, h, w)


def solarize(images: torch.Tensor) -> torch.Tensor:
    """Invert the pixels at or above half intensity: x -> 1 - x where x >= 0.5, on [0, 1] floats (PIL's
    ``ImageOps.solarize`` at its default threshold 128 on uint8: 128/255 is the first level >= 0.5)."""
    return torch.where(images >= 0.5, 1.0 - images, images)


def _masked(mask: torch.Tensor, changed: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return torch.where(mask.to(x.device).view(-1, 1, 1, 1), changed, x)


def color_jitter(
    images: torch.Tensor,
    factors: torch.Tensor,
    order: torch.Tensor,
    apply: torch.Tensor,
    strengths: tuple[float, float, float, float],
    gather: bool | None = None,
) -> torch.Tensor:
    """Brightness, contrast, saturation, hue with per-sample ``factors`` [B,4] in per-sample ``order`` [B,4].

    Only samples where ``apply`` [B] is true change; ops whose strength is 0 are skipped. With ``gather``
    (the default on CPU) each op runs only on the samples that take it at that position, a quarter of the
    op evaluations; without it (the default elsewhere) each op runs on the whole batch and a mask keeps its
    result where it applies, which needs no host sync on a GPU. Both give the same values.
    """
    ops: list[Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = [
        adjust_brightness,
        adjust_contrast,
        adjust_saturation,
        adjust_hue,
    ]
    factors, order, apply = (t.to(images.device) for t in (factors, order, apply))
    gather = images.device.type == "cpu" if gather is None else gather
    x = images.clone() if gather else images
    for step in range(4):
        for op_index, op in enumerate(ops):
            if strengths[op_index] <= 0:
                continue
            mask = apply & (order[:, step] == op_index)
            if gather:
                rows = mask.nonzero().squeeze(1)
                if len(rows):
                    x[rows] = op(x[rows], factors[rows, op_index])
            else:
                x = _masked(mask, op(x, factors[:, op_index]), x)
    return x


def augment_views(
    images: torch.Tensor,
    cfg: ViewConfig,
    generator: torch.Generator,
    *,
    compiled: bool = False,
    cropped: bool = False,
) -> torch.Tensor:
    """One random view per image: uint8 (or [0,1] float) [B,3,H,W] -> normalised float32 [B,3,size,size].

    ``generator`` must live on ``images.device``; equal generator states give identical views. With
    ``compiled`` the photometric part (jitter in its masked form, grayscale, blur, normalisation: a few
    hundred small elementwise ops) runs through ``torch.compile``, which fuses them; the random draws and
    the crop stay eager, so the same generator state gives the same view up to float rounding. With
    ``cropped`` the images are random resized crops already (taken from the originals in loader workers,
    :mod:`isdretrieve.data.crops`), [B,3,size,size]: only the flip and the photometric ops are applied.
    The random draws come in a fixed order (crop boxes unless ``cropped``, flip, jitter, grayscale,
    blur, then solarisation only where ``cfg.solarize_p > 0``).
    """
    b, _, height, width = images.shape
    if cropped and (height, width) != (cfg.size, cfg.size):
        raise ValueError(f"cropped images must be {cfg.size}x{cfg.size}, got {height}x{width}")
    bright, contrast, sat, hue = cfg.jitter
    device = images.device

    def draw(*shape: int) -> torch.Tensor:
        return torch.rand(shape, generator=generator, device=generator.device).to(device)

    if not cropped:
        boxes = sample_crop_boxes(b, height, width, cfg.scale, cfg.ratio, generator).to(device)
    flip = draw(b) < cfg.flip_p
    jitter_on = draw(b) < cfg.jitter_p
    low = constant((max(0.0, 1 - bright), max(0.0, 1 - contrast), max(0.0, 1 - sat), -hue), device)
    high = constant((1 + bright, 1 + contrast, 1 + sat, hue), device)
    factors = low + (high - low) * draw(b, 4)
    order = draw(b, 4).argsort(dim=1)
    gray_on = draw(b) < cfg.gray_p
    blur_on = draw(b) < cfg.blur_p
    sigma = cfg.blur_sigma[0] + (cfg.blur_sigma[1] - cfg.blur_sigma[0]) * draw(b)
    # drawn last and only when used, so views without solarisation keep their random stream
    solarize_on = draw(b) < cfg.solarize_p if cfg.solarize_p > 0 else None
    if cropped:
        x = to_float(images)
        x = torch.where(flip.view(-1, 1, 1, 1), x.flip(-1), x)
    else:
        x = resized_crop(to_float(images), boxes, cfg.size, flip)  # one grid_sample: nothing to fuse
    colour = _compiled_colour() if compiled else _colour
    gather = False if compiled else None  # gathering needs data-dependent shapes: not in a compiled graph
    return colour(x, cfg, factors, order, jitter_on, gray_on, blur_on, sigma, solarize_on, gather)


def _colour(
    x: torch.Tensor,
    cfg: ViewConfig,
    factors: torch.Tensor,
    order: torch.Tensor,
    jitter_on: torch.Tensor,
    gray_on: torch.Tensor,
    blur_on: torch.Tensor,
    sigma: torch.Tensor,
    solarize_on: torch.Tensor | None,
    gather: bool | None,
) -> torch.Tensor:
    """The photometric part of :func:`augment_views`, its random draws given: jitter, grayscale, blur,
    solarisation, normalisation."""
    if cfg.jitter_p > 0 and max(cfg.jitter) > 0:
        x = color_jitter(x, factors, order, jitter_on, cfg.jitter, gather=gather)
    if cfg.gray_p > 0:
        x = _masked(gray_on, grayscale(x), x)
    if cfg.blur_p > 0 and cfg.blur_kernel > 1:
        x = _masked(blur_on, gaussian_blur(x, sigma, cfg.blur_kernel), x)
    if solarize_on is not None:
        x = _masked(solarize_on, solarize(x), x)
    return normalize(x, cfg.mean, cfg.std)


@functools.cache
def _compiled_colour() -> Callable[..., torch.Tensor]:
    """:func:`_colour` under ``torch.compile`` (fixed shapes; one graph per view config and shape)."""
    return torch.compile(_colour, dynamic=False)


def _resize_center_crop(x: torch.Tensor, resize: int, crop: int) -> torch.Tensor:
    h, w = x.shape[-2:]
    if min(h, w) != resize:
        nh, nw = (resize, int(resize * w / h)) if h <= w else (int(resize * h / w), resize)
        x = F.interpolate(x, size=(nh, nw), mode="bilinear", align_corners=False, antialias=True)
        h, w = nh, nw
    top, left = int(round((h - crop) / 2)), int(round((w - crop) / 2))
    return x[..., top : top + crop, left : left + crop]


def eval_side(size: int) -> int:
    """The shorter side an eval view resizes to before its centre crop of ``size``: ``size`` itself up to
    32 px (digits, CIFAR), else ``size / 0.875`` (256 for 224, torchvision's ImageNet evaluation)."""
    return size if size <= SMALL_SIDE else round(size / EVAL_CROP_FRACTION)


def eval_transform(
    images: torch.Tensor, size: int, mean: tuple[float, ...], std: tuple[float, ...]
) -> torch.Tensor:
    """Deterministic eval transform: [B,3,H,W] -> normalised float32 [B,3,size,size]: unless the input is
    ``size`` x ``size`` already, the shorter side resized to :func:`eval_side` and a centre crop."""
    x = to_float(images)
    if tuple(x.shape[-2:]) != (size, size):
        x = _resize_center_crop(x, eval_side(size), size)
    return normalize(x, mean, std)


def eval_view(images: torch.Tensor, preset: str) -> torch.Tensor:
    """:func:`eval_transform` at a preset's size with ImageNet mean/std (digits/cifar: resize + centre crop
    only if the size differs; imagenet: shorter side to 256 and centre crop 224 unless 224 x 224)."""
    if preset not in PRESETS:
        raise ValueError(f"unknown augmentation preset '{preset}' (expected {', '.join(PRESETS)})")
    return eval_transform(images, PRESET_SIZES[preset], IMAGENET_MEAN, IMAGENET_STD)
