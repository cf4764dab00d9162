"""Checkpoint I/O and backbone loading, against files with the exact official ISD / MoCo key layouts."""

from __future__ import annotations

import argparse
import hashlib
import os
from pathlib import Path

import pytest
import torch
from torch import nn

from isdretrieve.errors import CheckpointError
from isdretrieve.files.encoder_header import IMAGENET_MEAN, IMAGENET_STD, EncoderHeader
from isdretrieve.models.backbones import build_backbone
from isdretrieve.models.checkpoints import (
    CHECKPOINT_FORMAT,
    ENCODER_FORMAT,
    atomic_save,
    export_encoder,
    extract_backbone_state,
    file_sha256,
    load_backbone,
    safe_load,
)
from isdretrieve.models.heads import isd_base_predictor, projection_mlp
from isdretrieve.util.torchvision import import_torchvision

K = 64  # queue length: small to keep the files tiny


# ------------------------------------------------------------------------------------------- helpers
def tv_resnet18(cifar_stem: bool = False) -> nn.Module:
    """A plain torchvision resnet18 with fc = Identity (and the CIFAR stem if asked): the reference model."""
    model = import_torchvision().models.resnet18(weights=None)
    model.fc = nn.Identity()
    if cifar_stem:
        model.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
        model.maxpool = nn.Identity()
    return model


