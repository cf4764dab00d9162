"""``timm:NAME``: any timm model as a backbone (timm is the optional extra ``isdretrieve[timm]``).

Built with ``pretrained=False`` (never downloads; weights come from ``model.init``) and ``num_classes=0``,
so the forward returns timm's pooled pre-logits. Models with a fixed input size (ViTs and the like) are
built for the run's image size; timm's ViTs refuse any other size unless built with
``dynamic_img_size=True`` (then they resize their position embedding per input), which
``dynamic_size`` asks for where the views come in several sizes (DINO's local crops).
"""

from __future__ import annotations

from types import ModuleType

from torch import nn

from isdretrieve.errors import MissingExtra

TIMM_PREFIX = "timm:"


def import_timm() -> ModuleType:
    try:
        import timm
    except ImportError:
        raise MissingExtra("timm: backbones need timm: pip install 'isdretrieve[timm]'") from None
    return timm


def timm_name(arch: str) -> str:
    return arch[len(TIMM_PREFIX) :]


def build_timm(
    arch: str, *, image_size: int, patch_size: int | None = None, dynamic_size: bool = False
) -> nn.Module:
    """``timm.create_model(NAME, pretrained=False, num_classes=0)`` at ``image_size`` (and ``patch_size``,
    if given) where the model takes them; convolutional models take any size and get neither. With
    ``dynamic_size``, models that have timm's ``dynamic_img_size`` switch get it on (inputs of other
    sizes allowed); the others are built as usual (whether they take other sizes, the caller checks)."""
    timm, name = import_timm(), timm_name(arch)
    if not timm.is_model(name):
        raise ValueError(f"unknown timm model {name!r} (see timm.list_models())")
    sizes = {"img_size": image_size, **({"patch_size": patch_size} if patch_size else {})}
    model = None
    if dynamic_size:
        try:
            model = timm.create_model(name, pretrained=False, num_classes=0, **sizes, dynamic_img_size=True)
        except TypeError as exc:
            if not _size_argument(exc):
                raise
    if model is None:
        try:
            model = timm.create_model(name, pretrained=False, num_classes=0, **sizes)
        except TypeError as exc:
            if not _size_argument(exc):
                raise
            if patch_size:
                raise ValueError(f"timm model {name!r} takes no patch size") from None
            model = timm.create_model(name, pretrained=False, num_classes=0)
    model.feature_dim = int(getattr(model, "head_hidden_size", None) or model.num_features)
    return model


def _size_argument(exc: TypeError) -> bool:
    """Whether a model refused one of the size arguments (img_size, patch_size, dynamic_img_size)."""
    return "img_size" in str(exc) or "patch_size" in str(exc)


def timm_patch(model: nn.Module) -> int:
    """Patch size of a timm patch model, 0 for the others (for the encoder header)."""
    patch = getattr(getattr(model, "patch_embed", None), "patch_size", 0)
    return int(patch[0] if isinstance(patch, tuple) else patch)


def classifier_prefixes(model: nn.Module) -> tuple[str, ...]:
    """State-dict prefixes of the classifier that ``num_classes=0`` removed (``head.``, ``fc.``, ...)."""
    names = getattr(model, "pretrained_cfg", {}).get("classifier") or ()
    names = (names,) if isinstance(names, str) else tuple(names)
    return tuple(f"{n}." for n in names)
