"""ViT and timm backbones end to end: self-retrieval through ``Retriever.search`` for each preset and
backbone kind, train -> export -> index -> k-NN, and official DINO / AdaSim checkpoints (built here with
DINO's exact key layout) as encoders and as ``model.init``."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner
from PIL import Image

from isdretrieve.bank.export import export_bank
from isdretrieve.cli.index import main as index_main
from isdretrieve.cli.knn import main as knn_main
from isdretrieve.cli.train import main as train_main
from isdretrieve.data.augment import eval_view
from isdretrieve.data.open import open_dataset
from isdretrieve.errors import CheckpointError
from isdretrieve.files.bank import FeatureBank
from isdretrieve.files.encoder_header import IMAGENET_MEAN, IMAGENET_STD, EncoderHeader
from isdretrieve.models.backbones import build_backbone
from isdretrieve.models.checkpoints import atomic_save, export_encoder, load_backbone, load_init
from isdretrieve.pipeline import build_index_from_checkpoint
from isdretrieve.retrieve.retriever import Retriever

timm = pytest.importorskip("timm")

REPO = Path(__file__).resolve().parents[1]
DEMO = str(REPO / "training" / "digits-isd.yaml")


def _perturb(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Every parameter moved off its init (cls token and biases start at 0), reproducibly."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen))
    return model.eval()


# ------------------------------------------------------------------------------------ self-retrieval
KINDS = {  # kind: (arch, {image size: patch})
    "resnet": ("resnet18", {}),
    "vit": ("vit_tiny", {16: 4, 32: 4, 224: 16}),
    "timm": ("timm:test_vit", {16: 4, 32: 4, 224: 16}),
}


def _encoder(path: Path, kind: str, size: int) -> Path:
    arch, patches = KINDS[kind]
    torch.manual_seed(0)
    stem = kind == "resnet" and size == 32
    model = build_backbone(arch, cifar_stem=stem, image_size=size, patch_size=patches.get(size), depth=2)
    header = EncoderHeader(
        arch, stem, model.feature_dim, size, IMAGENET_MEAN, IMAGENET_STD, patch_size=patches.get(size, 0)
    )
    export_encoder(_perturb(model, 1), header, path)
    return path


def _photos(folder: Path, n: int = 12) -> Path:
    """n smooth colour images of different sizes (not 224 or 256 square: the eval resize and crop act)."""
    folder.mkdir(parents=True)
    gen = torch.Generator().manual_seed(3)
    for i in range(n):
        small = torch.rand(3, 6, 5, generator=gen)
        big = F.interpolate(small[None], size=(300 + 10 * i, 260), mode="bilinear", align_corners=False)[0]
        array = (big.permute(1, 2, 0).numpy() * 255).astype(np.uint8)
        Image.fromarray(array).save(folder / f"photo{i}.png")
    return folder


def _cifar_folder(cifar_root: Path, folder: Path, n: int = 12) -> Path:
    folder.mkdir(parents=True)
    for src in sorted((cifar_root / "test").rglob("*.jpg"))[:n]:
        (folder / src.name).write_bytes(src.read_bytes())
    return folder


def _digits_folder(folder: Path, n: int = 12) -> Path:
    folder.mkdir(parents=True)
    for i, image in enumerate(open_dataset("digits,split=test").load_all()[:n]):
        Image.fromarray(image.permute(1, 2, 0).numpy()).save(folder / f"digit{i:02d}.png")
    return folder


@pytest.mark.parametrize("kind", sorted(KINDS))
@pytest.mark.parametrize("preset", ["digits", "cifar", pytest.param("imagenet", marks=pytest.mark.slow)])
def test_bank_row_finds_itself_first(preset: str, kind: str, tmp_path: Path, request) -> None:
    size = {"digits": 16, "cifar": 32, "imagenet": 224}[preset]
    if preset == "digits":
        folder = _digits_folder(tmp_path / "digits")
    elif preset == "cifar":
        folder = _cifar_folder(request.getfixturevalue("cifar_root"), tmp_path / "cifar")
    else:
        folder = _photos(tmp_path / "photos")
    data = f"folder:{folder}"
    encoder = _encoder(tmp_path / "enc.pt", kind, size)
    build_index_from_checkpoint(encoder, data, tmp_path / "index", factory="Flat", workers=0)
    r = Retriever.open(tmp_path / "index", device="cpu")
    rows = [0, len(r.index) // 2, len(r.index) - 1]
    paths = [Path(r.index.bank.paths()[row]) for row in rows]
    hits = r.search([p if p.is_absolute() else folder / p for p in paths], k=2)
    assert [h[0].row for h in hits] == rows
    assert min(h[0].score for h in hits) >= 0.9999


# ------------------------------------------------------------------------------- DINO / AdaSim layout
DINO_SIZE, DINO_PATCH = 16, 4  # the digits preset, so the file also runs through the CLI on digits


def _timm_vit(seed: int) -> torch.nn.Module:
    """timm's VisionTransformer built directly: DINO's ViT-Tiny layout, 2 blocks."""
    from timm.models.vision_transformer import VisionTransformer

    model = VisionTransformer(
        img_size=DINO_SIZE, patch_size=DINO_PATCH, embed_dim=192, depth=2, num_heads=3, num_classes=0
    )
    return _perturb(model, seed)


def _dino_head(prefix: str, gen: torch.Generator) -> dict[str, torch.Tensor]:
    shapes = {
        "mlp.0.weight": (64, 192),
        "mlp.0.bias": (64,),
        "mlp.2.weight": (64, 64),
        "mlp.2.bias": (64,),
        "mlp.4.weight": (32, 64),
        "mlp.4.bias": (32,),
        "last_layer.weight_g": (128, 1),
        "last_layer.weight_v": (128, 32),
    }
    return {f"{prefix}head.{k}": torch.randn(s, generator=gen) for k, s in shapes.items()}


@pytest.fixture(scope="module")
def dino_file(tmp_path_factory) -> tuple[Path, torch.nn.Module, torch.nn.Module]:
    """checkpoint.pth as DINO's main_dino.py saves it: DDP student, plain teacher, heads, optimizer, args."""
    student, teacher = _timm_vit(1), _timm_vit(2)
    gen = torch.Generator().manual_seed(4)
    optimizer = torch.optim.AdamW(student.parameters(), lr=5e-4)
    student(torch.randn(2, 3, DINO_SIZE, DINO_SIZE)).sum().backward()
    optimizer.step()
    optimizer.zero_grad()
    student.eval()
    args = argparse.Namespace(
        arch="vit_tiny", patch_size=DINO_PATCH, out_dim=128, norm_last_layer=True, lr=5e-4, epochs=100,
        data_path="/path/to/imagenet/train", output_dir=".", local_crops_number=8,
        global_crops_scale=(0.4, 1.0), use_fp16=True, seed=0,
    )  # fmt: skip
    obj = {
        "student": {f"module.backbone.{k}": v for k, v in student.state_dict().items()}
        | _dino_head("module.", gen),
        "teacher": {f"backbone.{k}": v for k, v in teacher.state_dict().items()} | _dino_head("", gen),
        "optimizer": optimizer.state_dict(),
        "epoch": 3,
        "args": args,
        "dino_loss": {"center": torch.randn(1, 128, generator=gen)},
        "fp16_scaler": {
            "scale": 65536.0,
            "growth_factor": 2.0,
            "backoff_factor": 0.5,
            "growth_interval": 2000,
        },
    }
    path = tmp_path_factory.mktemp("dino") / "checkpoint.pth"
    torch.save(obj, path)
    return path, student, teacher


