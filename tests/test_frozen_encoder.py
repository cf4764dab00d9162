"""One frozen-encoder contract: bank export, ``Retriever``, the training monitor and the image linear
evaluation embed through ``FrozenEncoder``, with the header's own normalisation; one typed bank schema;
training without FAISS installed."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from isdretrieve.bank.arrays import write_bank
from isdretrieve.bank.export import export_bank
from isdretrieve.data.open import open_dataset
from isdretrieve.encoder import FrozenEncoder, encoder_fingerprint, transform_name
from isdretrieve.errors import BankError, DataError, InvalidArgument
from isdretrieve.evaluate.knn import knn_top1
from isdretrieve.files.bank import BANK_FORMAT, BankAttrs, FeatureBank
from isdretrieve.files.encoder_header import EncoderHeader
from isdretrieve.index.build import build_index
from isdretrieve.models.backbones import build_backbone
from isdretrieve.models.checkpoints import export_encoder
from isdretrieve.retrieve.retriever import Retriever
from isdretrieve.train.monitor import KnnMonitor

REPO = Path(__file__).resolve().parents[1]
MEAN, STD = (0.3, 0.5, 0.7), (0.2, 0.25, 0.3)  # not ImageNet's: a wrong normalisation would show

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def custom_encoder(tmp_path: Path) -> tuple[Path, torch.nn.Module, EncoderHeader]:
    torch.manual_seed(5)
    model = build_backbone("small_cnn").eval()
    header = EncoderHeader("small_cnn", False, 256, 16, MEAN, STD)
    export_encoder(model, header, tmp_path / "encoder.pt")
    return tmp_path / "encoder.pt", model, header


def _by_hand(model: torch.nn.Module, images: torch.Tensor) -> torch.Tensor:
    """The features an independent forward gives: [0,1] pixels, the header's mean/std, L2 norm."""
    x = (images.float() / 255 - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)
    with torch.no_grad():
        return F.normalize(model(x), dim=1)


def test_bank_retriever_and_monitor_embed_alike(custom_encoder, tmp_path: Path) -> None:
    path, model, header = custom_encoder
    data = open_dataset("digits,split=test")
    images = data.load_all()
    expected = _by_hand(model, images)

    index_dir = tmp_path / "index"
    index_dir.mkdir()
    (index_dir / "encoder.pt").write_bytes(path.read_bytes())
    export_bank(path, "digits,split=test", index_dir / "bank.h5", workers=0)
    build_index(index_dir / "bank.h5", index_dir, factory="Flat")
    with FeatureBank.open(index_dir / "bank.h5") as bank:
        np.testing.assert_allclose(bank.features(), expected.numpy(), atol=1e-5)
        assert bank.encoder.mean == MEAN and bank.encoder.std == STD and bank.transform == "eval:digits"

    retriever = Retriever.open(index_dir, device="cpu")
    np.testing.assert_allclose(retriever.encode(images[:40]).numpy(), expected[:40].numpy(), atol=1e-5)
    hits = retriever.search(images[[3, 77]], k=1)
    assert [h[0].row for h in hits] == [3, 77] and min(h[0].score for h in hits) >= 0.9999

    monitor = KnnMonitor(data, data, k=5, temperature=0.07, device=torch.device("cpu"))
    live = FrozenEncoder(model.train(), header)  # the monitor's live network, in training mode
    np.testing.assert_allclose(live.embed(images).numpy(), expected.numpy(), atol=1e-5)
    assert model.training  # embed restored the network's mode
    labels = data.labels
    by_hand = knn_top1(expected, labels, expected, labels, k=5, temperature=0.07)
    assert monitor.evaluate(live).top1 == pytest.approx(by_hand, abs=1e-9)


def test_embed_batches_shapes_and_errors(custom_encoder) -> None:
    path, model, _ = custom_encoder
    images = open_dataset("digits,split=test").load_all()[:70]
    encoder = FrozenEncoder.load(path, device="cpu", batch_size=32)  # 3 forwards
    assert not encoder.backbone.training and not any(p.requires_grad for p in encoder.backbone.parameters())
    assert encoder.fingerprint == encoder_fingerprint(model, encoder.header)
    out = encoder.embed(images)
    assert out.dtype == torch.float32 and out.shape == (70, 256) and out.device.type == "cpu"
    np.testing.assert_allclose(out.numpy(), _by_hand(model, images).numpy(), atol=1e-5)
    bigger = torch.nn.functional.interpolate(images.float(), size=24).round().to(torch.uint8)
    assert encoder.embed(bigger).shape == (70, 256)  # any input size: the eval view is taken inside
    assert encoder.embed(images[:0]).shape == (0, 256)
    with pytest.raises(DataError, match=r"expected images \[B,3,H,W\]"):
        encoder.embed(images[:, :1])
    with pytest.raises(InvalidArgument, match="precision must be one of"):
        FrozenEncoder(model, encoder.header, precision="fp8")  # type: ignore[arg-type]


