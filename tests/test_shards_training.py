"""Training on file data: random resized crops from the original pictures in the loader workers (against
torchvision's RandomResizedCrop), the shard stream's batch plan, and short ISD runs on ``wds:`` shards
with epoch-level and mid-epoch resume."""

from __future__ import annotations

import importlib
import os
import signal

import numpy as np
import pytest
import torch
from conftest import train_until_checkpoint
from PIL import Image

from isdretrieve.data.augment import ViewConfig, augment_views, normalize
from isdretrieve.data.crops import CroppedViews, crop_box, crop_generator, crop_views
from isdretrieve.data.open import open_dataset
from isdretrieve.data.shards import write_shards
from isdretrieve.errors import Interrupted, RecipeError
from isdretrieve.train.batches import BatchSource
from isdretrieve.train.distributed import DistContext
from isdretrieve.train.engine import Trainer
from isdretrieve.train.recipe import recipe_from_data
from isdretrieve.util.torchvision import import_torchvision

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def transforms():
    import_torchvision()
    return importlib.import_module("torchvision.transforms")


def _gradient(width: int, height: int) -> Image.Image:
    """Red = x (0..width-1), green = 4 y: a crop's pixels say where in the picture it came from."""
    x, y = np.meshgrid(np.arange(width), np.arange(height))
    rgb = np.stack([x, 4 * y, np.zeros_like(x)], axis=-1).astype(np.uint8)
    return Image.fromarray(rgb)


# ------------------------------------------------------------------------------------------- crops
@pytest.mark.parametrize(("height", "width"), [(64, 48), (40, 200), (300, 30), (32, 32)])
@pytest.mark.parametrize(("scale", "ratio"), [((0.08, 1.0), (3 / 4, 4 / 3)), ((0.9, 1.0), (1.0, 1.0))])
def test_crop_box_is_torchvision_get_params(transforms, height, width, scale, ratio) -> None:
    image = torch.empty(1, height, width)
    for seed in range(60):
        torch.manual_seed(seed)
        expected = transforms.RandomResizedCrop.get_params(image, list(scale), list(ratio))
        assert crop_box(height, width, scale, ratio, torch.Generator().manual_seed(seed)) == expected


def test_crop_views_are_torchvision_random_resized_crops(transforms) -> None:
    picture = Image.fromarray(np.random.default_rng(0).integers(0, 256, (37, 90, 3), dtype=np.uint8))
    view = ViewConfig(16, scale=(0.2, 1.0))
    crop = transforms.RandomResizedCrop(16, scale=view.scale, ratio=view.ratio)
    for seed in range(20):
        torch.manual_seed(seed)
        expected = torch.from_numpy(np.array(crop(picture))).permute(2, 0, 1)
        got = crop_views(picture, [view], torch.Generator().manual_seed(seed))
        assert got.shape == (1, 3, 16, 16) and got.dtype == torch.uint8
        assert torch.equal(got[0], expected)


def test_crops_come_from_the_whole_picture_unsquashed() -> None:
    picture = _gradient(200, 50)  # 4:1; a centre-cropped square would only see x in 75..124
    view = ViewConfig(16, scale=(0.08, 1.0))
    lefts, aspects = [], []
    for seed in range(200):
        crop = crop_views(picture, [view], torch.Generator().manual_seed(seed))[0].double()
        red, green = crop[0], crop[1] / 4
        lefts.append(float(red.min()))
        # source pixels per output pixel, across and down: their ratio is the crop box's aspect
        across = float((red[:, -1] - red[:, 0]).mean()) / 15
        down = float((green[-1] - green[0]).mean()) / 15
        if down > 0.5:  # boxes tall enough to measure
            aspects.append(across / down)
    assert min(lefts) < 40 and max(lefts) > 150  # crops reach both ends of the wide picture
    assert min(aspects) > 3 / 4 - 0.12 and max(aspects) < 4 / 3 + 0.12  # never squashed beyond the range


def test_cropped_views_are_seeded_per_sample_and_epoch(tmp_path) -> None:
    write_shards(open_dataset("digits,split=test"), tmp_path, shards=2)
    ds = open_dataset(f"wds:{tmp_path}/{{00000..00001}}.tar,size=16")
    views = [ViewConfig(16), ViewConfig(16, scale=(0.5, 1.0))]
    source = CroppedViews(ds, views, views[:1], seed=7, partners=torch.arange(len(ds)).flip(0))
    (crops,), label, index, (partner_crops,), partner = source[10]  # one size: one stack each
    assert crops.shape == (2, 3, 16, 16) and partner_crops.shape == (1, 3, 16, 16)
    assert (label, index, partner) == (int(ds.labels[10]), 10, len(ds) - 11)
    assert torch.equal(source[10][0][0], crops) and not torch.equal(crops[0], crops[1])
    source.set_epoch(1)
    assert not torch.equal(source[10][0][0], crops)


