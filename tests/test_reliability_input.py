"""Bad input through the real CLIs: one ``error:`` line, exit code 2, no traceback, nothing half-written.

Grayscale, RGBA and very large (but sane) images are not errors: they are converted and resized.
Every case is listed in docs/reliability.md with the line the user sees.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from isdretrieve.bank.export import export_bank
from isdretrieve.cli.index import main as index_main
from isdretrieve.cli.train import main as train_main
from isdretrieve.errors import BankError, DataError
from isdretrieve.files.bank import FeatureBank
from isdretrieve.files.encoder_header import IMAGENET_MEAN, IMAGENET_STD, EncoderHeader
from isdretrieve.index.build import build_index
from isdretrieve.models.backbones import build_backbone
from isdretrieve.models.checkpoints import export_encoder
from isdretrieve.retrieve.retriever import Retriever

RECIPE = """\
method: {name: isd, queue_size: 128}
data: {train: "digits,split=test", preset: digits, workers: 0}
model: {arch: small_cnn}
optim: {batch_size: 64, epochs: 1, lr: 0.05, warmup_epochs: 0}
engine: {seed: 0, log_every: 1}
monitor: {every: 0}
"""


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("input")


def _encoder(path: Path, seed: int) -> Path:
    torch.manual_seed(seed)
    header = EncoderHeader("small_cnn", False, 256, 16, IMAGENET_MEAN, IMAGENET_STD)
    export_encoder(build_backbone("small_cnn"), header, path)
    return path


@pytest.fixture(scope="module")
def encoder(work: Path) -> Path:
    return _encoder(work / "enc.pt", seed=0)


@pytest.fixture(scope="module")
def index_dir(work: Path, encoder: Path) -> Path:
    """A Flat index over digits/test (450 rows) with its encoder, as a Retriever needs."""
    torch.set_num_threads(1)
    bank = export_bank(encoder, "digits,split=test", work / "bank.h5", batch_size=150, workers=0).path
    build_index(bank, work / "idx", factory="Flat")
    (work / "idx" / "encoder.pt").write_bytes(encoder.read_bytes())
    return work / "idx"


@pytest.fixture(scope="module")
def recipe(work: Path) -> Path:
    path = work / "tiny.yaml"
    path.write_text(RECIPE)
    return path


def _image(path: Path, mode: str = "RGB", size: tuple[int, int] = (20, 20), fmt: str | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(len(path.name))
    channels = {"L": (), "RGB": (3,), "RGBA": (4,)}[mode]
    pixels = rng.integers(0, 256, (size[1], size[0], *channels), dtype=np.uint8)
    Image.fromarray(pixels, mode).save(path, fmt)
    return path


def _folder(root: Path, n: int = 4) -> Path:
    """An ImageFolder with classes a and b, ``n`` small RGB PNGs each."""
    for cls in ("a", "b"):
        for k in range(n):
            _image(root / cls / f"{k}.png")
    return root


def _export(encoder: Path, data: str, out: Path, *extra: str):
    args = ["export", "--checkpoint", str(encoder), "--data", data, "--out", str(out)]
    return CliRunner().invoke(index_main, [*args, "--workers", "0", "--batch-size", "4", "--quiet", *extra])


def _fails(result, message: str) -> str:
    """Exit code 2, exactly one line, starting ``error: `` + message (a regex-free prefix check)."""
    assert result.exit_code == 2, (result.exit_code, result.output)
    lines = result.output.strip().splitlines()
    assert len(lines) == 1, result.output
    assert lines[0].startswith("error: " + message), result.output
    assert "Traceback" not in result.output
    return lines[0]


def _no_complete_bank(path: Path) -> None:
    if path.exists():
        with pytest.raises(BankError):
            FeatureBank.open(path)


# ------------------------------------------------------------------------------------- data roots
def test_missing_data_root(tmp_path: Path, encoder: Path) -> None:
    result = _export(encoder, f"folder:{tmp_path / 'nowhere'}", tmp_path / "b.h5")
    _fails(result, f"data root '{tmp_path / 'nowhere'}' does not exist or is not a folder")
    assert not (tmp_path / "b.h5").exists()


def test_empty_data_root(tmp_path: Path, encoder: Path) -> None:
    (tmp_path / "empty").mkdir()
    _fails(_export(encoder, f"folder:{tmp_path / 'empty'}", tmp_path / "b.h5"), "data root ")
    assert not (tmp_path / "b.h5").exists()


def test_class_folder_without_images(tmp_path: Path, encoder: Path) -> None:
    root = _folder(tmp_path / "data")
    (root / "c").mkdir()
    (root / "c" / "notes.txt").write_text("not an image")
    result = _export(encoder, f"folder:{root}", tmp_path / "b.h5")
    _fails(result, f"class folder '{root / 'c'}' holds no images")
    assert not (tmp_path / "b.h5").exists()


# ------------------------------------------------------------------------------------ image files
def _broken(root: Path, name: str, content: bytes) -> Path:
    _folder(root)
    (root / "b" / name).write_bytes(content)
    return root / "b" / name


def _truncated_jpeg(tmp_path: Path) -> bytes:
    good = _image(tmp_path / "good.jpg", size=(64, 64)).read_bytes()
    return good[: len(good) // 2]


@pytest.mark.parametrize(
    "name, content",
    [
        ("truncated.jpg", None),  # filled in below: half a JPEG
        ("text.jpg", b"this is not an image\n"),
        ("zero.png", b""),
    ],
    ids=["truncated-jpeg", "non-image-file", "zero-byte-file"],
)
def test_unreadable_image_names_the_file_and_leaves_no_complete_bank(
    tmp_path: Path, encoder: Path, name: str, content: bytes | None
) -> None:
    bad = _broken(tmp_path / "data", name, _truncated_jpeg(tmp_path) if content is None else content)
    out = tmp_path / "b.h5"
    _fails(_export(encoder, f"folder:{tmp_path / 'data'}", out), f"cannot decode image '{bad}'")
    _no_complete_bank(out)
    # the documented way out: skip unreadable images (counted, listed in the bank)
    skipped = _export(encoder, f"folder:{tmp_path / 'data'}", tmp_path / "skip.h5", "--on-bad-image", "skip")
    assert skipped.exit_code == 0 and "1 unreadable images skipped" in skipped.output, skipped.output


def test_grayscale_and_rgba_images_are_converted(tmp_path: Path, encoder: Path) -> None:
    root = tmp_path / "data"
    _image(root / "a" / "gray.png", "L")
    _image(root / "a" / "gray.jpg", "L")
    _image(root / "b" / "rgba.png", "RGBA")
    _image(root / "b" / "rgb.jpg", "RGB")
    result = _export(encoder, f"folder:{root}", tmp_path / "b.h5")
    assert result.exit_code == 0, result.output
    with FeatureBank.open(tmp_path / "b.h5") as bank:
        assert len(bank) == 4 and np.isfinite(bank.features()).all()


def test_huge_but_sane_image_is_resized(tmp_path: Path, encoder: Path) -> None:
    root = _folder(tmp_path / "data")
    _image(root / "a" / "huge.jpg", size=(6000, 4000))  # 24 Mpx: decoded at reduced scale, resized
    result = _export(encoder, f"folder:{root}", tmp_path / "b.h5")
    assert result.exit_code == 0, result.output
    with FeatureBank.open(tmp_path / "b.h5") as bank:
        assert len(bank) == 9


def test_decompression_bomb_is_refused(
    tmp_path: Path, encoder: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = _folder(tmp_path / "data")
    bomb = _image(root / "a" / "bomb.png", size=(200, 200))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 10_000)  # stands in for PIL's 89 Mpx default
    line = _fails(_export(encoder, f"folder:{root}", tmp_path / "b.h5"), f"cannot decode image '{bomb}'")
    assert "decompression bomb" in line
    _no_complete_bank(tmp_path / "b.h5")


# --------------------------------------------------------------------------------- SPECs and lists
@pytest.mark.parametrize(
    "spec, message",
    [
        ("imagenet:/data", "bad data SPEC"),
        ("digits,split=validation", "bad data SPEC"),
        ("folder", "bad data SPEC"),
    ],
)
def test_wrong_data_spec(tmp_path: Path, encoder: Path, spec: str, message: str) -> None:
    _fails(_export(encoder, spec, tmp_path / "b.h5"), message)
    assert not (tmp_path / "b.h5").exists()


def test_list_file_with_a_missing_image(tmp_path: Path, encoder: Path) -> None:
    root = tmp_path / "imagenet"
    _image(root / "train" / "n01" / "a.JPEG", fmt="JPEG")
    listing = tmp_path / "D1.txt"
    listing.write_text("class names : \nn01\nTrain Images: \n/train/n01/a.JPEG\n/train/n01/gone.JPEG\n")
    line = _fails(
        _export(encoder, f"list:{listing}@{root}", tmp_path / "b.h5"), f"list file '{listing}' line 5"
    )
    assert "gone.JPEG' not found" in line


# ------------------------------------------------------------------------------------- checkpoints
def test_checkpoint_of_the_wrong_architecture(tmp_path: Path, recipe: Path) -> None:
    out = tmp_path / "run"
    assert CliRunner().invoke(train_main, [str(recipe), "--out", str(out), "--quiet"]).exit_code == 0
    before = sorted(p.name for p in (out / "checkpoints").iterdir())
    args = [str(recipe), "--out", str(out), "--quiet", "--resume", "--set", "model.arch=resnet18"]
    line = _fails(CliRunner().invoke(train_main, args), "cannot resume from ")
    assert line.endswith("it was trained with model.arch=small_cnn, this recipe has resnet18")
    args = [str(recipe), "--out", str(out), "--quiet", "--resume", "--set", "method.queue_size=64"]
    line = _fails(CliRunner().invoke(train_main, args), "cannot resume from ")
    assert "does not fit this recipe (size mismatch for memory.embeddings" in line
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == before


def test_random_bytes_as_a_checkpoint(tmp_path: Path) -> None:
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(np.random.default_rng(0).bytes(4096))
    _fails(_export(garbage, "digits,split=test", tmp_path / "b.h5"), f"cannot read checkpoint {garbage}")
    assert not (tmp_path / "b.h5").exists()


def test_checkpoint_that_unpickles_an_arbitrary_object_is_refused(tmp_path: Path) -> None:
    evil = tmp_path / "evil.pt"
    torch.save({"state_dict": {}, "payload": os.system}, evil)  # would resolve posix.system on load
    line = _fails(_export(evil, "digits,split=test", tmp_path / "b.h5"), "")
    assert str(evil) in line and "system" in line
    assert not (tmp_path / "b.h5").exists()


def test_missing_checkpoint(tmp_path: Path) -> None:
    result = _export(tmp_path / "nope.pt", "digits,split=test", tmp_path / "b.h5")
    _fails(result, f"checkpoint not found: {tmp_path / 'nope.pt'}")


# ----------------------------------------------------------------------------------------- recipes
@pytest.mark.parametrize(
    "text, message",
    [
        ("optim: {lrr: 0.1}\n", "unknown key 'optim.lrr'"),
        ("optim: {lr: fast}\n", "optim.lr"),
        ("optim: {epochs: 2.5}\n", "optim.epochs"),
    ],
    ids=["unknown-key", "wrong-type-str", "wrong-type-float"],
)
def test_recipe_with_an_unknown_key_or_a_wrong_type(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "r.yaml"
    path.write_text(RECIPE.replace("optim: {batch_size: 64, epochs: 1, lr: 0.05, warmup_epochs: 0}\n", text))
    line = _fails(CliRunner().invoke(train_main, [str(path), "--out", str(tmp_path / "run")]), "")
    assert message in line
    assert not (tmp_path / "run" / "checkpoints").exists()


# ------------------------------------------------------------------------------------------- k
@pytest.mark.parametrize("k", ["0", "-3"])
def test_zero_or_negative_k(index_dir: Path, k: str) -> None:
    result = CliRunner().invoke(index_main, ["recall", str(index_dir), "-k", k])
    _fails(result, f"Invalid value for '-k': {k} is not in the range x>=1.")  # click checks it on reading


def test_k_larger_than_the_bank_is_lowered(index_dir: Path) -> None:
    with pytest.warns(UserWarning, match="k=451 lowered to 449"):
        result = CliRunner().invoke(index_main, ["recall", str(index_dir), "-k", "451", "--queries", "50"])
    assert result.exit_code == 0 and "recall@449 = 1.0000" in result.output, result.output


# --------------------------------------------------------------------------------------- training
def test_nan_loss_stops_with_one_line(tmp_path: Path, recipe: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import isdretrieve.train.methods.isd as isd_module

    real = isd_module.distillation_kl
    monkeypatch.setattr(isd_module, "distillation_kl", lambda *a: real(*a) * float("nan"))
    result = CliRunner().invoke(train_main, [str(recipe), "--out", str(tmp_path / "run"), "--quiet"])
    _fails(result, "loss became NaN/inf in epoch 1 (by step 1); stopping, no checkpoint was written")
    assert not (tmp_path / "run" / "checkpoints").exists() and not (tmp_path / "run" / "encoder.pt").exists()


def test_output_directory_under_a_regular_file(tmp_path: Path, recipe: Path, encoder: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("a file, not a folder")
    result = CliRunner().invoke(train_main, [str(recipe), "--out", str(blocker / "run"), "--quiet"])
    _fails(result, f"Not a directory: {blocker / 'run'}")
    _fails(
        _export(encoder, "digits,split=test", blocker / "b.h5"),
        f"a file is in the way of a folder: {blocker}",
    )
    assert blocker.read_text() == "a file, not a folder"


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_output_directory_not_writable(tmp_path: Path, recipe: Path) -> None:
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    try:
        result = CliRunner().invoke(train_main, [str(recipe), "--out", str(locked / "run"), "--quiet"])
        _fails(result, "Permission denied: ")
    finally:
        locked.chmod(0o700)


def test_outputs_never_write_through_a_symlink_out_of_their_folder(tmp_path: Path, index_dir: Path) -> None:
    """A planted link ``OUT/index.faiss -> elsewhere`` is replaced, never written through."""
    outside = tmp_path / "outside.txt"
    outside.write_text("keep me")
    out = tmp_path / "idx"
    out.mkdir()
    for name in ("index.faiss", "manifest.json"):
        (out / name).symlink_to(outside)
    args = ["build", "--bank", str(index_dir / "bank.h5"), "--out", str(out), "--index", "Flat", "--quiet"]
    result = CliRunner().invoke(index_main, args)
    assert result.exit_code == 0, result.output
    assert outside.read_text() == "keep me"
    assert not (out / "index.faiss").is_symlink() and not (out / "manifest.json").is_symlink()


# ------------------------------------------------------------------------------------------ queries
def test_query_image_that_does_not_exist(tmp_path: Path, index_dir: Path) -> None:
    retriever = Retriever.open(index_dir, device="cpu")
    with pytest.raises(DataError, match=f"query image not found: {tmp_path / 'nope.png'}"):
        retriever.search(tmp_path / "nope.png", k=3)
    hits = retriever.search(_image(tmp_path / "q.png", "L"), k=3)  # a grayscale query works
    assert len(hits[0]) == 3


# ------------------------------------------------------------------------------- banks and indices
def test_bank_from_another_encoder_in_an_index(tmp_path: Path, work: Path, index_dir: Path) -> None:
    import shutil

    other = export_bank(
        _encoder(tmp_path / "other.pt", seed=1),
        "digits,split=test",
        tmp_path / "o.h5",
        batch_size=150,
        workers=0,
    ).path
    target = tmp_path / "idx"
    shutil.copytree(index_dir, target)
    (target / "bank.h5").unlink()
    shutil.copy(other, target / "bank.h5")
    line = _fails(CliRunner().invoke(index_main, ["recall", str(target)]), f"bank {target / 'bank.h5'}")
    assert "was made by another encoder (fingerprint" in line and line.endswith("rebuild the index")


def test_pairs_from_another_bank(tmp_path: Path, work: Path, encoder: Path, index_dir: Path) -> None:
    from isdretrieve.files.pairs import MiningParams
    from isdretrieve.mine.mining import mine_pairs

    pairs = tmp_path / "pairs.h5"
    mine_pairs(index_dir / "bank.h5", pairs, MiningParams(k=2))  # mined over digits,split=test
    recipe = tmp_path / "sepp.yaml"
    recipe.write_text(
        f"method: {{name: sepp, pairs: {pairs}}}\ndata: {{train: 'digits,split=train'}}\n"
        "monitor: {every: 0}\n"
    )
    result = CliRunner().invoke(train_main, [str(recipe), "--out", str(tmp_path / "run"), "--quiet"])
    line = _fails(result, f"method.pairs: {pairs} was mined over 450 images")
    assert line.endswith("the training set has 1347: mine the bank of data.train")
    other = _encoder(tmp_path / "other.pt", seed=1)  # the same pairs file against another bank
    bank = export_bank(other, "digits,split=test", tmp_path / "b.h5", batch_size=150, workers=0).path
    rerun = CliRunner().invoke(index_main, ["mine", str(bank), "--out", str(pairs), "-k", "2"])
    assert "holds pairs mined from another bank or with other settings" in _fails(rerun, str(pairs))


def test_verbose_shows_the_traceback(tmp_path: Path, encoder: Path) -> None:
    result = _export(encoder, f"folder:{tmp_path / 'nowhere'}", tmp_path / "b.h5", "--verbose")
    assert result.exit_code == 2 and "Traceback" in result.output
    assert result.output.strip().splitlines()[-1].startswith("error: data root ")
