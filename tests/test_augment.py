"""Batched view augmentation: shapes, determinism, crop boxes, flips, colour ops against torchvision."""

from __future__ import annotations

import importlib
import math
from dataclasses import replace
from types import ModuleType

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps

from isdretrieve.data import augment as A
from isdretrieve.data.augment import ViewConfig, augment_views, eval_view, normalize, view_config
from isdretrieve.util.torchvision import import_torchvision

MEAN = torch.tensor(A.IMAGENET_MEAN).view(1, 3, 1, 1)
STD = torch.tensor(A.IMAGENET_STD).view(1, 3, 1, 1)


@pytest.fixture(scope="module")
def tvf() -> ModuleType:
    import_torchvision()
    return importlib.import_module("torchvision.transforms.v2.functional")


@pytest.fixture
def tv_gray_weights(monkeypatch: pytest.MonkeyPatch) -> None:
    """torchvision's tensor grayscale uses 0.2989 for red (PIL and we use 0.299): match it for the oracle."""
    monkeypatch.setattr(A, "GRAY_WEIGHTS", (0.2989, 0.587, 0.114))


def _images(b: int = 6, h: int = 20, w: int = 20, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (b, 3, h, w), generator=g, dtype=torch.uint8)


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _unnormalize(x: torch.Tensor) -> torch.Tensor:
    return x * STD + MEAN


def test_presets() -> None:
    assert [view_config("strong", p).size for p in A.PRESETS] == [16, 32, 224]
    strong = view_config("strong", "imagenet")
    assert (strong.scale, strong.jitter, strong.jitter_p, strong.gray_p) == (
        (0.2, 1.0),
        (0.4, 0.4, 0.4, 0.1),
        0.8,
        0.2,
    )
    assert strong.blur_p == 0.5 and strong.blur_kernel == 23 and strong.flip_p == 0.5
    assert view_config("strong", "cifar").blur_p == 0 and view_config("strong", "digits").blur_p == 0
    weak = view_config("weak", "cifar")
    assert (weak.jitter_p, weak.gray_p, weak.blur_p, weak.flip_p, weak.scale) == (0, 0, 0, 0.5, (0.2, 1.0))
    with pytest.raises(ValueError, match="strong, weak"):
        view_config("medium", "cifar")
    with pytest.raises(ValueError, match="digits, cifar, imagenet"):
        view_config("strong", "mnist")
    with pytest.raises(ValueError, match="blur_p"):
        ViewConfig(32, blur_p=1.5)


def test_dino_presets() -> None:
    """DINO's global views T1 / T2 and its local crops, as its official code sets them; local sides 96
    (DINO's) and ours at the small presets."""
    for preset, size, local in (("digits", 16, 8), ("cifar", 32, 16), ("imagenet", 224, 96)):
        g1, g2, loc = (view_config(name, preset) for name in A.DINO_VIEWS)
        for view in (g1, g2, loc):
            assert (view.jitter, view.jitter_p, view.gray_p, view.flip_p) == (
                (0.4, 0.4, 0.2, 0.1),
                0.8,
                0.2,
                0.5,
            )
            assert (view.blur_sigma, view.ratio) == ((0.1, 2.0), (3 / 4, 4 / 3))
        assert (g1.size, g1.scale, g1.blur_p, g1.solarize_p) == (size, (0.4, 1.0), 1.0, 0.0)
        assert (g2.size, g2.scale, g2.blur_p, g2.solarize_p) == (size, (0.4, 1.0), 0.1, 0.2)
        assert (loc.size, loc.scale, loc.blur_p, loc.solarize_p) == (local, (0.05, 0.4), 0.5, 0.0)
    assert view_config("strong", "imagenet").solarize_p == 0 and view_config("weak", "digits").solarize_p == 0
    assert view_config("dino_local", "imagenet").blur_kernel == 9
    with pytest.raises(ValueError, match="solarize_p"):
        ViewConfig(32, solarize_p=-0.1)


def test_size_groups() -> None:
    g, loc = view_config("dino_global1", "cifar"), view_config("dino_local", "cifar")
    assert A.size_groups([g, g, loc, loc, loc]) == [[0, 1], [2, 3, 4]]
    assert A.size_groups([loc, g, loc]) == [[0, 2], [1]]
    assert A.size_groups([g]) == [[0]] and A.size_groups([]) == []


