"""Shared fixtures: the CIFAR-10 copy from ../shared/data (unpacked once into a git-ignored cache),
thread limits, and random-init encoders for bank/index tests."""

from __future__ import annotations

import hashlib
import tarfile
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
CIFAR_TARBALL = REPO.parent / "shared" / "data" / "cifar10-jpeg.tar.gz"
CACHE = REPO / ".cache"


def _unpack_cifar() -> Path:
    target = CACHE / "cifar10-jpeg"
    done = target / ".unpacked"
    if not done.exists():
        target.mkdir(parents=True, exist_ok=True)
        with tarfile.open(CIFAR_TARBALL) as tar:
            tar.extractall(target, filter="data")
        done.write_text(hashlib.sha256(CIFAR_TARBALL.read_bytes()).hexdigest())
    # the archive may or may not hold a top-level folder
    return next(p.parent for p in target.rglob("train") if p.is_dir() and (p.parent / "test").is_dir())


@pytest.fixture(scope="session")
def cifar_root() -> Path:
    """Folder holding `train/<class>/*.jpg` and `test/<class>/*.jpg` (CIFAR-10, JPEG q75 copy)."""
    if not CIFAR_TARBALL.exists():
        pytest.skip(f"shared CIFAR-10 copy not found at ../shared/data/{CIFAR_TARBALL.name}")
    return _unpack_cifar()


@pytest.fixture(autouse=True)
def _few_threads():
    """Tests run on 2-core machines: keep torch from oversubscribing them."""
    torch.set_num_threads(2)
    yield


@pytest.fixture
def one_thread():
    """One intra-op thread: on a shared 2-core machine, 2 threads stall on each other's barriers."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def random_encoder(path: Path, *, image_size: int = 16, seed: int = 0) -> Path:
    """A random-init small CNN exported as an ``encoder.pt`` for ``image_size`` inputs (ImageNet stats)."""
    from isdretrieve.files.encoder_header import IMAGENET_MEAN, IMAGENET_STD, EncoderHeader
    from isdretrieve.models.backbones import build_backbone
    from isdretrieve.models.checkpoints import export_encoder

    torch.manual_seed(seed)
    header = EncoderHeader("small_cnn", False, 256, image_size, IMAGENET_MEAN, IMAGENET_STD)
    export_encoder(build_backbone("small_cnn"), header, path)
    return path


def bank_contents(path: Path) -> tuple:
    """A complete bank's rows (features as stored, labels, indices, paths) and fingerprint, to compare
    two exports byte for byte."""
    from isdretrieve.files.bank import FeatureBank

    with FeatureBank.open(path) as bank:
        return (
            bank.features(dtype=None).tobytes(),
            bank.labels().tobytes(),
            bank.indices().tobytes(),
            bank.paths(),
            bank.fingerprint,
        )


class StopAfterCheckpoint(Exception):
    """Raised by :func:`train_until_checkpoint` right after the checkpoint it waits for."""


def train_until_checkpoint(recipe, out: Path, monkeypatch, epoch: int = 1) -> None:
    """Train ``recipe`` into ``out`` and stop right after the end-of-epoch-``epoch`` checkpoint is
    written, as a crash there would: what a resume test resumes from."""
    from isdretrieve.train.engine import Trainer

    real_save = Trainer._save

    def save_then_stop(self, *args, **kwargs):
        real_save(self, *args, **kwargs)
        if self.epoch == epoch:
            raise StopAfterCheckpoint

    with monkeypatch.context() as patch:
        patch.setattr(Trainer, "_save", save_then_stop)
        with pytest.raises(StopAfterCheckpoint):
            Trainer(recipe, out, quiet=True).fit()


@pytest.fixture(scope="session")
def make_encoder():
    """:func:`random_encoder`, for tests that need an encoder file."""
    return random_encoder


@pytest.fixture(scope="session")
def digits_pairs(tmp_path_factory):
    """SePP pairs mined (k=3, mutual) from a random-init encoder's digits bank: (Pairs, its path)."""
    from isdretrieve.bank.export import export_bank
    from isdretrieve.files.pairs import MiningParams
    from isdretrieve.mine.mining import mine_pairs

    root = tmp_path_factory.mktemp("sepp")
    bank = export_bank(random_encoder(root / "enc.pt"), "digits", root / "bank.h5", workers=0).path
    return mine_pairs(bank, root / "pairs.h5", MiningParams(k=3, mutual=True)), root / "pairs.h5"


def build_test_index(root: Path, data: str, *, image_size: int = 16, name: str = "index") -> Path:
    """An exact index ``root/NAME`` over ``data`` with a random-init small CNN (fixed seed), through the
    pipeline, so the directory holds its ``encoder.pt``."""
    from isdretrieve.pipeline import build_index_from_checkpoint

    encoder = random_encoder(root / "enc.pt", image_size=image_size)
    build_index_from_checkpoint(encoder, data, root / name, factory="Flat", workers=0)
    return root / name


@pytest.fixture(scope="session")
def digits_test_index(tmp_path_factory) -> Path:
    """An exact index over the digits test split (450 rows, 10 classes) with a random-init encoder."""
    return build_test_index(tmp_path_factory.mktemp("digits-index"), "digits,split=test")


@pytest.fixture(scope="session")
def chromium_path() -> str:
    """Path of headless Chromium; skipped without it unless ISD_REQUIRE_BROWSER is set (then a failure)."""
    import os
    import shutil

    found = shutil.which("chromium") or "/usr/bin/chromium"
    if not Path(found).is_file():
        if os.environ.get("ISD_REQUIRE_BROWSER", "") not in ("", "0"):
            pytest.fail("ISD_REQUIRE_BROWSER is set but chromium is not installed")
        pytest.skip("chromium is not installed (set ISD_REQUIRE_BROWSER=1 to make this a failure)")
    return found


# A child process that exports a bank and SIGKILLs itself before embedding batch N+1.
# argv: ENCODER SPEC OUT N WORKERS (batch size 50).
KILLED_EXPORT = """
import os, signal, sys
import torch
import isdretrieve.bank.export as bank
from isdretrieve.encoder import FrozenEncoder

torch.set_num_threads(1)
real, calls = FrozenEncoder.embed, [0]

def embed(*args, **kwargs):
    calls[0] += 1
    if calls[0] > int(sys.argv[4]):
        os.kill(os.getpid(), signal.SIGKILL)
    return real(*args, **kwargs)

FrozenEncoder.embed = embed
bank.export_bank(sys.argv[1], sys.argv[2], sys.argv[3], batch_size=50, workers=int(sys.argv[5]))
"""
