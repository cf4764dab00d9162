"""Feature banks: export round trip, kill-and-resume, mismatches, corrupt images, shards, fingerprints."""

from __future__ import annotations

import copy
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from isdretrieve.bank.arrays import write_bank
from isdretrieve.bank.export import export_bank, shard_path
from isdretrieve.bank.join import join_shards
from isdretrieve.data.augment import eval_view
from isdretrieve.data.open import open_dataset
from isdretrieve.encoder import FrozenEncoder, encoder_fingerprint, transform_name
from isdretrieve.errors import BankError, DataError
from isdretrieve.files.bank import BANK_FORMAT, FeatureBank
from isdretrieve.files.encoder_header import IMAGENET_MEAN, IMAGENET_STD, EncoderHeader
from isdretrieve.models.backbones import build_backbone
from isdretrieve.models.checkpoints import export_encoder, load_backbone

REPO = Path(__file__).resolve().parents[1]


pytestmark = pytest.mark.usefixtures("one_thread")


def _encoder(path: Path, *, image_size: int, seed: int = 0) -> Path:
    torch.manual_seed(seed)
    backbone = build_backbone("small_cnn")
    header = EncoderHeader("small_cnn", False, 256, image_size, IMAGENET_MEAN, IMAGENET_STD)
    export_encoder(backbone, header, path)
    return path


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("bank")


@pytest.fixture(scope="module")
def enc16(workdir: Path) -> Path:
    return _encoder(workdir / "enc16.pt", image_size=16)


