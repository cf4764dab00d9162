"""Schedules evaluated per step: the learning rate (linear warm-up, then cosine, step or constant) and
the weight decay (constant, or DINO's cosine from ``weight_decay`` to ``weight_decay_end``)."""

from __future__ import annotations

import math

from isdretrieve.train.recipe import OptimConfig


def learning_rate(cfg: OptimConfig, step: int, steps_per_epoch: int, total_steps: int) -> float:
    """LR at ``step`` (0-based). The warm-up rises linearly to lr over W steps, from 0 (``warmup_from:
    zero``, DINO's ``linspace(0, lr, W)``) or from lr / W (``first_step``); the cosine then falls
    towards ``min_lr``."""
    warmup = int(round(cfg.warmup_epochs * steps_per_epoch))
    if step < warmup:
        if cfg.warmup_from == "zero":
            return linspace_value(0.0, cfg.lr, warmup, step)
        return cfg.lr * (step + 1) / warmup
    if cfg.schedule == "cosine":
        return cosine(cfg.lr, cfg.min_lr, step - warmup, max(total_steps - warmup, 1))
    if cfg.schedule == "step":
        epoch = step // steps_per_epoch
        return cfg.lr * cfg.gamma ** sum(epoch >= m for m in cfg.milestones)
    return cfg.lr


def weight_decay(cfg: OptimConfig, step: int, total_steps: int) -> float:
    """Weight decay of the decayed parameters at ``step``: ``weight_decay`` throughout, or with
    ``weight_decay_end`` a cosine from one to the other over the run (no warm-up)."""
    if cfg.weight_decay_end is None:
        return cfg.weight_decay
    return cosine(cfg.weight_decay, cfg.weight_decay_end, step, max(total_steps, 1))


def cosine(start: float, end: float, done: int, span: int) -> float:
    """Half a cosine from ``start`` (done = 0) towards ``end`` (done = span)."""
    return end + (start - end) * 0.5 * (1 + math.cos(math.pi * done / span))


def linspace_value(start: float, stop: float, num: int, i: int) -> float:
    """``numpy.linspace(start, stop, num)[i]`` to the bit (i·step + start, the last value ``stop``),
    without building the array: DINO's warm-ups are linspaces."""
    if num > 1 and i == num - 1:
        return stop
    return i * ((stop - start) / (num - 1)) + start if num > 1 else start
