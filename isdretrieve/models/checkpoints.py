"""Checkpoint files: safe loading, atomic saving, encoder export, and backbone loading.

``load_backbone`` reads our own training checkpoints and encoder exports, official ISD training files
(ISD-base and ISD-MLP), MoCo-style files, official DINO / AdaSim training files (``student`` /
``teacher``) and plain torchvision or timm backbone state dicts; ``load_init`` puts the same files'
weights into a model being built for training (``model.init``).
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import pickle
import re
from pathlib import Path
from typing import Any

import torch
from torch import nn

from isdretrieve.errors import CheckpointError
from isdretrieve.files.atomic import atomic_path
from isdretrieve.files.encoder_header import IMAGENET_MEAN, IMAGENET_STD, EncoderHeader
from isdretrieve.models.backbones import ARCHS, build_backbone, is_timm, is_vit
from isdretrieve.models.safetensors_file import is_safetensors_path, read_safetensors, write_safetensors
from isdretrieve.models.timm_backbone import classifier_prefixes, timm_patch
from isdretrieve.models.vit import is_timm_vit_state, timm_to_torchvision, vit_shape

CHECKPOINT_FORMAT = "isdretrieve.checkpoint/1"
ENCODER_FORMAT = "isdretrieve.encoder/1"
WHICH = ("student", "teacher")
# Globals a checkpoint may reference beyond torch's own weights-only set: official ISD files pickle their
# argparse options under "opt", official DINO / AdaSim files under "args".
SAFE_GLOBALS: tuple[type, ...] = (argparse.Namespace,)

_NON_BACKBONE_KEYS = frozenset({"queue", "queue_ptr", "labels"})
# the classifier of a plain timm / torchvision ViT state dict (a ResNet's fc.* is always dropped)
_CLASSIFIERS = ("head.", "heads.")
_GLOBAL_RE = re.compile(r"GLOBAL ([\w.]+)")


# --------------------------------------------------------------------------------------------- file I/O
def _short_reason(exc: BaseException) -> str:
    """First meaningful sentence of an exception, for a one-line message."""
    text = str(exc)
    if "WeightsUnpickler error:" in text:
        text = text.split("WeightsUnpickler error:", 1)[1]
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    first = lines[0].split(". ")[0].rstrip(".") if lines else ""
    return f"{type(exc).__name__}: {first}"[:160] if first else type(exc).__name__


def safe_load(path: str | Path) -> Any:
    """``torch.load`` on CPU, weights only; ``argparse.Namespace`` is the one extra allowed global."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint not found: {path}")
    if path.is_dir():
        raise CheckpointError(f"cannot read checkpoint {path}: it is a directory")
    try:
        with torch.serialization.safe_globals(list(SAFE_GLOBALS)):
            return torch.load(path, map_location="cpu", weights_only=True)
    except PermissionError as exc:
        raise CheckpointError(f"cannot read checkpoint {path}: permission denied") from exc
    except pickle.UnpicklingError as exc:
        match = _GLOBAL_RE.search(str(exc))
        if match:
            raise CheckpointError(
                f"refused to load {path}: it references {match.group(1)}, "
                "which is not on the safe-loading allow-list"
            ) from exc
        raise CheckpointError(
            f"cannot read checkpoint {path}: not a PyTorch checkpoint or truncated ({_short_reason(exc)})"
        ) from exc
    except Exception as exc:
        raise CheckpointError(
            f"cannot read checkpoint {path}: not a PyTorch checkpoint or truncated ({_short_reason(exc)})"
        ) from exc


def atomic_save(obj: Any, path: str | Path) -> None:
    """``torch.save`` to a temp file next to ``path``, fsync, then rename it over ``path``.

    On any failure the temp file is removed, the error re-raised, and a previous file at ``path`` survives.
    """
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        torch.save(obj, f)


def file_sha256(path: str | Path) -> str:
    """Hex SHA-256 of a file's bytes."""
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                digest.update(chunk)
    except FileNotFoundError as exc:
        raise CheckpointError(f"file not found: {path}") from exc
    return digest.hexdigest()


