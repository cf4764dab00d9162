"""Import torchvision even where its compiled extension cannot load.

PyPI ships only CUDA builds of torchvision for Linux; next to a CPU-only torch its C extension fails to
load and ``import torchvision`` then dies registering fake kernels for ``torchvision::nms``. We only use
torchvision's pure-Python parts (ResNet definitions, tensor transforms), so when that happens we declare
the two operator schemas it expects (without kernels) and import again. Calling nms would still fail.
"""

from __future__ import annotations

import sys
from types import ModuleType

import torch

_SCHEMAS = (
    "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
)
_fallback_library: torch.library.Library | None = None  # kept alive: dropping it unregisters the schemas


def import_torchvision() -> ModuleType:
    """Return the ``torchvision`` module, declaring missing operator schemas if its extension is absent."""
    global _fallback_library
    try:
        import torchvision
    except RuntimeError as exc:
        if "torchvision::" not in str(exc):
            raise
        for name in [n for n in sys.modules if n == "torchvision" or n.startswith("torchvision.")]:
            del sys.modules[name]
        _fallback_library = torch.library.Library("torchvision", "DEF")
        for schema in _SCHEMAS:
            _fallback_library.define(schema)
        import torchvision
    return torchvision
