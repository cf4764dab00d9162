"""Datasets: digits, folder, list, cifar10 (torchvision layout), longtail subsets, the shared CIFAR copy."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from isdretrieve.data.datasets import FileDataset
from isdretrieve.data.images import decode_image
from isdretrieve.data.open import open_dataset
from isdretrieve.data.specs import parse_spec
from isdretrieve.data.subsets import longtail_counts, longtail_indices
from isdretrieve.errors import DataError

CIFAR10_LT_100 = [5000, 2997, 1796, 1077, 645, 387, 232, 139, 83, 50]


def _save(path: Path, image: Image.Image, fmt: str | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, format=fmt)
    return path


def _solid(color: tuple[int, int, int], size: tuple[int, int] = (12, 12)) -> Image.Image:
    return Image.new("RGB", size, color)


def _labelled_folder(root: Path, counts: dict[str, int], side: int = 8) -> Path:
    for label, (name, n) in enumerate(counts.items()):
        for k in range(n):
            _save(root / name / f"{k:03d}.png", _solid((label * 20, k, 7), (side, side)))
    return root


# ---------------------------------------------------------------- digits


def test_digits_splits() -> None:
    train, test = open_dataset("digits"), open_dataset("digits,split=test")
    assert (len(train), len(test)) == (1347, 450)
    assert train.spec.split == "train" and test.spec.split == "test"
    assert train.classes == [str(d) for d in range(10)]
    total = train.labels.bincount(minlength=10) + test.labels.bincount(minlength=10)
    assert total.sum() == 1797
    assert ((test.labels.bincount(minlength=10) - 0.25 * total).abs() <= 1).all()  # stratified
    assert len(open_dataset("digits,split=train", split="test")) == 450  # argument overrides the SPEC


def test_digits_items() -> None:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    ds = open_dataset("digits,split=test")
    image, label, index = ds[7]
    assert image.shape == (3, 16, 16) and image.dtype == torch.uint8
    assert (image[0] == image[1]).all() and (image[0] == image[2]).all()
    assert (label, index) == (int(ds.labels[7]), 7)
    assert ds.image_size == (16, 16) and ds.nbytes == 450 * 3 * 16 * 16 and ds.path(7) == "7"
    everything = ds.load_all()
    assert everything.shape == (450, 3, 16, 16) and everything.dtype == torch.uint8
    assert torch.equal(everything[7], image) and int(everything.max()) == 255
    # the recipe: stratified split, x 255/16 rounded, bilinear upsampling to 16 x 16
    digits = load_digits()
    _, test_idx = train_test_split(np.arange(1797), test_size=0.25, stratify=digits.target, random_state=0)
    small = torch.from_numpy(np.rint(digits.images[np.sort(test_idx)] * 255 / 16)).float()[:, None]
    expected = F.interpolate(small, size=(16, 16), mode="bilinear", align_corners=False).round()
    assert torch.equal(everything[:, :1], expected.to(torch.uint8))
    assert torch.equal(ds.labels, torch.from_numpy(digits.target[np.sort(test_idx)]))
    assert torch.equal(open_dataset("digits,split=test").load_all(), everything)  # deterministic


# ---------------------------------------------------------------- folder


def test_folder_modes_and_sizes(tmp_path: Path) -> None:
    _save(tmp_path / "b_gray" / "a.png", Image.new("L", (20, 30), 77))
    _save(tmp_path / "b_gray" / "sub" / "b.JPG", _solid((10, 200, 30), (64, 48)))
    rgba = Image.new("RGBA", (10, 10), (250, 0, 0, 0))
    _save(tmp_path / "a_rgba" / "x.tif", rgba)
    palette = _solid((0, 0, 255), (9, 9)).convert("P", palette=Image.Palette.ADAPTIVE)
    _save(tmp_path / "a_rgba" / "y.gif", palette)
    _save(tmp_path / "c_bmp" / "z.bmp", _solid((1, 2, 3), (5, 7)))
    (tmp_path / "c_bmp" / "notes.txt").write_text("not an image")
    _save(tmp_path / "c_bmp" / ".hidden.png", _solid((9, 9, 9)))
    _save(tmp_path / ".hidden_class" / "h.png", _solid((9, 9, 9)))
    ds = open_dataset(f"folder:{tmp_path},size=12")
    assert ds.classes == ["a_rgba", "b_gray", "c_bmp"]
    assert [ds.path(i) for i in range(len(ds))] == [
        "a_rgba/x.tif",
        "a_rgba/y.gif",
        "b_gray/a.png",
        "b_gray/sub/b.JPG",
        "c_bmp/z.bmp",
    ]
    assert ds.labels.tolist() == [0, 0, 1, 1, 2]
    images = [ds[i][0] for i in range(len(ds))]
    assert all(im.shape == (3, 12, 12) and im.dtype == torch.uint8 for im in images)
    assert images[0][:, 5, 5].tolist() == [250, 0, 0]
    assert images[1][:, 5, 5].tolist() == [0, 0, 255]
    assert images[2].unique().tolist() == [77]
    assert (images[3][:, 6, 6].int() - torch.tensor([10, 200, 30])).abs().max() <= 3  # JPEG
    assert images[4][:, 6, 6].tolist() == [1, 2, 3]
    assert torch.equal(ds.load_all(), torch.stack(images))
    assert ds.spec == parse_spec(f"folder:{tmp_path},size=12")


def test_folder_centre_crop(tmp_path: Path) -> None:
    image = np.zeros((10, 20, 3), dtype=np.uint8)  # 20 wide, 10 high: columns 5..14 survive the crop
    image[:, :10] = (255, 0, 0)
    image[:, 10:] = (0, 0, 255)
    path = _save(tmp_path / "wide.png", Image.fromarray(image))
    out = decode_image(path, 10)
    assert out[0, :, :5].unique().tolist() == [255] and out[2, :, 5:].unique().tolist() == [255]
    assert out[0, :, 5:].unique().tolist() == [0]
    small = decode_image(path, 4)
    assert small.shape == (3, 4, 4)


def test_folder_default_size(tmp_path: Path) -> None:
    ds = open_dataset(f"folder:{_labelled_folder(tmp_path / 'small', {'a': 2, 'b': 1}, side=20)}")
    assert ds.image_size == (20, 20) and ds.spec.size == 20 and ds[2][0].shape == (3, 20, 20)
    _save(tmp_path / "wide" / "c" / "0.png", _solid((5, 5, 5), (30, 20)))
    assert open_dataset(f"folder:{tmp_path / 'wide'}").image_size == (256, 256)
    _save(tmp_path / "big" / "c" / "0.png", _solid((5, 5, 5), (100, 100)))
    assert open_dataset(f"folder:{tmp_path / 'big'}").image_size == (256, 256)


def test_folder_unlabeled(tmp_path: Path) -> None:
    for k in range(3):
        _save(tmp_path / f"{k}.png", _solid((k, k, k)))
    ds = open_dataset(f"folder:{tmp_path}")
    assert len(ds) == 3 and ds.classes == [] and ds.labels.tolist() == [-1, -1, -1]
    assert ds[1][1] == -1 and ds.path(1) == "1.png"
    with pytest.raises(DataError, match="longtail needs labels"):
        open_dataset(f"folder:{tmp_path},longtail=2")


def test_folder_splits(tmp_path: Path) -> None:
    _labelled_folder(tmp_path / "train", {"a": 3, "b": 2})
    _labelled_folder(tmp_path / "test", {"a": 1, "b": 1})
    assert len(open_dataset(f"folder:{tmp_path},split=test")) == 2
    assert len(open_dataset(f"folder:{tmp_path}", split="test")) == 2
    train = open_dataset(f"folder:{tmp_path}")  # both splits present and none asked: train
    assert len(train) == 5 and train.spec.split == "train" and train.path(0) == "a/000.png"
    flat = open_dataset(f"folder:{tmp_path / 'train'},split=test")  # no test sub-folder: ROOT itself
    assert len(flat) == 5


def test_folder_errors(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="does not exist"):
        open_dataset(f"folder:{tmp_path / 'missing'}")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="holds no images"):
        open_dataset(f"folder:{tmp_path / 'empty'}")
    _labelled_folder(tmp_path / "one_empty", {"a": 1})
    (tmp_path / "one_empty" / "b").mkdir()
    with pytest.raises(DataError, match=r"class folder '.*one_empty/b' holds no images"):
        open_dataset(f"folder:{tmp_path / 'one_empty'}")


def test_corrupt_files(tmp_path: Path) -> None:
    root = _labelled_folder(tmp_path / "data", {"cat": 2})
    noise = Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8))
    jpeg = _save(tmp_path / "full.jpg", noise)
    (root / "cat" / "003.jpg").write_bytes(np.random.default_rng(1).bytes(500))
    (root / "cat" / "004.jpg").write_bytes(b"")
    (root / "cat" / "005.jpg").write_bytes(jpeg.read_bytes()[: jpeg.stat().st_size // 2])
    ds = open_dataset(f"folder:{root},size=8")
    assert [ds.path(i) for i in range(2, 5)] == ["cat/003.jpg", "cat/004.jpg", "cat/005.jpg"]
    assert ds[0][0].shape == (3, 8, 8)
    for i in range(2, 5):
        with pytest.raises(DataError, match=rf"cannot decode image '.*{ds.path(i)}'"):
            ds[i]
    with pytest.raises(DataError, match="cannot decode image '.*cat/003.jpg'") as info:
        ds.load_all(num_workers=1)  # errors cross the worker boundary as one clean line
    assert "\n" not in str(info.value)
    with pytest.raises(DataError, match="cannot decode image '.*cat/003.jpg'"):
        open_dataset(f"folder:{root / 'cat'},split=test").load_all()
    first_bad = tmp_path / "first_bad" / "c"
    first_bad.mkdir(parents=True)
    (first_bad / "0.png").write_bytes(b"")
    with pytest.raises(DataError, match="cannot decode image '.*c/0.png'"):
        open_dataset(f"folder:{first_bad.parent}")  # default size probes the first image


# ---------------------------------------------------------------- list


def _list_file(path: Path, classes: list[str], images: list[str]) -> Path:
    text = "class names : \n" + "".join(f"{c}\n" for c in classes) + "Train Images: \n"
    path.write_text(text + "".join(f"{im}\n" for im in images) + "\n")
    return path


def test_list(tmp_path: Path) -> None:
    root = tmp_path / "imagenet"
    classes = ["n02", "n01"]
    images = ["/train/n01/n01_1.JPEG", "/train/n02/n02_7.JPEG", "/train/n01/n01_2.JPEG"]
    for k, rel in enumerate(images):
        _save(root / rel.lstrip("/"), _solid((k * 50, 0, 0), (40, 30)), "JPEG")
    _save(root / "train" / "n01" / "unlisted.JPEG", _solid((0, 0, 0)), "JPEG")
    spec = f"list:{_list_file(tmp_path / 'D1.txt', classes, images)}@{root},size=16"
    ds = open_dataset(spec)
    assert ds.classes == classes and ds.labels.tolist() == [1, 0, 1]
    assert [ds.path(i) for i in range(3)] == [rel.lstrip("/") for rel in images]
    assert ds[1][0].shape == (3, 16, 16) and abs(int(ds[1][0][0, 8, 8]) - 50) <= 3
    assert ds.load_all().shape == (3, 3, 16, 16)
    assert open_dataset(f"list:{tmp_path / 'D1.txt'}@{root}").image_size == (256, 256)


def test_list_errors(tmp_path: Path) -> None:
    root = tmp_path / "imagenet"
    _save(root / "train" / "n01" / "a.JPEG", _solid((0, 0, 0)), "JPEG")
    bad = tmp_path / "bad.txt"

    def fails(match: str) -> None:
        with pytest.raises(DataError, match=match):
            open_dataset(f"list:{bad}@{root}")

    fails("list file '.*bad.txt' does not exist")
    bad.write_text("n01\nTrain Images:\n/train/n01/a.JPEG\n")
    fails("bad.txt' line 1: expected 'class names :'")
    bad.write_text("class names :\nn01\n/train/n01/a.JPEG\n")
    fails("has no 'Train Images:' line")
    _list_file(bad, ["n01"], ["/train/n01/a.JPEG", "/train/n09/b.JPEG"])
    fails("bad.txt' line 5: image '/train/n09/b.JPEG' is of class 'n09', which is not in the class list")
    _list_file(bad, ["n01"], ["/train/n01/a.JPEG", "/train/n01/gone.JPEG"])
    fails("line 5: listed image '.*train/n01/gone.JPEG' not found")
    _list_file(bad, [], ["/train/n01/a.JPEG"])
    fails("not in the class list")
    _list_file(bad, ["n01"], [])
    fails("lists no images")


# ---------------------------------------------------------------- longtail


def test_longtail_counts() -> None:
    assert longtail_counts([5000] * 10, 100) == CIFAR10_LT_100
    assert longtail_counts([100] * 5, 10) == [100, 56, 31, 17, 10]
    assert longtail_counts([10, 40, 40], 4) == [10, 20, 10]  # n_max is the largest class; capped
    assert longtail_counts([7], 50) == [7]
    assert longtail_counts([3, 3], 1000) == [3, 1]  # every class keeps at least one image


def test_longtail_indices() -> None:
    labels = np.repeat(np.arange(4), 20)[np.random.default_rng(3).permutation(80)]
    idx = longtail_indices(labels, 4, 8)
    assert np.bincount(labels[idx], minlength=4).tolist() == [20, 10, 5, 2]
    assert (np.diff(idx) > 0).all()
    assert np.array_equal(idx, longtail_indices(torch.from_numpy(labels), 4, 8))  # deterministic


def test_longtail_folder(tmp_path: Path) -> None:
    _labelled_folder(tmp_path / "train", {"a": 8, "b": 8, "c": 8})
    _labelled_folder(tmp_path / "test", {"a": 2, "b": 2, "c": 2})
    full = open_dataset(f"folder:{tmp_path},split=train")
    ds = open_dataset(f"folder:{tmp_path},split=train,longtail=4")
    assert isinstance(ds, FileDataset) and len(ds) == 8 + 4 + 2
    assert ds.labels.bincount().tolist() == [8, 4, 2]
    paths = [ds.path(i) for i in range(len(ds))]
    assert paths == sorted(paths) and set(paths) <= {full.path(i) for i in range(len(full))}
    assert torch.equal(ds[9][0], full[[full.path(i) for i in range(len(full))].index(paths[9])][0])
    assert ds[9][2] == 9
    assert len(open_dataset(f"folder:{tmp_path},split=test,longtail=4")) == 6  # test stays balanced
    digits, all_digits = open_dataset("digits,longtail=10"), open_dataset("digits")
    n_max = max(all_digits.labels.bincount().tolist())
    assert digits.labels.bincount().tolist()[1:] == [int(n_max * 10 ** (-c / 9)) for c in range(1, 10)]
    for i in (0, len(digits) - 1):  # path() names the underlying item
        assert torch.equal(digits[i][0], all_digits[int(digits.path(i))][0])


# ---------------------------------------------------------------- cifar10 (torchvision layout)


def _write_cifar(folder: Path, per_batch: int = 4, test: int = 6) -> tuple[np.ndarray, np.ndarray]:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    data, labels = [], []
    for name, n in [*((f"data_batch_{k}", per_batch) for k in range(1, 6)), ("test_batch", test)]:
        batch = {
            b"batch_label": name.encode(),
            b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
            b"labels": [int(x) for x in rng.integers(0, 10, n)],
            b"filenames": [f"{name}_{k}.png".encode() for k in range(n)],
        }
        (folder / name).write_bytes(pickle.dumps(batch))
        data.append(batch[b"data"])
        labels.append(np.asarray(batch[b"labels"]))
    names = [f"class{k}".encode() for k in range(10)]
    meta = {b"num_cases_per_batch": per_batch, b"label_names": names, b"num_vis": 3072}
    (folder / "batches.meta").write_bytes(pickle.dumps(meta))
    return np.concatenate(data), np.concatenate(labels)


def test_cifar10_layout(tmp_path: Path) -> None:
    data, labels = _write_cifar(tmp_path / "cifar-10-batches-py")
    for root in (tmp_path, tmp_path / "cifar-10-batches-py"):
        train = open_dataset(f"cifar10:{root}")
        assert len(train) == 20 and train.spec.split == "train"
        assert train.classes == [f"class{k}" for k in range(10)]
        assert torch.equal(train.labels, torch.from_numpy(labels[:20]))
        assert torch.equal(train.load_all(), torch.from_numpy(data[:20].reshape(20, 3, 32, 32)))
        test = open_dataset(f"cifar10:{root}", split="test")
        assert len(test) == 6 and test[5][0].flatten().tolist() == data[25].tolist()
        assert test.path(5) == "5" and test[5][2] == 5
    lt = open_dataset(f"cifar10:{tmp_path},longtail=2")
    counts = np.bincount(labels[:20], minlength=10)
    assert lt.labels.bincount(minlength=10).tolist() == longtail_counts(counts.tolist(), 2)
    for i in range(len(lt)):
        assert torch.equal(lt[i][0], train[int(lt.path(i))][0])


def test_cifar10_errors_and_download(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(DataError, match=r"cifar-10-batches-py/data_batch_1' not found .*,download=1"):
        open_dataset(f"cifar10:{tmp_path}")
    calls = []

    class FakeDatasets:
        @staticmethod
        def CIFAR10(root: str, train: bool, download: bool) -> None:  # noqa: N802
            calls.append((root, train, download))
            _write_cifar(Path(root) / "cifar-10-batches-py")

    class FakeTorchvision:
        datasets = FakeDatasets

    monkeypatch.setattr("isdretrieve.util.torchvision.import_torchvision", lambda: FakeTorchvision)
    assert len(open_dataset(f"cifar10:{tmp_path},download=1,split=test")) == 6
    assert calls == [(str(tmp_path), False, True)]
    assert len(open_dataset(f"cifar10:{tmp_path},download=1")) == 20  # already there: no second fetch
    assert len(calls) == 1
    (tmp_path / "cifar-10-batches-py" / "data_batch_3").write_bytes(b"garbage")
    with pytest.raises(DataError, match="cannot read CIFAR-10 file '.*data_batch_3'"):
        open_dataset(f"cifar10:{tmp_path}")


# ---------------------------------------------------------------- the shared CIFAR-10 JPEG copy


@pytest.mark.cifar
def test_cifar_jpeg_test_split(cifar_root: Path) -> None:
    ds = open_dataset(f"folder:{cifar_root},split=test")
    assert len(ds) == 10_000 and ds.image_size == (32, 32) and ds.spec.size == 32
    assert ds.classes == sorted(ds.classes) and len(ds.classes) == 10 and ds.classes[0] == "airplane"
    assert ds.labels.bincount().tolist() == [1000] * 10
    images = ds.load_all(num_workers=2)
    assert images.shape == (10_000, 3, 32, 32) and images.dtype == torch.uint8
    for i in (0, 1234, 9999):
        assert torch.equal(images[i], ds[i][0])


@pytest.mark.cifar
def test_cifar_jpeg_longtail(cifar_root: Path) -> None:
    ds = open_dataset(f"folder:{cifar_root},split=train,longtail=100")
    assert ds.labels.bincount().tolist() == CIFAR10_LT_100 and len(ds) == 12406
    again = open_dataset(f"folder:{cifar_root},longtail=100")
    assert [again.path(i) for i in range(0, 12406, 97)] == [ds.path(i) for i in range(0, 12406, 97)]
