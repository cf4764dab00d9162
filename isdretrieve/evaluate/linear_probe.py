"""Linear probe on frozen features, the ISD evaluation protocol (eval_linear.py) on bank features:
L2-normalise, standardise each dimension with the train features' fixed mean and variance, then a
linear layer trained with SGD (lr 0.01, momentum 0.9, wd 1e-4, batch 256, 40 epochs, ×0.1 at 15 and 30).
The official protocol also augments images (random resized crop + flip); on a bank the features are
fixed, so this is the probe without augmentation — say so next to its numbers. The protocol on images
is :mod:`isdretrieve.linear_eval` (``isd-knn --linear images``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

BANK_PROTOCOL = "bank features, no augmentation"


@dataclass(frozen=True)
class ProbeConfig:
    epochs: int = 40
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 1e-4
    batch_size: int = 256
    milestones: tuple[int, ...] = (15, 30)
    seed: int = 0


@dataclass(frozen=True)
class ProbeResult:
    top1: float
    top5: float
    train_top1: float
    epochs: int
    protocol: str = BANK_PROTOCOL


def standardiser(train_features: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
    """x ↦ (normalize(x) − μ) / √(σ² + 1e-5), μ and σ² over the L2-normalised train features."""
    train = F.normalize(train_features.float(), dim=1)
    mean, var = train.mean(dim=0), train.var(dim=0, unbiased=False)

    def standardise(x: torch.Tensor) -> torch.Tensor:
        return (F.normalize(x.float(), dim=1) - mean) / torch.sqrt(var + 1e-5)

    return standardise


def fit_linear(
    batch_features: Callable[[torch.Tensor], torch.Tensor],
    labels: torch.Tensor,
    dim: int,
    num_classes: int,
    cfg: ProbeConfig,
    generator: torch.Generator,
) -> torch.nn.Linear:
    """SGD on cross-entropy over shuffled mini-batches; ``batch_features(idx)`` gives the inputs of
    rows ``idx`` (fixed features, or freshly augmented ones every call)."""
    torch.manual_seed(cfg.seed)
    head = torch.nn.Linear(dim, num_classes)
    opt = torch.optim.SGD(head.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=list(cfg.milestones), gamma=0.1)
    for _ in range(cfg.epochs):
        order = torch.randperm(len(labels), generator=generator)
        for start in range(0, len(labels), cfg.batch_size):
            idx = order[start : start + cfg.batch_size]
            loss = F.cross_entropy(head(batch_features(idx)), labels[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        sched.step()
    return head


def topk_accuracy(logits: torch.Tensor, labels: torch.Tensor) -> tuple[float, float]:
    """(top-1, top-5) accuracy of class logits [N, C] against labels [N]."""
    ranked = logits.topk(min(5, logits.shape[1]), dim=1).indices
    truth = labels.long()[:, None]
    return (
        (ranked[:, :1] == truth).any(dim=1).double().mean().item(),
        (ranked == truth).any(dim=1).double().mean().item(),
    )


def linear_probe(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    test_features: torch.Tensor,
    test_labels: torch.Tensor,
    cfg: ProbeConfig = ProbeConfig(),
) -> ProbeResult:
    """Train a linear classifier on standardised train features; report test top-1/top-5."""
    gen = torch.Generator().manual_seed(cfg.seed)
    standardise = standardiser(train_features)
    x, y = standardise(train_features), train_labels.long()
    num_classes = int(max(y.max(), test_labels.max())) + 1
    head = fit_linear(lambda idx: x[idx], y, x.shape[1], num_classes, cfg, gen)
    with torch.no_grad():
        train_top1 = topk_accuracy(head(x), y)[0]
        top1, top5 = topk_accuracy(head(standardise(test_features)), test_labels)
    return ProbeResult(top1, top5, train_top1, cfg.epochs)