def perturbed(state: dict[str, torch.Tensor], seed: int) -> dict[str, torch.Tensor]:
    """Distinct, well-scaled weights and BN statistics, so student/teacher/running stats all differ."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for key, v in state.items():
        if key.endswith("num_batches_tracked"):
            out[key] = torch.tensor(100 * seed, dtype=torch.long)
        elif key.endswith("running_var"):
            out[key] = 1 + 0.5 * torch.rand(v.shape, generator=g)
        elif key.endswith("running_mean"):
            out[key] = 0.1 * torch.randn(v.shape, generator=g)
        else:
            out[key] = v + 0.01 * torch.randn(v.shape, generator=g)
    return out


def r18_state(seed: int, cifar_stem: bool = False) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    return perturbed(tv_resnet18(cifar_stem).state_dict(), seed)


def prefixed(prefix: str, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {prefix + k: v for k, v in state.items()}


def assert_state_equal(model: nn.Module, expected: dict[str, torch.Tensor]) -> None:
    got = model.state_dict()
    assert set(got) == set(expected)
    for key, value in expected.items():
        assert torch.equal(got[key], value), key


@pytest.fixture(scope="module")
def q_state() -> dict[str, torch.Tensor]:
    return r18_state(1)


@pytest.fixture(scope="module")
def k_state() -> dict[str, torch.Tensor]:
    return r18_state(2)


def official_opt(**kw: object) -> argparse.Namespace:
    return argparse.Namespace(
        arch="resnet18", lr=0.01, momentum=0.9, weight_decay=1e-4, queue_size=K, temp=0.02,
        lr_decay_epochs=[140, 180], augmentation="weak/strong", **kw,
    )  # fmt: skip


@pytest.fixture(scope="module")
def isd_base_file(tmp_path_factory, q_state, k_state) -> Path:
    """ISD-base (train_isd.py) R18 training file: encoder_q/encoder_k/predict_q + queue, opt Namespace."""
    sd = prefixed("encoder_q.module.", q_state)
    sd |= prefixed("encoder_k.module.", k_state)
    sd |= prefixed("predict_q.module.", isd_base_predictor(512).state_dict())
    sd["queue"] = nn.functional.normalize(torch.randn(K, 512), dim=0)
    sd["queue_ptr"] = torch.zeros(1, dtype=torch.long)
    optimizer = {"state": {}, "param_groups": [{"lr": 0.01, "momentum": 0.9, "params": [0, 1, 2]}]}
    path = tmp_path_factory.mktemp("isd") / "ckpt_epoch_3.pth"
    torch.save({"opt": official_opt(), "state_dict": sd, "optimizer": optimizer, "epoch": 3}, path)
    return path


@pytest.fixture(scope="module")
def isd_mlp_file(tmp_path_factory, q_state, k_state) -> Path:
    """ISD-MLP (train_isd_plus.py) R18 file: projection under encoder_{q,k}.module.fc.*, labels buffer."""
    torch.manual_seed(3)
    sd = prefixed("encoder_q.module.", q_state | prefixed("fc.", projection_mlp(512, 1024, 128).state_dict()))
    sd |= prefixed(
        "encoder_k.module.", k_state | prefixed("fc.", projection_mlp(512, 1024, 128).state_dict())
    )
    sd |= prefixed("predict_q.module.", projection_mlp(128, 1024, 128).state_dict())
    sd["queue"] = nn.functional.normalize(torch.randn(K, 128), dim=1)
    sd["queue_ptr"] = torch.zeros(1, dtype=torch.long)
    sd["labels"] = -torch.ones(K, dtype=torch.long)
    path = tmp_path_factory.mktemp("isd_mlp") / "ckpt_epoch_200.pth"
    torch.save(
        {"opt": official_opt(tau_t=0.01, tau_s=0.1), "state_dict": sd, "optimizer": {}, "epoch": 200}, path
    )
    return path


# ---------------------------------------------------------------------------------- official files
def test_isd_base_student(isd_base_file: Path, q_state) -> None:
    model, header = load_backbone(isd_base_file)
    assert_state_equal(model, q_state)
    assert not model.training
    assert header == EncoderHeader(
        arch="resnet18",
        cifar_stem=False,
        feature_dim=512,
        image_size=224,
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        source="ckpt_epoch_3.pth:student",
        source_sha256=hashlib.sha256(isd_base_file.read_bytes()).hexdigest(),
    )
    reference = tv_resnet18().eval()
    reference.load_state_dict(q_state, strict=True)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.allclose(model(x), reference(x), atol=1e-6)


def test_isd_base_teacher_takes_running_stats_from_student(isd_base_file: Path, q_state, k_state) -> None:
    model, header = load_backbone(isd_base_file, which="teacher")
    assert header.source == "ckpt_epoch_3.pth:teacher"
    got = model.state_dict()
    assert set(got) == set(k_state)
    for key in k_state:
        stat = key.endswith(("running_mean", "running_var"))
        assert torch.equal(got[key], q_state[key] if stat else k_state[key]), key
    assert got["bn1.num_batches_tracked"].item() == 200  # from encoder_k (seed 2), not encoder_q (100)


def test_isd_mlp_drops_projection(isd_mlp_file: Path, q_state, k_state) -> None:
    obj = safe_load(isd_mlp_file)
    assert isinstance(obj["opt"], argparse.Namespace) and obj["opt"].tau_t == 0.01
    student = extract_backbone_state(obj)
    assert not any("fc." in k for k in student)
    assert set(student) == set(q_state)
    model, _ = load_backbone(isd_mlp_file)
    assert_state_equal(model, q_state)
    teacher, _ = load_backbone(isd_mlp_file, which="teacher")
    assert torch.equal(teacher.state_dict()["layer4.1.conv2.weight"], k_state["layer4.1.conv2.weight"])
    assert torch.equal(teacher.state_dict()["layer4.1.bn2.running_var"], q_state["layer4.1.bn2.running_var"])


def test_moco_style_file(tmp_path: Path, q_state, k_state) -> None:
    sd = prefixed("module.encoder_q.", q_state | prefixed("fc.", projection_mlp(512, 512, 128).state_dict()))
    sd |= prefixed("module.encoder_k.", k_state | prefixed("fc.", projection_mlp(512, 512, 128).state_dict()))
    sd["module.queue"] = torch.randn(128, K)
    sd["module.queue_ptr"] = torch.zeros(1, dtype=torch.long)
    path = tmp_path / "moco.pth.tar"
    torch.save({"epoch": 200, "arch": "resnet18", "state_dict": sd, "optimizer": {}}, path)
    student, _ = load_backbone(path)
    assert_state_equal(student, q_state)
    teacher, _ = load_backbone(path, which="teacher")
    assert_state_equal(teacher, k_state)  # no predictor => MoCo: the key encoder as stored


def test_teacher_missing(q_state) -> None:
    only_student = {"state_dict": prefixed("encoder_q.module.", q_state) | {"queue": torch.zeros(K, 512)}}
    assert set(extract_backbone_state(only_student)) == set(q_state)
    with pytest.raises(CheckpointError, match=r"no teacher weights \(encoder_k"):
        extract_backbone_state(only_student, which="teacher")
    with pytest.raises(CheckpointError, match="no teacher in this file"):
        extract_backbone_state(q_state, which="teacher")


def test_which_is_validated(q_state) -> None:
    with pytest.raises(ValueError, match="student, teacher"):
        extract_backbone_state(q_state, which="ema")


# ------------------------------------------------------------------------------------- plain files
@pytest.fixture(scope="module")
def r50_file(tmp_path_factory) -> Path:
    """A DataParallel-saved torchvision resnet50 state dict, classifier included."""
    model = import_torchvision().models.resnet50(weights=None)
    path = tmp_path_factory.mktemp("r50") / "resnet50.pth"
    torch.save({"state_dict": prefixed("module.", model.state_dict())}, path)
    return path


def test_plain_resnet50_inferred(r50_file: Path) -> None:
    model, header = load_backbone(r50_file)
    assert header.arch == "resnet50" and header.feature_dim == 2048 and not header.cifar_stem
    assert model.feature_dim == 2048


def test_resnet50_into_resnet18_reports_keys(r50_file: Path) -> None:
    with pytest.raises(CheckpointError) as info:
        load_backbone(r50_file, arch="resnet18")
    msg = str(info.value)
    assert f"checkpoint {r50_file} does not fit resnet18 (standard stem): " in msg
    assert "unexpected keys (layer1.0.conv3.weight" in msg  # resnet18's key names are a subset of resnet50's
    assert "shape mismatches (layer1.0.conv1.weight: checkpoint [64, 64, 1, 1] vs model [64, 64, 3, 3]" in msg
    assert "\n" not in msg


def test_cifar_stem_inferred_and_overridable(tmp_path: Path) -> None:
    state = r18_state(4, cifar_stem=True)
    path = tmp_path / "plain.pt"
    torch.save(state | {"fc.weight": torch.zeros(10, 512), "fc.bias": torch.zeros(10)}, path)
    model, header = load_backbone(path)
    assert header.cifar_stem and header.image_size == 32 and header.source == "plain.pt:student"
    assert_state_equal(model, state)
    with pytest.raises(CheckpointError, match=r"1 shape mismatch \(conv1.weight: checkpoint \[64, 3, 3, 3\]"):
        load_backbone(path, cifar_stem=False)
    torch.save({k: v for k, v in state.items() if not k.startswith("layer4.1.bn2.")}, path)
    with pytest.raises(CheckpointError, match=r"\(cifar stem\): 5 missing keys \(layer4.1.bn2.weight, .*\)$"):
        load_backbone(path)


def test_small_cnn_plain_state(tmp_path: Path) -> None:
    source = build_backbone("small_cnn")
    torch.save(source.state_dict(), tmp_path / "tiny.pt")
    model, header = load_backbone(tmp_path / "tiny.pt")
    assert header.arch == "small_cnn" and header.feature_dim == 256 and header.image_size == 32
    assert_state_equal(model, source.state_dict())


def test_unrecognised_keys(tmp_path: Path) -> None:
    torch.save({"model": {"blocks.0.weight": torch.zeros(3)}}, tmp_path / "vit.pt")
    with pytest.raises(CheckpointError, match=r"cannot tell the architecture .*\(blocks.0.weight, \.\.\.\)"):
        load_backbone(tmp_path / "vit.pt")
    with pytest.raises(CheckpointError, match="unknown architecture 'vit'"):
        load_backbone(tmp_path / "vit.pt", arch="vit")


# ---------------------------------------------------------------------------------------- our files
def cifar_header(**kw: object) -> EncoderHeader:
    values: dict = dict(arch="resnet18", cifar_stem=True, feature_dim=512, image_size=32)
    return EncoderHeader(**(values | kw), mean=(0.49, 0.48, 0.45), std=(0.25, 0.24, 0.26))


def test_header_round_trip() -> None:
    header = cifar_header(source="run.pt:teacher", source_sha256="ab" * 32)
    d = header.to_dict()
    assert d["mean"] == [0.49, 0.48, 0.45]
    assert EncoderHeader.from_dict(d) == header
    assert EncoderHeader.from_dict(d | {"future_field": 1}) == header
    with pytest.raises(CheckpointError, match="missing image_size"):
        EncoderHeader.from_dict({k: v for k, v in d.items() if k != "image_size"})
    with pytest.raises(CheckpointError, match="3 values"):
        EncoderHeader.from_dict(d | {"std": [1.0]})


def test_our_training_checkpoint(tmp_path: Path) -> None:
    student, teacher = r18_state(5, cifar_stem=True), r18_state(6, cifar_stem=True)
    model_state = prefixed("student.backbone.", student) | prefixed("teacher.backbone.", teacher)
    model_state |= prefixed("student.projector.", projection_mlp(512, 1024, 128).state_dict())
    model_state |= prefixed("student.predictor.", projection_mlp(128, 1024, 128).state_dict())
    model_state["memory.queue"] = torch.randn(K, 128)
    obj = {
        "format": CHECKPOINT_FORMAT,
        "method": "isd_mlp",
        "recipe": {"arch": "resnet18", "epochs": 2},
        "epoch": 2,
        "step": 20,
        "encoder": cifar_header().to_dict(),
        "model": model_state,
        "optimizer": {"state": {}, "param_groups": []},
    }
    path = tmp_path / "run" / "last.pt"
    atomic_save(obj, path)
    model, header = load_backbone(path, which="teacher")
    assert_state_equal(model, teacher)  # our own teacher is taken as stored, running stats included
    assert header == cifar_header(source="last.pt:teacher", source_sha256=file_sha256(path))
    assert_state_equal(load_backbone(path)[0], student)
    obj["model"] = prefixed("student.backbone.", student)
    with pytest.raises(CheckpointError, match="no teacher backbone in this isd_mlp training checkpoint"):
        extract_backbone_state(obj, which="teacher")
    with pytest.raises(CheckpointError, match="unsupported format 'isdretrieve.checkpoint/9'"):
        extract_backbone_state(obj | {"format": "isdretrieve.checkpoint/9"})


def test_export_loads_into_plain_torchvision(tmp_path: Path) -> None:
    backbone = build_backbone("resnet18", cifar_stem=True)
    backbone.load_state_dict(r18_state(7, cifar_stem=True))
    header = cifar_header(source="last.pt:student", source_sha256="cd" * 32)
    path = tmp_path / "encoder.pt"
    export_encoder(backbone, header, path)

    obj = torch.load(path, map_location="cpu", weights_only=True)
    assert obj["format"] == ENCODER_FORMAT and obj["header"] == header.to_dict()
    reference = tv_resnet18(cifar_stem=True)
    reference.load_state_dict(obj["state_dict"], strict=True)

    model, loaded_header = load_backbone(path)
    assert loaded_header == header  # provenance of the export is kept
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(model(x), reference.eval()(x), atol=1e-6)
    with pytest.raises(CheckpointError, match=rf"checkpoint {path}: no teacher in an encoder export"):
        load_backbone(path, which="teacher")
    with pytest.raises(ValueError, match="feature_dim"):
        export_encoder(backbone, cifar_header(feature_dim=2048), tmp_path / "bad.pt")


# ----------------------------------------------------------------------------------- safe loading
class _Custom:
    def __init__(self) -> None:
        self.x = 1


class _Malicious:
    def __init__(self, target: Path) -> None:
        self.target = target

    def __reduce__(self):
        return (os.remove, (str(self.target),))


def test_missing_and_directory(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match=r"^checkpoint not found: .*nope\.pt$"):
        safe_load(tmp_path / "nope.pt")
    with pytest.raises(CheckpointError, match="it is a directory"):
        safe_load(tmp_path)


def test_garbage_and_truncated(tmp_path: Path, isd_base_file: Path) -> None:
    data = isd_base_file.read_bytes()
    files = {
        "random.pt": torch.randint(0, 256, (4096,), generator=torch.Generator().manual_seed(0))
        .to(torch.uint8)
        .numpy()
        .tobytes(),
        "truncated.pt": data[: len(data) // 2],
        "empty.pt": b"",
        "text.pt": b"hello world\n",
    }
    for name, content in files.items():
        (tmp_path / name).write_bytes(content)
        with pytest.raises(
            CheckpointError, match=r"^cannot read checkpoint .*: not a PyTorch checkpoint or truncated \("
        ):
            safe_load(tmp_path / name)


def test_refuses_unsafe_globals(tmp_path: Path) -> None:
    canary = tmp_path / "canary"
    canary.write_text("still here")
    torch.save({"state_dict": {}, "payload": _Malicious(canary)}, tmp_path / "evil.pt")
    with pytest.raises(
        CheckpointError, match=r"refused to load .*evil\.pt: it references \w+\.remove, which is not"
    ):
        safe_load(tmp_path / "evil.pt")
    assert canary.exists()  # the payload never ran
    torch.save({"obj": _Custom()}, tmp_path / "custom.pt")
    with pytest.raises(
        CheckpointError, match=r"it references [\w.]*_Custom, which is not on the safe-loading allow"
    ):
        load_backbone(tmp_path / "custom.pt")


# ----------------------------------------------------------------------------------- atomic saving
class _Unpicklable:
    def __reduce__(self):
        raise RuntimeError("cannot pickle this")


def test_atomic_save_replaces_and_creates_dirs(tmp_path: Path) -> None:
    path = tmp_path / "a" / "b" / "ckpt.pt"
    atomic_save({"x": torch.ones(2)}, path)
    atomic_save({"x": torch.zeros(3)}, path)
    assert torch.equal(safe_load(path)["x"], torch.zeros(3))
    assert os.listdir(path.parent) == ["ckpt.pt"]


def test_atomic_save_keeps_old_file_on_failure(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "ckpt.pt"
    atomic_save({"epoch": 1}, path)
    old = path.read_bytes()

    with pytest.raises(RuntimeError, match="cannot pickle"):
        atomic_save({"epoch": 2, "bad": _Unpicklable()}, path)
    assert path.read_bytes() == old and os.listdir(tmp_path) == ["ckpt.pt"]

    def half_write(obj: object, f) -> None:
        f.write(b"PK\x03\x04 partial")
        raise OSError("No space left on device")

    monkeypatch.setattr(torch, "save", half_write)
    with pytest.raises(OSError, match="No space left"):
        atomic_save({"epoch": 3}, path)
    assert path.read_bytes() == old and os.listdir(tmp_path) == ["ckpt.pt"]
    assert safe_load(path) == {"epoch": 1}


def test_file_sha256(tmp_path: Path) -> None:
    (tmp_path / "f").write_bytes(b"abc" * 1000)
    assert file_sha256(tmp_path / "f") == hashlib.sha256(b"abc" * 1000).hexdigest()