def test_solarize_matches_pil() -> None:
    images = _images(3, 9, 11)
    images[0, :, 0, :4] = torch.tensor([0, 127, 128, 255], dtype=torch.uint8)  # around the threshold
    out = A.solarize(images.float() / 255)
    pil = [ImageOps.solarize(Image.fromarray(im.permute(1, 2, 0).numpy())) for im in images]
    expected = torch.stack([torch.from_numpy(np.array(im)).permute(2, 0, 1) for im in pil])
    assert torch.equal((out * 255).round().to(torch.uint8), expected)
    assert out[0, 0, 0, :4].mul(255).round().tolist() == [0, 127, 127, 0]


def test_solarize_p_leaves_other_views_random_stream_alone() -> None:
    """Views without solarisation draw exactly what they drew before it existed; with it, only pixels
    at or above half intensity change, and only in the samples drawn."""
    images = _images(8, 24, 24)
    gen = _gen(5)
    plain = augment_views(images, view_config("strong", "cifar"), gen)
    after = torch.rand(3, generator=gen)
    gen = _gen(5)
    assert torch.equal(
        plain, augment_views(images, replace(view_config("strong", "cifar"), solarize_p=0.0), gen)
    )
    assert torch.equal(after, torch.rand(3, generator=gen))
    base = dict(scale=(1.0, 1.0), ratio=(1.0, 1.0), flip_p=0.0, jitter_p=0.0, gray_p=0.0, blur_p=0.0)
    half = _unnormalize(augment_views(images, ViewConfig(24, **base, solarize_p=0.5), _gen(1)))
    x = images.float() / 255
    solarized = [torch.allclose(half[i], A.solarize(x[i]), atol=1e-5) for i in range(8)]
    kept = [torch.allclose(half[i], x[i], atol=1e-5) for i in range(8)]
    assert all(s or k for s, k in zip(solarized, kept, strict=True)) and any(solarized) and any(kept)


@pytest.mark.parametrize("preset", A.PRESETS)
@pytest.mark.parametrize("strength", A.VIEW_NAMES)
def test_shapes_and_determinism(preset: str, strength: str) -> None:
    cfg = view_config(strength, preset)
    images = _images(4, 40, 40)
    out = augment_views(images, cfg, _gen(3))
    assert out.shape == (4, 3, cfg.size, cfg.size) and out.dtype == torch.float32 and out.device.type == "cpu"
    assert torch.equal(out, augment_views(images, cfg, _gen(3)))
    assert not torch.equal(out, augment_views(images, cfg, _gen(4)))
    floats = augment_views(images.float() / 255, cfg, _gen(3))  # float input in [0, 1] works the same
    assert torch.allclose(floats, out, atol=1e-5)


def test_samples_get_different_crops() -> None:
    same = _images(1, 32, 32).expand(16, -1, -1, -1).contiguous()
    out = augment_views(same, view_config("weak", "cifar"), _gen())
    flat = out.flatten(1)
    distinct = {tuple(row.tolist()) for row in flat.round(decimals=4)}
    assert len(distinct) == 16


def test_crop_box_statistics(tvf: ModuleType) -> None:
    boxes = A.sample_crop_boxes(4000, 64, 48, (0.2, 1.0), (3 / 4, 4 / 3), _gen())
    top, left, h, w = boxes.T
    assert boxes.dtype == torch.int64
    assert (top >= 0).all() and (left >= 0).all() and (top + h <= 64).all() and (left + w <= 48).all()
    frac = (h * w).double() / (64 * 48)
    assert frac.min() > 0.19 and frac.max() <= 1.0
    # same distribution as torchvision's RandomResizedCrop (large boxes that do not fit are retried)
    torch.manual_seed(0)
    crop = importlib.import_module("torchvision.transforms").RandomResizedCrop
    reference = [crop.get_params(torch.empty(1, 64, 48), [0.2, 1.0], [3 / 4, 4 / 3]) for _ in range(4000)]
    reference_frac = torch.tensor([h * w / (64 * 48) for _, _, h, w in reference], dtype=torch.float64)
    assert abs(float(frac.mean() - reference_frac.mean())) < 0.015
    assert abs(float(frac.std() - reference_frac.std())) < 0.015
    aspect = w.double() / h
    fits = frac < 0.5  # small boxes always fit at the first try: their aspect obeys the ratio range
    assert aspect[fits].min() > 0.7 and aspect[fits].max() < 1.4
    assert (left[fits] < 48 - w[fits]).any() and (top[fits] > 0).any()
    assert torch.equal(boxes, A.sample_crop_boxes(4000, 64, 48, (0.2, 1.0), (3 / 4, 4 / 3), _gen()))


