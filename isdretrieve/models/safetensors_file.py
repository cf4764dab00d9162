"""Encoder weights as safetensors with a JSON config: a pair that can be inspected and loaded without
unpickling anything (the form timm, open_clip and Hugging Face share weights in).

- ``encoder.safetensors``: the backbone's tensors (torchvision key names, no classifier); its metadata
  repeats the header, so the file alone is enough;
- ``encoder.json`` (the same name with ``.json``): ``format`` (``isdretrieve.encoder-config/1``), the
  encoder header's fields (``arch``, ``cifar_stem``, ``feature_dim``, ``image_size``, ``mean``, ``std``,
  ``patch_size``, ``source``, ``source_sha256``), ``weights`` (the weights file's name, beside it) and
  ``weights_sha256``.

Reading uses safetensors' own parser (a JSON header, then raw little-endian tensors) and ``json``: no
pickle is involved, so a file cannot run code when it is loaded. A safetensors file without our header
(another tool's) loads as a plain state dict; a JSON file of another format beside it is left alone.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch

from isdretrieve.errors import CheckpointError, MissingExtra
from isdretrieve.files.atomic import atomic_path
from isdretrieve.files.encoder_header import EncoderHeader

CONFIG_FORMAT = "isdretrieve.encoder-config/1"
SUFFIXES = (".safetensors", ".json")


def _safetensors_torch() -> Any:
    try:
        import safetensors.torch
    except ImportError:
        raise MissingExtra("safetensors files need safetensors: pip install safetensors") from None
    return safetensors.torch


def is_safetensors_path(path: str | Path) -> bool:
    """Whether ``path`` names a safetensors encoder: a ``.safetensors`` file or its ``.json`` config."""
    return Path(path).suffix.lower() in SUFFIXES


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def write_safetensors(state: dict[str, torch.Tensor], header: EncoderHeader, path: str | Path) -> Path:
    """Write ``state`` to ``path`` (``*.safetensors``) and the config beside it (``*.json``), each
    atomically, the config last; returns the config's path."""
    weights = Path(path)
    if weights.suffix != ".safetensors":
        raise CheckpointError(f"a safetensors encoder is written to a .safetensors file, got {weights}")
    tensors = {key: value.detach().cpu().contiguous() for key, value in state.items()}
    metadata = {"format": CONFIG_FORMAT, "header": json.dumps(header.to_dict())}
    with atomic_path(weights) as tmp:
        _safetensors_torch().save_file(tensors, str(tmp), metadata=metadata)
    config = {"format": CONFIG_FORMAT, **header.to_dict()}
    config.update(weights=weights.name, weights_sha256=_sha256(weights))
    with atomic_path(weights.with_suffix(".json")) as tmp:
        tmp.write_text(json.dumps(config, indent=2) + "\n")
    return weights.with_suffix(".json")


def _read_config(path: Path, *, required: bool) -> dict[str, Any] | None:
    """Our config at ``path``; another tool's JSON there is None unless ``required`` (then an error)."""
    try:
        config = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"cannot read encoder config {path}: {exc}") from None
    if not isinstance(config, dict) or config.get("format") != CONFIG_FORMAT:
        if not required:
            return None
        found = config.get("format") if isinstance(config, dict) else type(config).__name__
        raise CheckpointError(f"{path} is not an encoder config (format {found!r}, expected {CONFIG_FORMAT})")
    name = config.get("weights")
    if not isinstance(name, str) or not name.endswith(".safetensors") or Path(name).name != name:
        raise CheckpointError(f"{path}: 'weights' must name a .safetensors file beside it, got {name!r}")
    return config


def read_safetensors(path: str | Path) -> tuple[dict[str, torch.Tensor], EncoderHeader | None]:
    """(tensors, header) of a safetensors encoder given as its weights or its config; the header is None
    for another tool's file. The config must describe these weights (its ``weights_sha256``)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    given_config = path.suffix.lower() == ".json"
    config_path = path if given_config else path.with_suffix(".json")
    config = _read_config(config_path, required=given_config) if config_path.is_file() else None
    weights = path.parent / config["weights"] if config and given_config else path
    if not weights.is_file():
        raise CheckpointError(f"checkpoint not found: {weights} (named by {path})")
    try:
        with _safetensors_torch().safe_open(str(weights), framework="pt") as f:
            metadata = f.metadata() or {}
            tensors = {key: f.get_tensor(key) for key in f.keys()}  # noqa: SIM118 (safe_open has no iterator)
    except (MissingExtra, CheckpointError):
        raise
    except Exception as exc:  # safetensors raises its own SafetensorError, OSError, ValueError
        reason = " ".join(str(exc).split())[:160]
        raise CheckpointError(
            f"cannot read {weights}: not a safetensors file or truncated ({reason})"
        ) from None
    if config is not None:
        if config.get("weights_sha256") not in (None, _sha256(weights)):
            raise CheckpointError(f"{config_path} describes other weights than {weights}")
        return tensors, EncoderHeader.from_dict(config)
    if metadata.get("format") == CONFIG_FORMAT and "header" in metadata:
        try:
            return tensors, EncoderHeader.from_dict(json.loads(metadata["header"]))
        except json.JSONDecodeError as exc:
            raise CheckpointError(f"{weights}: the header in its metadata is not JSON ({exc})") from None
    return tensors, None
