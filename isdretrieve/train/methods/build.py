"""Pick the method a recipe names and build it around a backbone."""

from __future__ import annotations

from torch import nn

from isdretrieve.train.methods.adasim import AdaSim
from isdretrieve.train.methods.base import DataContext, Method
from isdretrieve.train.methods.byol import BYOL
from isdretrieve.train.methods.isd import ISD
from isdretrieve.train.methods.moco import MoCo
from isdretrieve.train.methods.sepp import build_sepp
from isdretrieve.train.recipe import AdasimConfig, ByolConfig, IsdConfig, MethodConfig, MocoConfig, SeppConfig


def build_method(cfg: MethodConfig, backbone: nn.Module, data: DataContext) -> Method:
    """The method named by ``cfg`` around ``backbone`` (its student), teacher and memory included."""
    seed = data.seed
    match cfg:
        case IsdConfig():
            return ISD(backbone, cfg, seed)
        case MocoConfig():
            return MoCo(backbone, cfg, seed)
        case ByolConfig():
            return BYOL(backbone, cfg, seed)
        case SeppConfig():
            return build_sepp(backbone, cfg, data)
        case AdasimConfig():
            return AdaSim(backbone, cfg, data)
    raise TypeError(f"no method for {type(cfg).__name__}")