def test_cropped_views_of_two_sizes_come_grouped_by_size(tmp_path) -> None:
    """Global and local crops (16 and 8 px, interleaved): one stack per size, each crop the one drawn in
    view order from the sample's generator, as one view at a time would draw it."""
    write_shards(open_dataset("digits,split=test"), tmp_path, shards=1)
    ds = open_dataset(f"wds:{tmp_path}/00000.tar,size=16")
    big, small = ViewConfig(16, scale=(0.4, 1.0)), ViewConfig(8, scale=(0.05, 0.4))
    views = [big, small, big, small, small]
    source = CroppedViews(ds, views, [big], seed=7, partners=torch.arange(len(ds)))
    (large, local), _, _, partner_crops, _ = source[3]
    assert large.shape == (2, 3, 16, 16) and local.shape == (3, 3, 8, 8)
    assert len(partner_crops) == 1 and partner_crops[0].shape == (1, 3, 16, 16)
    generator = crop_generator(7, 0, 3)
    with ds.open_image(3) as image:
        one_by_one = [crop_views(image, [view], generator)[0] for view in views]
    assert torch.equal(large, torch.stack([one_by_one[0], one_by_one[2]]))
    assert torch.equal(local, torch.stack([one_by_one[1], one_by_one[3], one_by_one[4]]))
    assert CroppedViews(ds, views, [], seed=7)[3][3] == ()
    with pytest.raises(ValueError, match="one size"):
        crop_views(Image.new("RGB", (20, 20)), views, torch.Generator())


def test_pre_cropped_views_get_flip_and_colour_only() -> None:
    crops = torch.randint(0, 256, (6, 3, 16, 16), dtype=torch.uint8)
    plain = ViewConfig(16, flip_p=0.0, jitter_p=0.0, gray_p=0.0)
    x = crops.float() / 255
    same = augment_views(crops, plain, torch.Generator().manual_seed(0), cropped=True)
    assert torch.allclose(same, normalize(x, plain.mean, plain.std), atol=1e-6)
    flipped = augment_views(
        crops, ViewConfig(16, flip_p=1.0, jitter_p=0.0, gray_p=0.0), torch.Generator(), cropped=True
    )
    assert torch.allclose(flipped, normalize(x.flip(-1), plain.mean, plain.std), atol=1e-6)
    with pytest.raises(ValueError, match="cropped images must be 16x16"):
        augment_views(crops[:, :, :8, :8], plain, torch.Generator(), cropped=True)


# --------------------------------------------------------------------------------- the batch plan
@pytest.fixture(scope="module")
def digits_shards(tmp_path_factory: pytest.TempPathFactory) -> str:
    """digits/train (1,347 images) as 6 shards."""
    root = tmp_path_factory.mktemp("train_shards")
    write_shards(open_dataset("digits"), root, shards=6)
    return f"wds:{root}/{{00000..00005}}.tar"


def _source(spec: str, rank: int = 0, world: int = 1, **kwargs) -> BatchSource:
    dist = DistContext(rank=rank, world_size=world, local_rank=rank)
    args = {"batch_size": 64, "device": torch.device("cpu"), "seed": 1, "workers": 0, **kwargs}
    return BatchSource(open_dataset(spec), dist=dist, **args)


def test_ranks_read_only_their_shards_in_a_shard_local_order(digits_shards: str) -> None:
    ds = open_dataset(digits_shards)
    shard_of = np.searchsorted(ds.shard_starts, np.arange(len(ds)), side="right") - 1
    seen = []
    for rank in range(2):
        source = _source(digits_shards, rank, 2, shuffle_buffer=64)
        assert source.images is None and source.steps_per_epoch == (3 * 224) // 32  # streamed
        plan = source._local_indices(0)
        assert plan.shape == (source.steps_per_epoch, 32)
        shards = set(shard_of[plan.reshape(-1).numpy()].tolist())
        assert shards <= {rank, rank + 2, rank + 4}  # shards r, r+W, ...
        first = shard_of[plan[0].numpy()]
        assert len(set(first.tolist())) <= 2  # a batch comes from the few shards the buffer spans
        assert len(set(plan.reshape(-1).tolist())) == plan.numel()
        assert torch.equal(
            plan, _source(digits_shards, rank, 2, shuffle_buffer=64)._local_indices(0)
        )  # planned, not raced
        assert not torch.equal(plan, source._local_indices(1))
        seen.append(plan)
    assert not set(seen[0].reshape(-1).tolist()) & set(seen[1].reshape(-1).tolist())
    with pytest.raises(RecipeError, match="6 shards for 8 processes"):
        _source(digits_shards, 0, 8)