def _cls_features(model: torch.nn.Module, images: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return F.normalize(model.forward_features(eval_view(images, "digits"))[:, 0], dim=1)


@pytest.mark.parametrize("which", ["student", "teacher"])
def test_dino_checkpoint_bank_equals_timm_forward(dino_file, which: str, tmp_path: Path) -> None:
    path, student, teacher = dino_file
    model, header = load_backbone(path, which=which)
    assert (header.arch, header.patch_size, header.image_size, header.feature_dim) == ("vit_tiny", 4, 16, 192)
    assert (header.mean, header.std, header.source) == (
        IMAGENET_MEAN,
        IMAGENET_STD,
        f"checkpoint.pth:{which}",
    )
    bank_path = export_bank(path, "digits,split=test", tmp_path / "bank.h5", which=which, workers=0).path
    with FeatureBank.open(bank_path) as bank:
        feats, indices = torch.from_numpy(bank.features()), bank.indices()
    images = open_dataset("digits,split=test").load_all()[torch.as_tensor(indices)]
    expected = _cls_features(student if which == "student" else teacher, images)
    torch.testing.assert_close(feats, expected, atol=1e-5, rtol=0)
    other = _cls_features(teacher if which == "student" else student, images)
    assert (feats - other).abs().max() > 1e-2  # student and teacher really differ


def test_dino_checkpoint_through_the_cli(dino_file, tmp_path: Path) -> None:
    path = str(dino_file[0])
    out = tmp_path / "index"
    built = CliRunner().invoke(
        index_main, ["build", "--checkpoint", path, "--data", "digits,split=test", "--out", str(out),
                     "--teacher", "--index", "Flat", "--quiet"],
    )  # fmt: skip
    assert built.exit_code == 0, built.output
    assert load_backbone(out / "encoder.pt")[1].source == "checkpoint.pth:teacher"
    knn = CliRunner().invoke(knn_main, ["--checkpoint", path, "--data", "digits", "--json"])
    assert knn.exit_code == 0, knn.output
    assert json.loads(knn.stdout)["results"][0]["top1"] > 0.3  # chance is 0.1


def test_adasim_style_checkpoint_loads_like_dino(dino_file, tmp_path: Path) -> None:
    """AdaSim's checkpoint.pth is DINO's plus its loss state and the neighbour memory (all tensors)."""
    obj = torch.load(dino_file[0], weights_only=False)
    obj["adasim_loss"] = obj.pop("dino_loss")
    obj |= {"features": torch.randn(50, 192), "nn_matrix": torch.zeros(50, 4, 10, dtype=torch.long)}
    torch.save(obj, tmp_path / "adasim.pth")
    for which in ("student", "teacher"):
        ours, header = load_backbone(tmp_path / "adasim.pth", which=which)
        same, _ = load_backbone(dino_file[0], which=which)
        assert header.source == f"adasim.pth:{which}"
        for key, value in same.state_dict().items():
            torch.testing.assert_close(ours.state_dict()[key], value, atol=0, rtol=0)


def test_dino_checkpoint_as_model_init(dino_file) -> None:
    path, _, teacher = dino_file
    model = build_backbone("vit_tiny", image_size=DINO_SIZE, patch_size=DINO_PATCH, depth=2).eval()
    load_init(model, "vit_tiny", path, which="teacher")
    images = open_dataset("digits,split=test").load_all()[:16]
    with torch.no_grad():
        ours = F.normalize(model(eval_view(images, "digits")), dim=1)
    torch.testing.assert_close(ours, _cls_features(teacher, images), atol=1e-5, rtol=0)


def test_plain_timm_state_dict_as_model_init(tmp_path: Path) -> None:
    """A timm model's own state dict, classifier included (``head.*``), into ``timm:NAME``."""
    source = _perturb(
        timm.create_model("test_vit", pretrained=False, num_classes=10, img_size=16, patch_size=4), 5
    )
    atomic_save(source.state_dict(), tmp_path / "test_vit.pt")
    model = build_backbone("timm:test_vit", image_size=16, patch_size=4).eval()
    load_init(model, "timm:test_vit", tmp_path / "test_vit.pt")
    x = torch.randn(3, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(model(x), source.forward_head(source.forward_features(x), pre_logits=True))


def test_bad_init_files_are_one_line(dino_file, tmp_path: Path) -> None:
    path = dino_file[0]
    vit = build_backbone("vit_tiny", image_size=16, patch_size=4, depth=2)
    resnet = tmp_path / "resnet18.pt"
    atomic_save(build_backbone("resnet18").state_dict(), resnet)
    with pytest.raises(
        CheckpointError, match=r"does not fit vit_tiny \(patch 4, 16 px, 2 blocks\): \d+ missing keys"
    ):
        load_init(vit, "vit_tiny", resnet)
    obj = torch.load(path, weights_only=False)
    del obj["student"]["module.backbone.blocks.1.mlp.fc2.weight"]
    broken = tmp_path / "broken.pth"
    torch.save(obj, broken)
    with pytest.raises(CheckpointError) as info:
        load_init(vit, "vit_tiny", broken)
    message = str(info.value)
    assert "\n" not in message and "1 missing key (encoder.layers.encoder_layer_1.mlp.3.weight)" in message
    deeper = build_backbone("vit_tiny", image_size=16, patch_size=4, depth=3)
    with pytest.raises(
        CheckpointError, match=r"3 blocks\): 12 missing keys \(encoder\.layers\.encoder_layer_2"
    ):
        load_init(deeper, "vit_tiny", path)


# ------------------------------------------------------------------------- other input sizes (multi-crop)
def test_vit_takes_other_sizes_and_is_torchvisions_at_its_own(monkeypatch) -> None:
    """At its image size our ViT is torchvision's forward bit for bit; at 24 px (6 x 6 patches), with
    ``pos_interpolation: resize``, it is timm's ``dynamic_img_size`` forward on the same DINO-layout
    weights, timm's position-embedding resize made plain bicubic (its default antialiased bicubic is
    another kernel); 8 px runs. (DINO's own interpolation is pinned in test_dino_official.py.)"""
    import functools

    import timm.models.vision_transformer as timm_vit
    from timm.models.vision_transformer import VisionTransformer

    from isdretrieve.models.vit import timm_to_torchvision
    from isdretrieve.util.torchvision import import_torchvision

    source = _timm_vit(7)
    dynamic = VisionTransformer(
        img_size=DINO_SIZE, patch_size=DINO_PATCH, embed_dim=192, depth=2, num_heads=3, num_classes=0,
        dynamic_img_size=True,
    ).eval()  # fmt: skip
    dynamic.load_state_dict(source.state_dict())
    resample = functools.partial(timm_vit.resample_abs_pos_embed, antialias=False)
    monkeypatch.setattr(timm_vit, "resample_abs_pos_embed", resample)
    ours = build_backbone(
        "vit_tiny", image_size=DINO_SIZE, patch_size=DINO_PATCH, depth=2, pos_interpolation="resize"
    ).eval()
    ours.load_state_dict(timm_to_torchvision(source.state_dict()))
    assert ours.state_dict().keys() == build_backbone("vit_tiny", image_size=16, depth=2).state_dict().keys()
    x = torch.randn(3, 3, 24, 24, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        native = ours(x[..., :16, :16])
        reference = import_torchvision().models.VisionTransformer.forward(ours, x[..., :16, :16])
        assert torch.equal(native, reference)
        torch.testing.assert_close(ours(x), dynamic.forward_features(x)[:, 0], atol=1e-5, rtol=1e-5)
        assert ours(x[..., :8, :8]).shape == (3, 192)
    with pytest.raises(ValueError, match="input 10x10 is not a multiple of the ViT patch size 4"):
        ours(x[..., :10, :10])


def test_resize_pos_embedding_keeps_the_class_entry() -> None:
    from isdretrieve.models.vit import resize_pos_embedding

    pos = torch.randn(1, 1 + 16, 8, generator=torch.Generator().manual_seed(1))
    for mode in ("dino", "resize"):
        assert resize_pos_embedding(pos, (4, 4), mode) is pos
        small = resize_pos_embedding(pos, (2, 3), mode)
        assert small.shape == (1, 1 + 6, 8) and torch.equal(small[:, 0], pos[:, 0])
        flat = torch.cat([pos[:, :1], torch.full((1, 16, 8), 0.25)], dim=1)
        torch.testing.assert_close(
            resize_pos_embedding(flat, (2, 2), mode)[:, 1:], torch.full((1, 4, 8), 0.25)
        )


def test_timm_vit_takes_other_sizes_only_when_built_dynamic() -> None:
    fixed = build_backbone("timm:vit_tiny_patch16_224", image_size=16, patch_size=4).eval()
    dynamic = build_backbone("timm:vit_tiny_patch16_224", image_size=16, patch_size=4, dynamic_size=True)
    dynamic.load_state_dict(fixed.state_dict())
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(dynamic.eval()(x), fixed(x), atol=1e-6, rtol=0)
        assert dynamic(x[..., :8, :8]).shape == (2, 192)
        with pytest.raises(AssertionError, match="doesn't match model"):
            fixed(x[..., :8, :8])


# --------------------------------------------------------------------------- train -> index -> k-NN
TINY = [
    "--set", "optim.epochs=1", "--set", "optim.max_steps=2", "--set", "optim.batch_size=32",
    "--set", "method.queue_size=128", "--set", "monitor.every=0", "--quiet",
]  # fmt: skip


@pytest.mark.slow
@pytest.mark.parametrize(
    ("arch", "extra"),
    [("vit_tiny", ["--set", "model.depth=2", "--set", "model.patch=4"]), ("timm:test_resnet", [])],
)
def test_train_export_index_knn(arch: str, extra: list[str], tmp_path: Path) -> None:
    run = tmp_path / "run"
    trained = CliRunner().invoke(
        train_main, [DEMO, "--out", str(run), "--set", f"model.arch={arch}", *extra, *TINY]
    )
    assert trained.exit_code == 0, trained.output
    model, header = load_backbone(run / "encoder.pt")  # rebuilt from the file alone
    assert (header.arch, header.image_size) == (arch, 16)
    assert header.patch_size == (4 if arch == "vit_tiny" else 0)
    knn = CliRunner().invoke(
        knn_main, ["--checkpoint", str(run / "encoder.pt"), "--data", "digits", "--json"]
    )
    assert knn.exit_code == 0, knn.output
    assert json.loads(knn.stdout)["results"][0]["top1"] > 0.3


def test_train_from_dino_init_and_resume_skips_it(dino_file, tmp_path: Path) -> None:
    from isdretrieve.train.engine import Trainer
    from isdretrieve.train.recipe import load_recipe

    init = tmp_path / "dino.pth"
    init.write_bytes(dino_file[0].read_bytes())
    sets = ["model.arch=vit_tiny", "model.depth=2", f"model.init={init}", "model.init_from=teacher",
            "optim.epochs=1", "optim.max_steps=1", "optim.batch_size=64", "method.queue_size=128",
            "monitor.every=0"]  # fmt: skip
    recipe = load_recipe(DEMO, sets)
    trainer = Trainer(recipe, tmp_path / "run", quiet=True)
    expected = {k: v for k, v in load_backbone(init, which="teacher")[0].state_dict().items()}
    for module in (trainer.method.feature_backbone, trainer.method.teacher.backbone):
        for key, value in module.state_dict().items():
            torch.testing.assert_close(value, expected[key], atol=0, rtol=0)
    trainer.fit()
    init.unlink()  # a resume never reads model.init again
    Trainer(recipe, tmp_path / "run", resume=True, quiet=True)
    bad = CliRunner().invoke(
        train_main, [DEMO, "--out", str(tmp_path / "other"), *[a for s in sets for a in ("--set", s)]]
    )
    assert bad.exit_code == 2
    assert bad.output.startswith("error: model.init: checkpoint not found") and bad.output.count("\n") == 1


# ------------------------------------------------------------------------------------------ errors
def test_timm_missing_or_unknown_is_one_line(monkeypatch, tmp_path: Path) -> None:
    unknown = CliRunner().invoke(
        train_main, [DEMO, "--out", str(tmp_path / "a"), "--set", "model.arch=timm:nope"]
    )
    assert (
        unknown.exit_code == 2
        and unknown.output == "error: model.arch: unknown timm model 'nope' (see timm.list_models())\n"
    )
    monkeypatch.setitem(sys.modules, "timm", None)  # as if the extra were not installed
    missing = CliRunner().invoke(
        train_main, [DEMO, "--out", str(tmp_path / "b"), "--set", "model.arch=timm:resnet10t"]
    )
    assert missing.exit_code == 2
    assert missing.output == "error: timm: backbones need timm: pip install 'isdretrieve[timm]'\n"


def test_vit_patch_must_divide_the_image(tmp_path: Path) -> None:
    bad = CliRunner().invoke(
        train_main,
        [DEMO, "--out", str(tmp_path / "a"), "--set", "model.arch=vit_tiny", "--set", "model.patch=5"],
    )
    assert bad.exit_code == 2
    assert bad.output == "error: model.arch: vit_tiny: image size 16 is not a multiple of the patch size 5\n"


def test_header_without_patch_field_still_loads() -> None:
    old = {"arch": "resnet18", "cifar_stem": True, "feature_dim": 512, "image_size": 32,
           "mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD)}  # fmt: skip
    assert EncoderHeader.from_dict(old).patch_size == 0