def _encoder_state(backbone: nn.Module, header: EncoderHeader) -> dict[str, torch.Tensor]:
    """The backbone's tensors as an encoder file holds them: on CPU, torchvision keys, no ``fc.*``."""
    dim = getattr(backbone, "feature_dim", header.feature_dim)
    if dim != header.feature_dim:
        raise ValueError(f"header.feature_dim={header.feature_dim} but the backbone produces {dim}")
    return {k: v.detach().cpu() for k, v in backbone.state_dict().items() if not k.startswith("fc.")}


def export_encoder(backbone: nn.Module, header: EncoderHeader, path: str | Path) -> None:
    """Atomically write ``{"format", "header", "state_dict"}`` (torchvision keys, no ``fc.*``) to ``path``."""
    state = _encoder_state(backbone, header)
    atomic_save({"format": ENCODER_FORMAT, "header": header.to_dict(), "state_dict": state}, path)


def export_safetensors(backbone: nn.Module, header: EncoderHeader, path: str | Path) -> Path:
    """Write the same weights as :func:`export_encoder` to ``path`` (``encoder.safetensors``) and its
    config beside it (``encoder.json``); returns the config's path."""
    return write_safetensors(_encoder_state(backbone, header), header, path)


def _same_weights(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[key], sb[key]) for key in sa)


def convert_checkpoint(checkpoint: str | Path, out_dir: str | Path, *, which: str = "student") -> Path:
    """The ``which`` backbone of any checkpoint :func:`load_backbone` reads, written as
    ``out_dir/encoder.safetensors`` + ``encoder.json`` with its header and provenance; a pair already
    there is kept if it holds the same weights, else refused. Returns the weights' path."""
    backbone, header = load_backbone(checkpoint, which=which)
    target = Path(out_dir) / "encoder.safetensors"
    if target.exists() or target.with_suffix(".json").exists():
        try:
            same = _same_weights(load_backbone(target)[0], backbone)
        except CheckpointError:
            same = False
        if not same:
            raise CheckpointError(f"{target} holds another encoder: delete it or choose another --out")
    target.parent.mkdir(parents=True, exist_ok=True)
    export_safetensors(backbone, header, target)
    return target


# --------------------------------------------------------------------------------- state extraction
def _check_which(which: str) -> None:
    if which not in WHICH:
        raise ValueError(f"which must be one of {', '.join(WHICH)}, got {which!r}")


def _is_backbone_key(key: str) -> bool:
    return not (key.startswith(("fc.", "predict_q.")) or key in _NON_BACKBONE_KEYS)


def _is_running_stat(key: str) -> bool:
    return key.endswith((".running_mean", ".running_var"))


def _clean(state: dict[str, Any]) -> dict[str, torch.Tensor]:
    """Tensors only, with every ``module.`` (DataParallel) removed from the keys."""
    return {k.replace("module.", ""): v for k, v in state.items() if isinstance(v, torch.Tensor)}


