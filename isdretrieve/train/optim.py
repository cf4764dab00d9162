"""The optimiser a recipe names, and what happens to the gradients between backward and its step.

Parameter groups: one decayed group; with ``optim.no_decay_bias_and_norm`` a second, undecayed group of
every parameter whose name ends in ``.bias`` or whose tensor is 1-D (DINO's rule: biases, norm weights).
Each group says whether it is decayed (``"decay"``), so that the per-step weight-decay schedule changes
the decayed group only. Clipping works on foreach tensor ops and reads nothing back, so a training step
stays free of host syncs; the total norm it returns is a tensor for the caller to read when it logs.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from isdretrieve.train.recipe import OptimConfig

EPS = 1e-6  # added to a gradient's norm before dividing by it (DINO's per-parameter clipping)
CLIP_MODES = ("per_param", "global")


def is_undecayed(name: str, param: torch.Tensor) -> bool:
    """DINO's rule: biases and 1-D parameters (norm weights and biases) get no weight decay."""
    return name.endswith(".bias") or param.ndim == 1


def param_groups(module: nn.Module, weight_decay: float, no_decay_bias_and_norm: bool) -> list[dict]:
    """The trainable parameters of ``module`` as optimiser groups: decayed, then (if any) undecayed."""
    decayed, undecayed = [], []
    for name, param in module.named_parameters():
        if param.requires_grad:
            skip = no_decay_bias_and_norm and is_undecayed(name, param)
            (undecayed if skip else decayed).append(param)
    groups = [
        {"params": decayed, "weight_decay": weight_decay, "decay": True},
        {"params": undecayed, "weight_decay": 0.0, "decay": False},
    ]
    return [group for group in groups if group["params"]]


def build_optimizer(cfg: OptimConfig, module: nn.Module) -> torch.optim.Optimizer:
    """``optim.optimizer`` over the trainable parameters of ``module``, grouped by :func:`param_groups`."""
    groups = param_groups(module, cfg.weight_decay, cfg.no_decay_bias_and_norm)
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay)
    return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)


def set_hyperparameters(optimizer: torch.optim.Optimizer, lr: float, weight_decay: float) -> None:
    """This step's learning rate for every group and weight decay for the decayed ones (a group saved
    before groups were marked is the one decayed group of the time)."""
    for group in optimizer.param_groups:
        group["lr"] = lr
        if group.get("decay", True):
            group["weight_decay"] = weight_decay


def drop_gradients(params: Iterable[torch.Tensor]) -> None:
    """Forget these gradients: the step then skips the parameters, weight decay included."""
    for param in params:
        param.grad = None


def clip_gradients(
    params: list[torch.Tensor], max_norm: float | None, mode: str = "per_param", want_norm: bool = False
) -> torch.Tensor | None:
    """Clip the gradients of ``params`` in place; the total L2 norm before clipping if ``want_norm``.

    ``per_param``: each gradient g becomes g · min(1, max_norm / (‖g‖ + 1e-6)) (DINO's). ``global``:
    all of them are scaled together so that their total norm is at most max_norm (torch's
    ``clip_grad_norm_``). ``max_norm`` None: nothing is clipped."""
    if mode not in CLIP_MODES:
        raise ValueError(f"clip mode must be one of {', '.join(CLIP_MODES)}, got {mode!r}")
    params = [p for p in params if p.grad is not None]
    if not params:
        return torch.zeros(()) if want_norm else None
    if max_norm is not None and mode == "global":
        total = torch.nn.utils.clip_grad_norm_(params, max_norm)
        return total if want_norm else None
    if max_norm is None and not want_norm:
        return None
    grads = [p.grad for p in params]
    norms = torch.stack(torch._foreach_norm(grads))
    if max_norm is not None:
        scale = (max_norm / (norms + EPS)).clamp_(max=1.0)
        torch._foreach_mul_(grads, list(scale.unbind()))
    return torch.linalg.vector_norm(norms) if want_norm else None