def test_eval_transform_of_a_non_preset_size() -> None:
    """A 64-px encoder sees the shorter side resized to 73 (64 / 0.875) and a centre crop of 64."""
    torch.manual_seed(0)
    model = build_backbone("small_cnn").eval()
    header = EncoderHeader("small_cnn", False, 256, 64, MEAN, STD)
    encoder = FrozenEncoder(model, header, device="cpu")
    assert (encoder.decode_side, transform_name(header)) == (73, "eval:resize73-crop64")
    images = torch.randint(0, 256, (2, 3, 90, 120), dtype=torch.uint8)
    resized = F.interpolate(images.float() / 255, size=(73, 97), mode="bilinear", antialias=True)
    top, left = round((73 - 64) / 2), round((97 - 64) / 2)
    crop = resized[..., top : top + 64, left : left + 64]
    x = (crop - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)
    with torch.no_grad():
        expected = F.normalize(model(x), dim=1)
    np.testing.assert_allclose(encoder.embed(images).numpy(), expected.numpy(), atol=1e-5)


def test_nothing_else_takes_eval_views() -> None:
    """Only ``FrozenEncoder`` turns images into eval views for a network: no module of the library
    calls the eval transform but the data layer that defines it and the frozen encoder."""
    allowed = {"isdretrieve/encoder.py", "isdretrieve/data/augment.py"}
    callers = set()
    for path in (REPO / "isdretrieve").rglob("*.py"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Call):
                name = getattr(node.func, "id", getattr(node.func, "attr", ""))
                if name in ("eval_view", "eval_transform"):
                    callers.add(str(path.relative_to(REPO)))
    assert callers - allowed == set()
    assert "isdretrieve/encoder.py" in callers


# --------------------------------------------------------------------------------------- bank schema
def test_bank_attributes_round_trip(tmp_path: Path) -> None:
    header = EncoderHeader("vit_tiny", False, 192, 32, MEAN, STD, source="run:student", patch_size=4)
    attrs = BankAttrs(
        fingerprint="0123456789abcdef",
        encoder=header,
        transform="eval:cifar",
        data_spec="wds:/x/{0..1}.tar",
        classes=("cat", "dog"),
        normalized=True,
        created="2026-12-05T00:00:00+00:00",
        versions={"torch": "2.14.1"},
        skipped=1,
        skipped_paths=("1.tar/bad",),
        shard=(1, 2),
        items_done=7,
        items_total=9,
        items_sha256="feedfacefeedface",
        rows_done=6,
        complete=False,
        shard_files=(("0.tar", 1024, 4), ("1.tar", 2048, 5)),
        shards_done=(0,),
    )
    with h5py.File(tmp_path / "a.h5", "w") as f:
        attrs.write(f)
        BankAttrs.update(f, rows_done=8, shards_done=[0, 1], complete=True)
        assert isinstance(f.attrs["rows_done"], np.int64) and f.attrs["shard"] == "[1, 2]"
        with pytest.raises(KeyError, match="no bank attribute 'rowsdone'"):
            BankAttrs.update(f, rowsdone=1)
    with h5py.File(tmp_path / "a.h5", "r") as f:
        back = BankAttrs.read(f, tmp_path / "a.h5")
    assert back == BankAttrs(**{**attrs.__dict__, "rows_done": 8, "shards_done": (0, 1), "complete": True})
    assert back.format == BANK_FORMAT and back.encoder == header


def test_a_malformed_bank_attribute_is_one_line(tmp_path: Path) -> None:
    path = write_bank(tmp_path / "b.h5", np.eye(4, 8), labels=[0, 1, 2, 3], fingerprint="f" * 16)
    with h5py.File(path, "r+") as f:
        f.attrs["shard"] = "[0]"
    with pytest.raises(BankError, match=r"b.h5 has a malformed attribute 'shard'") as info:
        FeatureBank.open(path)
    assert "\n" not in str(info.value)


# ----------------------------------------------------------------------------------- without FAISS
_NO_FAISS = """
import sys
sys.modules["faiss"] = None  # as if faiss were not installed: `import faiss` raises ImportError
import torch
torch.set_num_threads(1)
from isdretrieve.train.engine import Trainer
from isdretrieve.train.recipe import recipe_from_data

def recipe(method):
    return recipe_from_data({
        "method": method, "data": {"train": "digits", "preset": "digits", "workers": 0},
        "model": {"arch": "small_cnn"}, "optim": {"batch_size": 128, "epochs": 1},
        "engine": {"log_every": 5}, "monitor": {"every": 1, "max_train": 300, "max_test": 100},
    })

Trainer(recipe({"name": "isd", "queue_size": 256}), sys.argv[1] + "/isd", quiet=True).fit()
sepp = {"name": "sepp", "base": "isd", "pairs": sys.argv[2], "isd": {"queue_size": 256}}
result = Trainer(recipe(sepp), sys.argv[1] + "/sepp", quiet=True).fit()
assert result.encoder.is_file() and result.knn is not None
users = ("faiss", "isdretrieve.index", "isdretrieve.mine")
loaded = sorted(m for m in sys.modules if m.startswith(users))
print("loaded:", loaded)
"""


def test_training_runs_without_faiss(tmp_path: Path, digits_pairs) -> None:
    _, pairs_path = digits_pairs
    child = subprocess.run(
        [sys.executable, "-c", _NO_FAISS, str(tmp_path), str(pairs_path)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert child.returncode == 0, child.stderr[-2000:]
    assert "loaded: ['faiss']" in child.stdout  # only the blocked entry: nothing imported FAISS's users
    assert (tmp_path / "sepp" / "encoder.pt").is_file()