@pytest.fixture(scope="module")
def digits_bank(workdir: Path, enc16: Path) -> Path:
    """Uninterrupted export of digits (train split), batch 32: the reference for the resume test."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return export_bank(enc16, "digits", workdir / "digits.h5", batch_size=32, workers=0).path
    finally:
        torch.set_num_threads(before)


def _read(path: Path) -> dict[str, object]:
    with FeatureBank.open(path) as bank:
        return {
            "features": bank.features(dtype=None),
            "labels": bank.labels(),
            "indices": bank.indices(),
            "paths": bank.paths(),
        }


def _assert_same_rows(a: Path, b: Path) -> None:
    ra, rb = _read(a), _read(b)
    assert ra["features"].dtype == rb["features"].dtype
    assert ra["features"].tobytes() == rb["features"].tobytes()
    np.testing.assert_array_equal(ra["labels"], rb["labels"])
    np.testing.assert_array_equal(ra["indices"], rb["indices"])
    assert ra["paths"] == rb["paths"]


def _reference_features(encoder: Path, spec: str) -> np.ndarray:
    model, header = load_backbone(encoder)
    images = open_dataset(spec).load_all()
    with torch.inference_mode():
        return F.normalize(model(eval_view(images, transform_name(header)[5:])), dim=1).numpy()


# ------------------------------------------------------------------------------------- round trip
def test_digits_round_trip(digits_bank: Path, enc16: Path) -> None:
    dataset = open_dataset("digits")
    model, header = load_backbone(enc16)
    with FeatureBank.open(digits_bank) as bank:
        assert len(bank) == len(dataset) == 1347
        assert bank.dim == 256 and bank.dtype == np.float32
        feats = bank.features()
        np.testing.assert_allclose(np.linalg.norm(feats, axis=1), 1.0, atol=1e-5)
        np.testing.assert_array_equal(bank.labels(), dataset.labels.numpy())
        np.testing.assert_array_equal(bank.indices(), np.arange(1347))
        assert bank.paths() == [dataset.path(i) for i in range(1347)]
        np.testing.assert_allclose(feats, _reference_features(enc16, "digits"), atol=1e-5)
        np.testing.assert_array_equal(bank.features(10, 20), feats[10:20])
        assert bank.info.format == BANK_FORMAT
        assert bank.info.complete is True and bank.info.rows_done == 1347
        assert bank.fingerprint == encoder_fingerprint(model, header)
        assert bank.encoder == header
        assert bank.transform == "eval:digits"
        assert bank.data_spec == "digits,split=train"
        assert bank.classes == [str(d) for d in range(10)]
        assert bank.skipped == 0 and bank.normalized
        assert set(bank.info.versions) == {"isdretrieve", "torch", "h5py", "numpy"}


def test_float16_bank(workdir: Path, enc16: Path) -> None:
    result = export_bank(enc16, "digits,split=test", workdir / "f16.h5", dtype="float16", workers=0)
    assert result.rows == 450
    with FeatureBank.open(result.path) as bank:
        assert bank.dtype == np.float16
        assert bank.features(dtype=None).dtype == np.float16
        feats = bank.features()
        assert feats.dtype == np.float32
    np.testing.assert_allclose(feats, _reference_features(enc16, "digits,split=test"), atol=2e-3)


# ---------------------------------------------------------------------------------- kill and resume
_CHILD = textwrap.dedent(
    """
    import os, signal, sys
    import torch
    import isdretrieve.bank.export as bank
    import isdretrieve.encoder as frozen

    torch.set_num_threads(1)
    real_load, calls = frozen.load_backbone, [0]

    def load_and_arm(*args, **kwargs):
        model, header = real_load(*args, **kwargs)

        def die_after(module, inputs):
            calls[0] += 1
            if calls[0] > int(sys.argv[3]):  # the forward of the next batch: SIGKILL mid-export
                os.kill(os.getpid(), signal.SIGKILL)

        model.register_forward_pre_hook(die_after)
        return model, header

    frozen.load_backbone = load_and_arm
    bank.export_bank(sys.argv[1], "digits", sys.argv[2], batch_size=32, workers=0)
    """
)


def test_kill_and_resume_matches_uninterrupted(tmp_path: Path, enc16: Path, digits_bank: Path) -> None:
    out = tmp_path / "killed.h5"
    child = subprocess.run(
        [sys.executable, "-c", _CHILD, str(enc16), str(out), "20"], cwd=REPO, capture_output=True, text=True
    )
    assert child.returncode == -signal.SIGKILL, child.stderr
    with pytest.raises(BankError, match=r"is incomplete \(640 of 1347 rows\): rerun the export"):
        FeatureBank.open(out)
    result = export_bank(enc16, "digits", out, batch_size=32, workers=0)
    assert result.resumed_from == 640 and result.rows == 1347
    _assert_same_rows(out, digits_bank)


class _Interrupted(Exception):
    pass


def _partial_export(monkeypatch: pytest.MonkeyPatch, encoder: Path, out: Path, batches: int) -> None:
    """An export of digits/test that dies (in-process) at the forward of batch ``batches + 1``."""
    real, calls = FrozenEncoder.embed, [0]

    def embed(*args: object, **kwargs: object) -> torch.Tensor:
        calls[0] += 1
        if calls[0] > batches:
            raise _Interrupted
        return real(*args, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(FrozenEncoder, "embed", embed)
        with pytest.raises(_Interrupted):
            export_bank(encoder, "digits,split=test", out, batch_size=50, workers=0)


def test_resume_refuses_another_export(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, enc16: Path) -> None:
    out = tmp_path / "partial.h5"
    _partial_export(monkeypatch, enc16, out, batches=3)
    with pytest.raises(BankError, match=r"incomplete \(150 of 450 rows\)"):
        FeatureBank.open(out)
    other = _encoder(tmp_path / "other.pt", image_size=16, seed=1)
    with pytest.raises(BankError, match="partial bank of another export.*fingerprint.*delete it"):
        export_bank(other, "digits,split=test", out, workers=0)
    with pytest.raises(BankError, match="dtype float32 \\(wanted float16\\)"):
        export_bank(enc16, "digits,split=test", out, dtype="float16", workers=0)
    with pytest.raises(BankError, match="data digits,split=test \\(wanted digits,split=train\\)"):
        export_bank(enc16, "digits", out, workers=0)
    with pytest.raises(BankError, match="shard 0/1 \\(wanted 0/2\\)"):
        export_bank(enc16, "digits,split=test", out, shard=(0, 2), workers=0)
    result = export_bank(enc16, "digits,split=test", out, batch_size=50, workers=0)
    assert result.resumed_from == 150 and result.rows == 450
    with FeatureBank.open(out) as bank:
        np.testing.assert_allclose(
            bank.features(), _reference_features(enc16, "digits,split=test"), atol=1e-5
        )


def test_complete_bank_rerun_is_a_no_op(tmp_path: Path, enc16: Path) -> None:
    out = tmp_path / "done.h5"
    export_bank(enc16, "digits,split=test", out, workers=0)
    before, stamp = out.read_bytes(), out.stat().st_mtime_ns
    again = export_bank(enc16, "digits,split=test", out, workers=0)
    assert (again.rows, again.images_per_s, again.resumed_from) == (450, 0.0, 450)
    assert out.read_bytes() == before and out.stat().st_mtime_ns == stamp
    other = _encoder(tmp_path / "other.pt", image_size=16, seed=1)
    with pytest.raises(BankError, match="complete bank of another export"):
        export_bank(other, "digits,split=test", out, workers=0)


def test_out_that_is_not_a_bank_is_left_alone(tmp_path: Path, enc16: Path) -> None:
    text = tmp_path / "notes.h5"
    text.write_text("my notes")
    with pytest.raises(BankError, match="cannot be opened as an HDF5 file"):
        export_bank(enc16, "digits,split=test", text, workers=0)
    other = tmp_path / "other.h5"
    with h5py.File(other, "w") as f:
        f["x"] = np.arange(3)
    with pytest.raises(BankError, match="not a feature bank"):
        export_bank(enc16, "digits,split=test", other, workers=0)
    assert text.read_text() == "my notes"
    with h5py.File(other, "r") as f:
        assert list(f) == ["x"]


# ----------------------------------------------------------------------------------- bad images
@pytest.fixture
def messy_folder(tmp_path: Path) -> Path:
    """Two classes of 20x20 PNGs plus a truncated JPEG (class a) and a zero-byte .jpg (class b)."""
    root = tmp_path / "messy"
    rng = np.random.default_rng(0)
    for cls in ("a", "b"):
        (root / cls).mkdir(parents=True)
        for k in range(3):
            Image.fromarray(rng.integers(0, 255, (20, 20, 3), dtype=np.uint8)).save(root / cls / f"{k}.png")
    Image.fromarray(rng.integers(0, 255, (20, 20, 3), dtype=np.uint8)).save(root / "a" / "trunc.jpg")
    data = (root / "a" / "trunc.jpg").read_bytes()
    (root / "a" / "trunc.jpg").write_bytes(data[: len(data) // 3])
    (root / "b" / "empty.jpg").write_bytes(b"")
    return root


def test_bad_image_error_names_the_file(tmp_path: Path, messy_folder: Path, enc16: Path) -> None:
    out = tmp_path / "messy.h5"
    with pytest.raises(DataError, match="trunc.jpg"):
        export_bank(enc16, f"folder:{messy_folder}", out, batch_size=4, workers=0)
    with pytest.raises(BankError, match="incomplete"):
        FeatureBank.open(out)
    (messy_folder / "b" / "0.png").rename(messy_folder / "b" / "00.png")  # same count, other files
    with pytest.raises(BankError, match="partial bank of another export .file list sha256"):
        export_bank(enc16, f"folder:{messy_folder}", out, on_bad_image="skip", workers=0)


def test_bad_images_skipped(tmp_path: Path, messy_folder: Path, enc16: Path) -> None:
    spec = f"folder:{messy_folder}"
    dataset = open_dataset(spec)
    assert [dataset.path(i) for i in (3, 7)] == ["a/trunc.jpg", "b/empty.jpg"]
    result = export_bank(enc16, spec, tmp_path / "messy.h5", batch_size=3, workers=2, on_bad_image="skip")
    assert (result.rows, result.skipped) == (6, 2)
    good = [0, 1, 2, 4, 5, 6]
    with FeatureBank.open(result.path) as bank:
        assert bank.skipped == 2 and bank.skipped_paths == ["a/trunc.jpg", "b/empty.jpg"]
        np.testing.assert_array_equal(bank.indices(), good)
        np.testing.assert_array_equal(bank.labels(), [0, 0, 0, 1, 1, 1])
        assert bank.paths() == [dataset.path(i) for i in good]
        assert bank.classes == ["a", "b"]
        model, header = load_backbone(enc16)
        images = torch.stack([dataset[i][0] for i in good])
        with torch.inference_mode():
            expected = F.normalize(model(eval_view(images, "digits")), dim=1).numpy()
        np.testing.assert_allclose(bank.features(), expected, atol=1e-5)


# ------------------------------------------------------------------------------------ fingerprint
def test_fingerprint_tracks_weights_and_input_contract(digits_bank: Path, enc16: Path) -> None:
    torch.manual_seed(0)
    model = build_backbone("small_cnn").eval()
    header = EncoderHeader("small_cnn", False, 256, 16, IMAGENET_MEAN, IMAGENET_STD)
    fp = encoder_fingerprint(model, header)
    assert len(fp) == 16 and int(fp, 16) >= 0
    twin = copy.deepcopy(model)
    assert encoder_fingerprint(twin, header) == fp
    with torch.no_grad():
        twin.stage1[0].conv.weight[0, 0, 0, 0] += 1e-6
    assert encoder_fingerprint(twin, header) != fp
    assert (
        encoder_fingerprint(model, EncoderHeader("small_cnn", False, 256, 32, IMAGENET_MEAN, IMAGENET_STD))
        != fp
    )
    with FeatureBank.open(digits_bank) as bank:
        assert bank.fingerprint == encoder_fingerprint(*load_backbone(enc16)) == fp


def test_transform_names() -> None:
    def header(size: int) -> EncoderHeader:
        return EncoderHeader("resnet18", False, 512, size, IMAGENET_MEAN, IMAGENET_STD)

    names = [transform_name(header(s)) for s in (16, 32, 224, 96)]
    assert names == ["eval:digits", "eval:cifar", "eval:imagenet", "eval:resize110-crop96"]


# --------------------------------------------------------------------------------------- shards
def test_shards_join_to_the_single_export(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, enc16: Path
) -> None:
    spec, kw = "digits,split=test", {"batch_size": 45, "workers": 0}
    single = export_bank(enc16, spec, tmp_path / "single.h5", **kw).path
    parts = [export_bank(enc16, spec, tmp_path / f"part{r}.h5", shard=(r, 2), **kw) for r in (0, 1)]
    assert [p.rows for p in parts] == [225, 225]
    with FeatureBank.open(parts[1].path) as bank:
        assert bank.shard == (1, 2) and bank.indices()[0] == 225
    joined = join_shards([parts[1].path, parts[0].path], tmp_path / "joined.h5")
    _assert_same_rows(joined, single)
    with FeatureBank.open(joined) as bank:
        assert bank.shard == (0, 1) and bank.data_spec == spec

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    via_env = export_bank(enc16, spec, tmp_path / "env.h5", **kw)
    assert via_env.path == tmp_path / "env.shard1-of-2.h5" == shard_path(tmp_path / "env.h5", 1, 2)
    _assert_same_rows(via_env.path, parts[1].path)

    with pytest.raises(BankError, match="ranks 0..1 of 2"):
        join_shards([parts[0].path], tmp_path / "bad.h5")
    foreign = write_bank(tmp_path / "foreign.h5", np.ones((2, 256)), labels=[0, 1], fingerprint="0" * 16)
    with pytest.raises(BankError, match="does not match.*fingerprint"):
        join_shards([parts[0].path, foreign], tmp_path / "bad.h5")
    assert not (tmp_path / "bad.h5").exists()


# ---------------------------------------------------------------------------- write_bank and open
def test_write_bank_and_read_back(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    raw = rng.normal(size=(40, 8)).astype(np.float32) * 3
    header = EncoderHeader("small_cnn", False, 8, 32, IMAGENET_MEAN, IMAGENET_STD)
    path = write_bank(
        tmp_path / "sub" / "w.h5",
        torch.from_numpy(raw),
        labels=np.arange(40) % 4,
        paths=[f"img{i}.jpg" for i in range(40)],
        fingerprint="abcd" * 4,
        encoder=header.to_dict(),
        transform="eval:cifar",
        data_spec="folder:/x,split=test,size=32",
        classes=["a", "b", "c", "d"],
        dtype="float16",
    )
    assert sorted(p.name for p in path.parent.iterdir()) == ["w.h5"]  # no temp file left
    with FeatureBank.open(path) as bank:
        assert (len(bank), bank.dim, bank.dtype) == (40, 8, np.float16)
        expected = raw / np.linalg.norm(raw, axis=1, keepdims=True)
        np.testing.assert_allclose(bank.features(), expected, atol=1e-3)
        np.testing.assert_array_equal(bank.labels(), np.arange(40) % 4)
        np.testing.assert_array_equal(bank.indices(), np.arange(40))
        assert bank.paths()[3] == "img3.jpg" and bank.encoder == header
        assert (bank.fingerprint, bank.transform, bank.classes) == (
            "abcd" * 4,
            "eval:cifar",
            ["a", "b", "c", "d"],
        )
    plain = write_bank(tmp_path / "raw.h5", raw, labels=[-1] * 40, fingerprint="f" * 16, normalize=False)
    with FeatureBank.open(plain) as bank:
        np.testing.assert_array_equal(bank.features(), raw)
        assert not bank.normalized and bank.encoder is None and bank.paths()[:2] == ["0", "1"]
    with pytest.raises(ValueError, match="labels has 3 entries for 40"):
        write_bank(tmp_path / "bad.h5", raw, labels=[0, 1, 2], fingerprint="f" * 16)


def test_open_refuses_what_is_not_a_complete_bank(tmp_path: Path) -> None:
    with pytest.raises(BankError, match="not found"):
        FeatureBank.open(tmp_path / "missing.h5")
    (tmp_path / "text.h5").write_text("hello")
    with pytest.raises(BankError, match="not an HDF5 file"):
        FeatureBank.open(tmp_path / "text.h5")
    with h5py.File(tmp_path / "plain.h5", "w") as f:
        f["features"] = np.zeros((2, 2))
    with pytest.raises(BankError, match="not a feature bank"):
        FeatureBank.open(tmp_path / "plain.h5")


# ----------------------------------------------------------------------------------- CIFAR copy
@pytest.mark.cifar
@pytest.mark.slow
def test_cifar_test_split_from_jpeg_folder(tmp_path: Path, cifar_root: Path) -> None:
    encoder = _encoder(tmp_path / "enc32.pt", image_size=32)
    result = export_bank(
        encoder, f"folder:{cifar_root},split=test", tmp_path / "cifar.h5", batch_size=500, workers=2
    )
    assert (result.rows, result.skipped) == (10000, 0)
    with FeatureBank.open(result.path) as bank:
        assert len(bank) == 10000 and bank.transform == "eval:cifar"
        assert bank.classes == sorted(p.name for p in (cifar_root / "test").iterdir() if p.is_dir())
        assert len(bank.classes) == 10
        np.testing.assert_array_equal(np.bincount(bank.labels()), [1000] * 10)
        assert bank.data_spec == f"folder:{cifar_root},split=test,size=32"
        head = bank.features(0, 64)
    np.testing.assert_allclose(np.linalg.norm(head, axis=1), 1.0, atol=1e-5)
