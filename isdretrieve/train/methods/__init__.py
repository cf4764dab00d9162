"""Methods on the shared engine, one short module each; ``build_method`` picks one from a recipe."""

from __future__ import annotations

from torch import nn

from isdretrieve.train.methods.base import Batch, Method, StepOutput
from isdretrieve.train.methods.byol import BYOL
from isdretrieve.train.methods.isd import ISD
from isdretrieve.train.methods.moco import MoCo
from isdretrieve.train.recipe import ByolConfig, IsdConfig, MethodConfig, MocoConfig

__all__ = ["BYOL", "ISD", "Batch", "Method", "MoCo", "StepOutput", "build_method"]


def build_method(cfg: MethodConfig, backbone: nn.Module, seed: int = 0) -> Method:
    """The method named by ``cfg`` around ``backbone`` (its student), teacher and memory included."""
    match cfg:
        case IsdConfig():
            return ISD(backbone, cfg, seed)
        case MocoConfig():
            return MoCo(backbone, cfg, seed)
        case ByolConfig():
            return BYOL(backbone, cfg, seed)
    raise TypeError(f"no method for {type(cfg).__name__}")
