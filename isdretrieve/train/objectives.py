"""Training objectives as pure tensor functions (no state, no modules).

Every function takes L2-normalised embeddings where the formula needs them and returns a scalar loss
averaged over the batch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def similarity_distillation(
    student: torch.Tensor, teacher: torch.Tensor, anchors: torch.Tensor, tau_s: float, tau_t: float
) -> torch.Tensor:
    """ISD loss: mean over the batch of KL(p_t ‖ p_s), p = softmax(x · anchorsᵀ / τ) over the anchors.

    student [B, d] (gradient flows), teacher [B, d] (detached here), anchors [K, d] (detached here).
    """
    anchors = anchors.detach()
    log_p_s = F.log_softmax(student @ anchors.T / tau_s, dim=1)
    log_p_t = F.log_softmax(teacher.detach() @ anchors.T / tau_t, dim=1)
    return F.kl_div(log_p_s, log_p_t, reduction="batchmean", log_target=True)


def info_nce(
    query: torch.Tensor,
    positives: torch.Tensor,
    queue: torch.Tensor,
    tau: float,
    negative_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """InfoNCE with a queue of negatives, optionally with several positives per query (SePP).

    query [B, d]; positives [B, P, d] or [B, d] (P = 1); queue [K, d]. Multi-positive form (Khosla et
    al.): L = −1/P Σ_p log(exp(q·k_p/τ) / Σ_c exp(q·c/τ)), c running over all P positives and the queue;
    with P = 1 this is MoCo's loss. ``negative_mask`` [B, K] drops queue entries from a query's
    candidates (True = drop).
    """
    if positives.dim() == 2:
        positives = positives.unsqueeze(1)
    positives, queue = positives.detach(), queue.detach()
    pos_logits = torch.einsum("bd,bpd->bp", query, positives) / tau
    neg_logits = query @ queue.T / tau
    if negative_mask is not None:
        neg_logits = neg_logits.masked_fill(negative_mask, float("-inf"))
    log_norm = torch.logsumexp(torch.cat([pos_logits, neg_logits], dim=1), dim=1, keepdim=True)
    return -(pos_logits - log_norm).mean(dim=1).mean()


def normalized_mse(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """BYOL loss: mean over the batch of ‖p̂ − ẑ‖² = 2 − 2·cos(p, z), target detached."""
    p = F.normalize(prediction, dim=1)
    z = F.normalize(target.detach(), dim=1)
    return (2 - 2 * (p * z).sum(dim=1)).mean()