def test_crop_box_fallback() -> None:
    # no try can fit a 1:1 box of the whole area into a 10 x 40 image: centre crop clamped to the ratio
    boxes = A.sample_crop_boxes(5, 10, 40, (1.0, 1.0), (1.0, 1.0), _gen())
    assert boxes.tolist() == [[0, 15, 10, 10]] * 5


def test_flip_and_identity() -> None:
    images = _images(5, 16, 16)
    floats = images.float() / 255
    base = dict(scale=(1.0, 1.0), ratio=(1.0, 1.0), jitter_p=0.0, gray_p=0.0, blur_p=0.0)
    same = _unnormalize(augment_views(images, ViewConfig(16, flip_p=0.0, **base), _gen()))
    assert torch.allclose(same, floats, atol=1e-5)
    flipped = _unnormalize(augment_views(images, ViewConfig(16, flip_p=1.0, **base), _gen()))
    assert torch.allclose(flipped, torch.flip(floats, dims=[3]), atol=1e-5)
    half = _unnormalize(augment_views(images, ViewConfig(16, flip_p=0.5, **base), _gen(1)))
    was_flipped = [torch.allclose(half[i], flipped[i], atol=1e-5) for i in range(5)]
    assert all(was_flipped[i] or torch.allclose(half[i], floats[i], atol=1e-5) for i in range(5))


def test_resized_crop_matches_slice_and_resize() -> None:
    images = torch.rand(2, 3, 12, 12)
    boxes = torch.tensor([[2, 4, 6, 6], [0, 0, 12, 12]])
    out = A.resized_crop(images, boxes, 6, torch.tensor([False, True]))
    assert torch.allclose(out[0], images[0, :, 2:8, 4:10], atol=1e-5)
    halved = torch.nn.functional.interpolate(images[1:], size=(6, 6), mode="bilinear", align_corners=False)
    assert torch.allclose(out[1], torch.flip(halved[0], dims=[2]), atol=1e-5)


def test_weak_view_keeps_colour() -> None:
    pixel = torch.tensor([200, 30, 90], dtype=torch.uint8).view(1, 3, 1, 1)
    colour = pixel.expand(8, 3, 24, 24)
    out = _unnormalize(augment_views(colour, view_config("weak", "cifar"), _gen()))
    assert out.shape == (8, 3, 32, 32)
    assert torch.allclose(out, (pixel.float() / 255).expand_as(out), atol=1e-5)
    strong = _unnormalize(augment_views(colour, view_config("strong", "cifar"), _gen()))
    assert not torch.allclose(strong, (pixel.float() / 255).expand_as(out), atol=1e-3)


@pytest.mark.parametrize("op", ["brightness", "contrast", "saturation"])
def test_blend_ops_match_torchvision(op: str, tvf: ModuleType, tv_gray_weights: None) -> None:
    images = torch.rand(4, 3, 7, 9, generator=_gen())
    factors = [0.6, 1.0, 1.4, 0.0]
    mine = getattr(A, f"adjust_{op}")(images, torch.tensor(factors))
    reference = getattr(tvf, f"adjust_{op}")
    expected = torch.stack([reference(images[i], factors[i]) for i in range(4)])
    assert torch.allclose(mine, expected, atol=1e-5)


def test_hue_matches_torchvision(tvf: ModuleType) -> None:
    images = torch.rand(5, 3, 7, 9, generator=_gen())
    images[0, :, 0, 0] = 0.5  # gray pixel: undefined hue
    images[1, :, 0, 0] = 0.0  # black pixel
    shifts = [-0.1, 0.0, 0.05, 0.1, -0.5]
    mine = A.adjust_hue(images, torch.tensor(shifts))
    expected = torch.stack([tvf.adjust_hue(images[i], shifts[i]) for i in range(5)])
    assert torch.allclose(mine, expected, atol=1e-5)


def test_grayscale(tvf: ModuleType, monkeypatch: pytest.MonkeyPatch) -> None:
    images = torch.rand(3, 3, 5, 6, generator=_gen())
    r, g, b = images.unbind(1)
    luma = (0.299 * r + 0.587 * g + 0.114 * b).unsqueeze(1).expand(-1, 3, -1, -1)
    assert torch.allclose(A.grayscale(images), luma, atol=1e-6)  # ITU-R 601-2, as PIL's convert("L")
    monkeypatch.setattr(A, "GRAY_WEIGHTS", (0.2989, 0.587, 0.114))
    assert torch.allclose(A.grayscale(images), tvf.rgb_to_grayscale(images, num_output_channels=3), atol=1e-6)


