"""Learning-rate schedules evaluated per step: linear warm-up, then cosine, step or constant."""

from __future__ import annotations

import math

from isdretrieve.train.recipe import OptimConfig


def learning_rate(cfg: OptimConfig, step: int, steps_per_epoch: int, total_steps: int) -> float:
    """LR at ``step`` (0-based). Warm-up rises linearly from lr/warmup_steps to lr."""
    warmup = int(round(cfg.warmup_epochs * steps_per_epoch))
    if step < warmup:
        return cfg.lr * (step + 1) / warmup
    if cfg.schedule == "cosine":
        span = max(total_steps - warmup, 1)
        return cfg.lr * 0.5 * (1 + math.cos(math.pi * (step - warmup) / span))
    if cfg.schedule == "step":
        epoch = step // steps_per_epoch
        return cfg.lr * cfg.gamma ** sum(epoch >= m for m in cfg.milestones)
    return cfg.lr