def test_worker_crops_only_where_the_pictures_are_not_native(digits_shards: str) -> None:
    view = ViewConfig(16)
    native = _source(digits_shards, views=[view, view])
    assert not native.crops_in_workers  # 16 x 16 digits: decoding loses nothing, crops stay on the device
    resized = _source(f"{digits_shards},size=16", views=[view, view])
    assert resized.crops_in_workers
    batch = next(resized.epoch(0))
    (crops,) = batch.crops  # one view size: one stack
    assert crops.shape == (32 * 2, 2, 3, 16, 16) and batch.images.shape == (64, 3, 16, 16)
    two_sizes = _source(f"{digits_shards},size=16", views=[view, ViewConfig(8), ViewConfig(8)])
    large, local = next(two_sizes.epoch(0)).crops
    assert large.shape == (64, 1, 3, 16, 16) and local.shape == (64, 2, 3, 8, 8)


# ------------------------------------------------------------------------------------------ train
def _recipe(spec: str, epochs: int = 2, **data) -> dict:
    return {
        "method": {"name": "isd", "queue_size": 256},
        "data": {"train": spec, "preset": "digits", "workers": 0, **data},
        "model": {"arch": "small_cnn"},
        "optim": {"batch_size": 64, "epochs": epochs, "max_steps": 30, "lr": 0.05},
        "engine": {"seed": 3, "log_every": 5},
        "monitor": {"every": 0},
    }


def _same_weights(a: Trainer, b: Trainer) -> bool:
    sa, sb = a.method.state_dict(), b.method.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.mark.slow
@pytest.mark.parametrize("size", ["", ",size=16"])  # crops on the device / in the workers
def test_train_on_shards_resumes_exactly(tmp_path, digits_shards: str, size: str, monkeypatch) -> None:
    """Native 16 x 16 shards: SIGINT mid-epoch 2, resume. Shards decoded at size=16 (worker crops):
    stop after the epoch-1 checkpoint, resume. Both end with the uninterrupted run's weights."""
    spec = digits_shards + size
    recipe = recipe_from_data(_recipe(spec))
    straight = Trainer(recipe, tmp_path / "a", quiet=True)
    assert straight.batches.images is None and straight.batches.crops_in_workers == bool(size)
    result = straight.fit()
    assert result.steps == 30 and result.encoder.is_file()

    if not size:
        real, calls = Trainer.optimize, [0]

        def optimize(self, *args, **kwargs):
            calls[0] += 1
            if calls[0] == 26:  # epoch 2, step 5
                os.kill(os.getpid(), signal.SIGINT)
            return real(self, *args, **kwargs)

        with monkeypatch.context() as patch:
            patch.setattr(Trainer, "optimize", optimize)
            with pytest.raises(Interrupted):
                Trainer(recipe, tmp_path / "b", quiet=True).fit()
        where = (1, 26, 5)
    else:
        train_until_checkpoint(recipe, tmp_path / "b", monkeypatch)
        where = (1, 21, 0)
    resumed = Trainer(recipe, tmp_path / "b", resume=True, quiet=True)
    assert (resumed.epoch, resumed.step, resumed.epoch_step) == where
    resumed.fit()
    assert _same_weights(straight, resumed)


@pytest.mark.slow
def test_dino_local_crops_from_worker_crops_train_and_resume_exactly(tmp_path, monkeypatch):
    """Plain DINO with 2 local crops on shards (digits test split) decoded at size=16: the workers take
    16 px global and 8 px local crops; a run stopped after its epoch-1 checkpoint ends where the
    straight one does."""
    write_shards(open_dataset("digits,split=test"), tmp_path / "shards", shards=2)
    data = _recipe(f"wds:{tmp_path}/shards/{{00000..00001}}.tar,size=16", epochs=2)
    data["method"] = {
        "name": "adasim", "base": "dino", "mode": "plain",
        "dino": {"out_dim": 64, "head_hidden": 32, "bottleneck": 16, "local_crops": 2},
    }  # fmt: skip
    data["optim"]["max_steps"] = None
    recipe = recipe_from_data(data)
    straight = Trainer(recipe, tmp_path / "a", quiet=True)
    assert straight.batches.crops_in_workers
    assert [v.size for v in straight.batches.views] == [16, 8, 8]
    assert [v.size for v in straight.batches.partner_views] == [16]
    straight.fit()
    train_until_checkpoint(recipe, tmp_path / "b", monkeypatch)
    resumed = Trainer(recipe, tmp_path / "b", resume=True, quiet=True)
    assert (resumed.epoch, resumed.step) == (1, 7)
    resumed.fit()
    assert resumed.step == straight.step == 14 and _same_weights(straight, resumed)


def test_wds_training_needs_monitor_data(digits_shards: str, tmp_path) -> None:
    recipe = _recipe(digits_shards)
    recipe["monitor"] = {"every": 1}
    with pytest.raises(RecipeError, match="monitor.train and monitor.test"):
        Trainer(recipe_from_data(recipe), tmp_path, quiet=True)
    recipe["monitor"] = {"every": 1, "train": digits_shards, "test": "digits,split=test", "max_train": 200}
    trainer = Trainer(recipe_from_data(recipe), tmp_path, quiet=True)
    assert trainer.monitor is not None