@pytest.mark.parametrize("kernel", [3, 5, 23])
def test_gaussian_blur_matches_torchvision(kernel: int, tvf: ModuleType) -> None:
    images = torch.rand(4, 3, 24, 20, generator=_gen())
    sigmas = [0.1, 0.7, 1.3, 2.0]
    mine = A.gaussian_blur(images, torch.tensor(sigmas), kernel)
    expected = torch.stack(
        [tvf.gaussian_blur(images[i], [kernel, kernel], [s, s]) for i, s in enumerate(sigmas)]
    )
    assert torch.allclose(mine, expected, atol=1e-5)


def test_blur_kernel_size() -> None:
    assert [A.blur_kernel_size(s) for s in (16, 32, 96, 224)] == [1, 3, 9, 23]


@pytest.mark.parametrize("gather", [True, False])
def test_color_jitter_masks_and_order(gather: bool) -> None:
    images = torch.rand(6, 3, 8, 8, generator=_gen())
    factors = torch.tensor([[1.3, 0.7, 1.2, 0.05]] * 6)
    order = torch.tensor([[0, 1, 2, 3], [3, 2, 1, 0]] * 3)
    apply = torch.tensor([True, True, False, False, True, True])
    out = A.color_jitter(images, factors, order, apply, (0.4, 0.4, 0.4, 0.1), gather=gather)
    assert torch.equal(out[2:4], images[2:4])
    f = factors[0]
    forward = A.adjust_hue(
        A.adjust_saturation(A.adjust_contrast(A.adjust_brightness(images, f[:1]), f[1:2]), f[2:3]), f[3:]
    )
    backward = A.adjust_brightness(
        A.adjust_contrast(A.adjust_saturation(A.adjust_hue(images, f[3:]), f[2:3]), f[1:2]), f[:1]
    )
    assert torch.allclose(out[0], forward[0], atol=1e-6) and torch.allclose(out[1], backward[1], atol=1e-6)


def test_color_jitter_gathered_and_masked_agree_exactly() -> None:
    """The CPU path (each op on the samples that take it) and the GPU path (every op on the whole batch,
    masked) give bit-identical batches, with random factors, orders, ops switched off and skipped samples."""
    g = _gen()
    images = torch.rand(64, 3, 12, 12, generator=g)
    factors = 0.6 + 0.8 * torch.rand((64, 4), generator=g)
    factors[:, 3] -= 1.0
    order = torch.rand((64, 4), generator=g).argsort(dim=1)
    apply = torch.rand(64, generator=g) < 0.8
    for strengths in [(0.4, 0.4, 0.4, 0.1), (0.4, 0.0, 0.4, 0.0)]:
        gathered = A.color_jitter(images, factors, order, apply, strengths, gather=True)
        masked = A.color_jitter(images, factors, order, apply, strengths, gather=False)
        assert torch.equal(gathered, masked) and not torch.equal(gathered, images)
    before = images.clone()
    A.color_jitter(images, factors, order, apply, (0.4, 0.4, 0.4, 0.1), gather=True)
    assert torch.equal(images, before)  # the input batch is left as it was


def test_compiled_views_match_eager() -> None:
    """``compiled=True`` (under ``engine.compile``): the rendering is really traced, and the same generator
    state gives the eager view up to float rounding (inductor reorders float ops), with every op on
    (crop, flip, jitter, gray, blur)."""
    from dataclasses import replace

    from torch._dynamo.utils import counters

    cfg = replace(view_config("strong", "imagenet"), size=24, blur_p=0.5)  # blur kernel 3
    images = torch.randint(0, 256, (32, 3, 40, 40), generator=_gen(), dtype=torch.uint8)
    torch._dynamo.reset()
    counters.clear()
    compiled = augment_views(images, cfg, _gen(), compiled=True)
    assert counters["stats"]["unique_graphs"] == 1
    eager = augment_views(images, cfg, _gen())
    torch.testing.assert_close(compiled, eager, rtol=0, atol=1e-4)  # 1/255 is 0.017 normalised
    assert torch.equal(compiled, augment_views(images, cfg, _gen(), compiled=True))
    torch._dynamo.reset()