def _under(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """Backbone tensors under ``prefix``, prefix removed; projection, predictor and queue dropped."""
    n = len(prefix)
    return {k[n:]: v for k, v in state.items() if k.startswith(prefix) and _is_backbone_key(k[n:])}


def _from_method_state(state: dict[str, torch.Tensor], which: str, what: str) -> dict[str, torch.Tensor]:
    backbone = _under(state, f"{which}.backbone.")
    if not backbone:
        raise CheckpointError(f"no {which} backbone in this {what} (no '{which}.backbone.*' keys)")
    return backbone


def _from_query_key(state: dict[str, torch.Tensor], which: str) -> dict[str, torch.Tensor]:
    """Official ISD / MoCo layout: student = ``encoder_q``, teacher = ``encoder_k``."""
    student = _under(state, "encoder_q.")
    if which == "student":
        if not student:
            raise CheckpointError("no student weights (encoder_q.*) in this file")
        return student
    teacher = _under(state, "encoder_k.")
    if not teacher:
        raise CheckpointError("no teacher weights (encoder_k.*) in this file")
    if not any(k.startswith("predict_q.") for k in state):
        return teacher  # MoCo-style: the key encoder as stored
    # Official ISD: like its k-NN evaluator, take the teacher's BN running stats from the student (the EMA
    # covers parameters only); everything else, num_batches_tracked included, comes from encoder_k.
    merged = {}
    for key, value in teacher.items():
        if _is_running_stat(key):
            if key not in student:
                raise CheckpointError(f"teacher BN statistics are taken from the student, which lacks {key}")
            value = student[key]
        merged[key] = value
    return merged


def _from_dino(obj: dict, which: str) -> dict[str, torch.Tensor]:
    """Official DINO / AdaSim ``checkpoint.pth``: ``student`` (``module.backbone.*`` under DDP) and
    ``teacher`` (``backbone.*``) state dicts, each with its ``head.*``; the backbone is taken."""
    backbone = _under(_clean(obj[which]), "backbone.")
    if not backbone:
        raise CheckpointError(f"no {which} backbone in this DINO-style file (no '{which}' 'backbone.*' keys)")
    return backbone


def extract_backbone_state(obj: dict, *, which: str = "student") -> dict[str, torch.Tensor]:
    """Backbone state dict (torchvision keys, no ``fc.*``) of the student or teacher in a loaded checkpoint.

    Recognised, in order: our training checkpoint, our encoder export, official DINO / AdaSim files
    (``student``/``teacher`` with ``backbone.*`` and ``head.*``), official ISD training files
    (``encoder_q``/``encoder_k``/``predict_q``), MoCo-style files, plain backbone state dicts. For official
    ISD files the teacher's BN running mean/var come from the student, as in the official k-NN evaluator.
    """
    _check_which(which)
    if not isinstance(obj, dict):
        raise CheckpointError(f"not a checkpoint dict (the file holds a {type(obj).__name__})")
    fmt = obj.get("format")
    if fmt == CHECKPOINT_FORMAT:
        model = obj.get("model")
        if not isinstance(model, dict):
            raise CheckpointError("training checkpoint without a 'model' state dict")
        return _from_method_state(
            _clean(model), which, f"{obj.get('method', '')} training checkpoint".lstrip()
        )
    if fmt == ENCODER_FORMAT:
        if which == "teacher":
            raise CheckpointError("no teacher in an encoder export: it holds a single backbone")
        state = obj.get("state_dict")
        if not isinstance(state, dict):
            raise CheckpointError("encoder export without a 'state_dict'")
        return {k: v for k, v in _clean(state).items() if _is_backbone_key(k)}
    if isinstance(fmt, str) and fmt.startswith("isdretrieve."):
        raise CheckpointError(
            f"unsupported format {fmt!r} (this version reads {CHECKPOINT_FORMAT} and {ENCODER_FORMAT})"
        )

    if isinstance(obj.get("student"), dict) and isinstance(obj.get("teacher"), dict):
        return _from_dino(obj, which)
    raw = next((obj[k] for k in ("state_dict", "model") if isinstance(obj.get(k), dict)), obj)
    state = _clean(raw)
    if any(k.startswith(("encoder_q.", "encoder_k.")) for k in state):
        backbone = _from_query_key(state, which)
    elif any(k.startswith(("student.backbone.", "teacher.backbone.")) for k in state):
        backbone = _from_method_state(state, which, "method state dict")
    elif which == "teacher":
        raise CheckpointError("no teacher in this file: it holds a single backbone (no encoder_k.* keys)")
    else:
        backbone = {k: v for k, v in state.items() if _is_backbone_key(k)}
    if not backbone:
        raise CheckpointError("no backbone weights found in this file")
    return backbone


# ------------------------------------------------------------------------------------------ loading
def _infer_arch(state: dict[str, torch.Tensor], path: Path, hint: str = "") -> str:
    shape = vit_shape(state)
    if shape:
        return shape[0]
    if "stage1.0.conv.weight" in state:
        return "small_cnn"
    if "layer4.0.conv3.weight" in state:
        return "resnet50"
    if "layer1.0.conv1.weight" in state:
        return "resnet18"
    notes = [hint] if hint else []
    if "class_token" in state:
        notes.insert(0, f"a ViT {state['class_token'].shape[-1]} wide, not 192, 384 or 768")
    first = ", ".join(list(state)[:5])
    extra = "".join(f"; {note}" for note in notes)
    raise CheckpointError(
        f"cannot tell the architecture of checkpoint {path} from its keys ({first}, ...{extra}); "
        f"choose one of {', '.join(ARCHS)} or timm:NAME explicitly"
    )


def _listing(items: list[str], singular: str, plural: str) -> str:
    shown = ", ".join(items[:5]) + (", ..." if len(items) > 5 else "")
    return f"{len(items)} {singular if len(items) == 1 else plural} ({shown})"


def _check_fit(model: nn.Module, state: dict[str, torch.Tensor], path: Path, what: str) -> None:
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    shapes = [
        f"{k}: checkpoint {list(state[k].shape)} vs model {list(v.shape)}"
        for k, v in expected.items()
        if k in state and state[k].shape != v.shape
    ]
    parts = []
    if missing:
        parts.append(_listing(missing, "missing key", "missing keys"))
    if unexpected:
        parts.append(_listing(unexpected, "unexpected key", "unexpected keys"))
    if shapes:
        parts.append(_listing(shapes, "shape mismatch", "shape mismatches"))
    if parts:
        raise CheckpointError(f"checkpoint {path} does not fit {what}: {', '.join(parts)}")


def _read_state(path: Path, which: str) -> tuple[dict, dict[str, torch.Tensor], EncoderHeader | None]:
    """The file's object, its student/teacher backbone state and our header (None in foreign files)."""
    obj = _safetensors_object(path) if is_safetensors_path(path) else safe_load(path)
    try:
        state = extract_backbone_state(obj, which=which)
        fmt = obj.get("format")
        stored = obj.get("encoder") if fmt == CHECKPOINT_FORMAT else obj.get("header")
        header = EncoderHeader.from_dict(stored) if fmt in (CHECKPOINT_FORMAT, ENCODER_FORMAT) else None
    except CheckpointError as exc:
        raise CheckpointError(f"checkpoint {path}: {exc}") from exc
    return obj, state, header


def _safetensors_object(path: Path) -> dict:
    """A safetensors encoder as the object an ``encoder.pt`` unpickles to (a plain state dict when the
    file has no header of ours); nothing is unpickled."""
    tensors, header = read_safetensors(path)
    if header is None:
        return tensors
    return {"format": ENCODER_FORMAT, "header": header.to_dict(), "state_dict": tensors}


def _names_for(arch: str | None, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """timm / DINO ViT names become torchvision's unless the weights go into a ``timm:`` model."""
    if not (arch and is_timm(arch)) and is_timm_vit_state(state):
        return timm_to_torchvision(state)
    return state


def _describe(arch: str, model: nn.Module) -> str:
    if is_vit(arch):
        return f"{arch} (patch {model.patch_size}, {model.image_size} px, {len(model.encoder.layers)} blocks)"
    if is_timm(arch) or arch == "small_cnn":
        return arch
    return f"{arch} ({'cifar' if isinstance(model.maxpool, nn.Identity) else 'standard'} stem)"


def _load_strict(model: nn.Module, arch: str, state: dict[str, torch.Tensor], path: Path) -> None:
    """Load ``state`` into ``model`` with strict keys, dropping only a removed classifier's keys."""
    own = model.state_dict()
    drop = classifier_prefixes(model) if is_timm(arch) else _CLASSIFIERS
    state = {k: v for k, v in state.items() if k in own or not k.startswith(drop)}
    _check_fit(model, state, path, _describe(arch, model))
    model.load_state_dict(state, strict=True)


def load_init(model: nn.Module, arch: str, path: str | Path, *, which: str = "student") -> None:
    """Put the ``which`` backbone of any supported file (torchvision / timm state dict, our encoder.pt or
    training checkpoint, official ISD, MoCo, DINO / AdaSim) into ``model`` (of ``arch``), strictly."""
    _check_which(which)
    path = Path(path)
    _, state, _ = _read_state(path, which)
    _load_strict(model, arch, _names_for(arch, state), path)


def _build_for(
    arch: str, state: dict[str, torch.Tensor], header: EncoderHeader | None, cifar_stem: bool
) -> nn.Module:
    """The model that ``state`` should fit: ViT patch, image size and depth are read off the weights."""
    shape = vit_shape(state) if is_vit(arch) else None
    if shape:
        _, patch, size, depth = shape
        return build_backbone(arch, image_size=size, patch_size=patch, depth=depth)
    size = header.image_size if header else 224
    patch = (header.patch_size if header else 0) or None
    return build_backbone(arch, cifar_stem=cifar_stem, image_size=size, patch_size=patch)


def load_backbone(
    path: str | Path,
    *,
    which: str = "student",
    arch: str | None = None,
    cifar_stem: bool | None = None,
) -> tuple[nn.Module, EncoderHeader]:
    """Load the student or teacher backbone of any supported checkpoint, strictly, in eval mode.

    Architecture and stem come from our header when present, else from the keys (a ViT's width, patch,
    image size and depth from its weights; a DINO file's ``args.arch`` only names it in errors); ``arch``
    and ``cifar_stem`` override both. Foreign files get a header with ImageNet mean/std, image size 224
    (32 for the CIFAR stem and small_cnn; a ViT's own) and ``source = "<file name>:<which>"``.
    """
    _check_which(which)
    path = Path(path)
    obj, state, header = _read_state(path, which)
    state = _names_for(arch or (header.arch if header else None), state)
    args = obj.get("args")
    hint = f"args.arch = {args.arch}" if isinstance(getattr(args, "arch", None), str) else ""
    arch = arch or (header.arch if header else _infer_arch(state, path, hint))
    if arch not in ARCHS and not is_timm(arch):
        raise CheckpointError(
            f"unknown architecture {arch!r} for {path}; choose one of {', '.join(ARCHS)} or timm:NAME"
        )
    if cifar_stem is None:
        conv1 = state.get("conv1.weight")
        inferred = conv1 is not None and conv1.dim() == 4 and conv1.shape[-1] == 3
        cifar_stem = header.cifar_stem if header else inferred
    cifar_stem = cifar_stem and arch in ("resnet18", "resnet50")

    try:
        model = _build_for(arch, state, header, cifar_stem)
    except ValueError as exc:
        raise CheckpointError(f"checkpoint {path}: {exc}") from None
    _load_strict(model, arch, state, path)
    built = {
        "arch": arch,
        "cifar_stem": cifar_stem,
        "feature_dim": model.feature_dim,
        "patch_size": int(model.patch_size) if is_vit(arch) else timm_patch(model),
    }
    if is_vit(arch):
        built["image_size"] = int(model.image_size)
    if header is None:
        header = EncoderHeader(
            **{"image_size": 32 if cifar_stem or arch == "small_cnn" else 224, **built},
            mean=IMAGENET_MEAN,
            std=IMAGENET_STD,
            source=f"{path.name}:{which}",
            source_sha256=file_sha256(path),
        )
    else:
        header = dataclasses.replace(header, **built)
        if obj.get("format") == CHECKPOINT_FORMAT:
            header = dataclasses.replace(
                header, source=f"{path.name}:{which}", source_sha256=file_sha256(path)
            )
        elif not header.source:  # an export that does not say where it came from: point at the export
            header = dataclasses.replace(header, source=path.name, source_sha256=file_sha256(path))
    return model.eval(), header
