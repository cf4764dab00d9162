"""Checkpoint files: safe loading, atomic saving, encoder export, and backbone loading.

``load_backbone`` reads our own training checkpoints and encoder exports, official ISD training files
(ISD-base and ISD-MLP), MoCo-style files and plain (torchvision-keyed) backbone state dicts.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import pickle
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from isdretrieve.atomic import atomic_path
from isdretrieve.errors import CheckpointError
from isdretrieve.models.backbones import ARCHS, build_backbone, feature_dim

CHECKPOINT_FORMAT = "isdretrieve.checkpoint/1"
ENCODER_FORMAT = "isdretrieve.encoder/1"
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
WHICH = ("student", "teacher")
# Globals a checkpoint may reference beyond torch's own weights-only set: official ISD files pickle their
# argparse options under "opt".
SAFE_GLOBALS: tuple[type, ...] = (argparse.Namespace,)

_NON_BACKBONE_KEYS = frozenset({"queue", "queue_ptr", "labels"})
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


# ------------------------------------------------------------------------------------------- header
@dataclass(frozen=True)
class EncoderHeader:
    """What a consumer needs to use an encoder: architecture, input size and normalisation, provenance."""

    arch: str
    cifar_stem: bool
    feature_dim: int
    image_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    source: str = ""  # where the weights came from: "<file name>:<student|teacher>"
    source_sha256: str = ""  # sha256 of the source file ("" if unknown)

    def to_dict(self) -> dict[str, Any]:
        """Plain-type dict (mean/std as lists), safe to pickle with weights_only and to write as JSON."""
        d = dataclasses.asdict(self)
        d["mean"], d["std"] = list(self.mean), list(self.std)
        return d

    @classmethod
    def from_dict(cls, d: Any) -> EncoderHeader:
        """Inverse of ``to_dict``; ignores unknown keys, raises CheckpointError for missing/ill-typed ones."""
        if not isinstance(d, dict):
            raise CheckpointError(f"invalid encoder header: expected a dict, got {type(d).__name__}")
        required = [f.name for f in dataclasses.fields(cls) if f.default is dataclasses.MISSING]
        missing = [name for name in required if name not in d]
        if missing:
            raise CheckpointError(f"invalid encoder header: missing {', '.join(missing)}")
        try:
            mean = tuple(float(x) for x in d["mean"])
            std = tuple(float(x) for x in d["std"])
            if len(mean) != 3 or len(std) != 3:
                raise ValueError("mean and std need 3 values each")
            if not isinstance(d["cifar_stem"], bool) or not isinstance(d["arch"], str):
                raise ValueError("arch must be a string and cifar_stem a boolean")
            return cls(
                arch=d["arch"],
                cifar_stem=d["cifar_stem"],
                feature_dim=int(d["feature_dim"]),
                image_size=int(d["image_size"]),
                mean=mean,  # type: ignore[arg-type]
                std=std,  # type: ignore[arg-type]
                source=str(d.get("source", "")),
                source_sha256=str(d.get("source_sha256", "")),
            )
        except (TypeError, ValueError) as exc:
            raise CheckpointError(f"invalid encoder header: {exc}") from exc


def export_encoder(backbone: nn.Module, header: EncoderHeader, path: str | Path) -> None:
    """Atomically write ``{"format", "header", "state_dict"}`` (torchvision keys, no ``fc.*``) to ``path``."""
    dim = getattr(backbone, "feature_dim", header.feature_dim)
    if dim != header.feature_dim:
        raise ValueError(f"header.feature_dim={header.feature_dim} but the backbone produces {dim}")
    state = {k: v.detach().cpu() for k, v in backbone.state_dict().items() if not k.startswith("fc.")}
    atomic_save({"format": ENCODER_FORMAT, "header": header.to_dict(), "state_dict": state}, path)


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


def extract_backbone_state(obj: dict, *, which: str = "student") -> dict[str, torch.Tensor]:
    """Backbone state dict (torchvision keys, no ``fc.*``) of the student or teacher in a loaded checkpoint.

    Recognised, in order: our training checkpoint, our encoder export, official ISD training files
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
def _infer_arch(state: dict[str, torch.Tensor], path: Path) -> str:
    if "stage1.0.conv.weight" in state:
        return "small_cnn"
    if "layer4.0.conv3.weight" in state:
        return "resnet50"
    if "layer1.0.conv1.weight" in state:
        return "resnet18"
    first = ", ".join(list(state)[:5])
    raise CheckpointError(
        f"cannot tell the architecture of checkpoint {path} from its keys ({first}, ...); "
        f"choose one of {', '.join(ARCHS)} explicitly"
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


def load_backbone(
    path: str | Path,
    *,
    which: str = "student",
    arch: str | None = None,
    cifar_stem: bool | None = None,
) -> tuple[nn.Module, EncoderHeader]:
    """Load the student or teacher backbone of any supported checkpoint, strictly, in eval mode.

    Architecture and stem come from our header when present, else from the keys; ``arch`` and
    ``cifar_stem`` override both. Foreign files get a header with ImageNet mean/std, image size 224
    (32 for the CIFAR stem and small_cnn) and ``source = "<file name>:<which>"``.
    """
    _check_which(which)
    path = Path(path)
    obj = safe_load(path)
    try:
        state = extract_backbone_state(obj, which=which)
        fmt = obj.get("format")
        stored = obj.get("encoder") if fmt == CHECKPOINT_FORMAT else obj.get("header")
        header = EncoderHeader.from_dict(stored) if fmt in (CHECKPOINT_FORMAT, ENCODER_FORMAT) else None
    except CheckpointError as exc:
        raise CheckpointError(f"checkpoint {path}: {exc}") from exc

    arch = arch or (header.arch if header else _infer_arch(state, path))
    if arch not in ARCHS:
        raise CheckpointError(f"unknown architecture {arch!r} for {path}; choose one of {', '.join(ARCHS)}")
    if cifar_stem is None:
        conv1 = state.get("conv1.weight")
        inferred = conv1 is not None and conv1.dim() == 4 and conv1.shape[-1] == 3
        cifar_stem = header.cifar_stem if header else inferred
    cifar_stem = cifar_stem and arch != "small_cnn"

    if header is None:
        header = EncoderHeader(
            arch=arch,
            cifar_stem=cifar_stem,
            feature_dim=feature_dim(arch),
            image_size=32 if cifar_stem or arch == "small_cnn" else 224,
            mean=IMAGENET_MEAN,
            std=IMAGENET_STD,
            source=f"{path.name}:{which}",
            source_sha256=file_sha256(path),
        )
    else:
        header = dataclasses.replace(header, arch=arch, cifar_stem=cifar_stem, feature_dim=feature_dim(arch))
        if obj.get("format") == CHECKPOINT_FORMAT:
            header = dataclasses.replace(
                header, source=f"{path.name}:{which}", source_sha256=file_sha256(path)
            )
        elif not header.source:  # an export that does not say where it came from: point at the export
            header = dataclasses.replace(header, source=path.name, source_sha256=file_sha256(path))

    model = build_backbone(arch, cifar_stem=cifar_stem)
    stem = "" if arch == "small_cnn" else (" (cifar stem)" if cifar_stem else " (standard stem)")
    _check_fit(model, state, path, f"{arch}{stem}")
    model.load_state_dict(state, strict=True)
    return model.eval(), header