@pytest.mark.parametrize("field", ["jitter_p", "gray_p", "blur_p", "solarize_p"])
def test_probabilities(field: str) -> None:
    images = _images(8, 48, 48)
    base = dict(scale=(1.0, 1.0), ratio=(1.0, 1.0), flip_p=0.0, jitter_p=0.0, gray_p=0.0, blur_p=0.0)
    base["blur_sigma"] = (1.0, 2.0)  # a sigma of 0.1 would leave the image as it is
    plain = augment_views(images, ViewConfig(48, **base), _gen())
    off = augment_views(images, ViewConfig(48, **{**base, field: 0.0}), _gen())
    on = augment_views(images, ViewConfig(48, **{**base, field: 1.0}), _gen())
    assert torch.equal(off, plain)
    changed = (on - plain).flatten(1).abs().amax(dim=1)
    assert (changed > 1e-3).all()
    if field == "gray_p":
        assert torch.allclose(on[:, 0] * STD[0, 0] + MEAN[0, 0], on[:, 1] * STD[0, 1] + MEAN[0, 1], atol=1e-5)


def test_augment_statistics() -> None:
    """Over many samples, each random op fires at about its probability."""
    images = _images(1, 32, 32).expand(400, -1, -1, -1).contiguous()
    base = dict(scale=(1.0, 1.0), ratio=(1.0, 1.0), flip_p=0.0, jitter_p=0.0, blur_p=0.0, gray_p=0.0)
    gray = _unnormalize(augment_views(images, ViewConfig(32, **{**base, "gray_p": 0.3}), _gen()))
    is_gray = (gray[:, 0] - gray[:, 1]).abs().flatten(1).amax(1) < 1e-5
    assert abs(float(is_gray.float().mean()) - 0.3) < 0.08
    flip = _unnormalize(augment_views(images, ViewConfig(32, **{**base, "flip_p": 0.5}), _gen()))
    mirror = torch.flip(images[:1].float() / 255, dims=[3])
    is_flipped = (flip - mirror).flatten(1).abs().amax(1) < 1e-5
    assert 0.4 < float(is_flipped.float().mean()) < 0.6
    jitter = _unnormalize(augment_views(images, ViewConfig(32, **{**base, "jitter_p": 0.8}), _gen()))
    is_jittered = (jitter - images[:1].float() / 255).flatten(1).abs().amax(1) > 1e-4
    assert abs(float(is_jittered.float().mean()) - 0.8) < 0.08


@pytest.mark.parametrize(("preset", "side"), [("digits", 16), ("cifar", 32)])
def test_eval_view_small(preset: str, side: int) -> None:
    images = _images(3, side, side)
    out = eval_view(images, preset)
    assert out.shape == (3, 3, side, side) and out.dtype == torch.float32
    assert torch.allclose(out, (images.float() / 255 - MEAN) / STD, atol=1e-6)
    assert eval_view(_images(2, 40, 60), preset).shape == (2, 3, side, side)


def test_eval_view_imagenet() -> None:
    at_224 = _images(2, 224, 224)
    assert torch.allclose(eval_view(at_224, "imagenet"), (at_224.float() / 255 - MEAN) / STD, atol=1e-6)
    at_256 = _images(2, 256, 256)
    expected = (at_256[:, :, 16:240, 16:240].float() / 255 - MEAN) / STD
    assert torch.allclose(eval_view(at_256, "imagenet"), expected, atol=1e-6)
    wide = torch.rand(2, 3, 128, 192)
    out = eval_view(wide, "imagenet")
    resized = torch.nn.functional.interpolate(wide, size=(256, 384), mode="bilinear", antialias=True)
    assert out.shape == (2, 3, 224, 224)
    assert torch.allclose(out, (resized[:, :, 16:240, 80:304] - MEAN) / STD, atol=1e-5)
    with pytest.raises(ValueError, match="digits, cifar, imagenet"):
        eval_view(at_224, "svhn")


def test_normalize() -> None:
    x = torch.rand(3, 4, 4)
    out = normalize(x, (0.5, 0.5, 0.5), (0.25, 0.5, 1.0))
    assert torch.allclose(out[0], (x[0] - 0.5) / 0.25) and torch.allclose(out[2], x[2] - 0.5)
    assert normalize(x[None], A.IMAGENET_MEAN, A.IMAGENET_STD).shape == (1, 3, 4, 4)


def test_generator_on_images_device() -> None:
    """The views follow the device of the batch (CUDA when there is one)."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    images = _images(4, 64, 64).to(device)
    generator = torch.Generator(device=device).manual_seed(0)
    out = augment_views(images, view_config("strong", "imagenet"), generator)
    assert out.device.type == device and out.shape == (4, 3, 224, 224)
    assert math.isfinite(float(out.abs().max()))
