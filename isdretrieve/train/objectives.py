"""Training objectives as pure tensor functions (no state, no modules).

Every function takes L2-normalised embeddings where the formula needs them and returns a scalar loss
averaged over the batch. Each computes in fp32 whatever autocast is on (see :func:`in_fp32`).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import TypeVar

import torch
import torch.nn.functional as F

_MASKED = -1e9
_Fn = TypeVar("_Fn", bound=Callable)


def in_fp32(fn: _Fn) -> _Fn:
    """Run ``fn`` with its fp16/bf16 tensor arguments cast to fp32 and autocast off.

    The logits here are cosine similarities divided by τ (down to 0.01). Under bf16 autocast a product's
    *output* is rounded to 8 significant bits: at cos 0.8 and τ = 0.02 that is about 0.1–0.2 on a logit,
    and on clustered embeddings (near neighbours at cos ≈ 0.8) ISD's gradient kept a cosine of only
    0.5–0.8 with the fp32 one. Rounding the *inputs* to bf16 changed nothing measurable (cosine 1.0000),
    so the network stays in bf16 and only these small products (B × K × d) run in fp32. Gradients flow
    back in the inputs' own dtype.
    """

    def to_fp32(x):
        if isinstance(x, list | tuple):  # a sequence of tensors (one per view)
            return type(x)(to_fp32(t) for t in x)
        low = isinstance(x, torch.Tensor) and x.is_floating_point() and torch.finfo(x.dtype).bits < 32
        return x.float() if low else x

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        args, kwargs = [to_fp32(a) for a in args], {k: to_fp32(v) for k, v in kwargs.items()}
        device = next(t for t in (*args, *kwargs.values()) if isinstance(t, torch.Tensor)).device.type
        with torch.autocast(device, enabled=False):
            return fn(*args, **kwargs)

    return wrapper  # type: ignore[return-value]


@in_fp32
def similarity_logits(
    student: torch.Tensor,
    teacher: torch.Tensor,
    anchors: torch.Tensor,
    tau_s: float,
    tau_t: float,
    extra_anchors: torch.Tensor | None = None,
    extra_mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(student, teacher) logits x · anchorsᵀ / τ over the anchors [B, K (+P)], teacher detached.

    student [B, d] (gradient flows), teacher [B, d], anchors [K, d] (detached here).
    ``extra_anchors`` [B, P, d] are per-sample anchors added to each row's own candidates (SePP-ISD: the
    mined positive's teacher embedding); ``extra_mask`` [B, P] keeps only those that are True.
    """
    anchors, teacher = anchors.detach(), teacher.detach()
    logits_s, logits_t = student @ anchors.T / tau_s, teacher @ anchors.T / tau_t
    if extra_anchors is not None:
        extra = extra_anchors.detach()
        extra_s = torch.einsum("bd,bpd->bp", student, extra) / tau_s
        extra_t = torch.einsum("bd,bpd->bp", teacher, extra) / tau_t
        if extra_mask is not None:  # a large finite negative: exp() is exactly 0 and no NaN appears
            extra_s = extra_s.masked_fill(~extra_mask, _MASKED)
            extra_t = extra_t.masked_fill(~extra_mask, _MASKED)
        logits_s, logits_t = torch.cat([logits_s, extra_s], 1), torch.cat([logits_t, extra_t], 1)
    return logits_s, logits_t


@in_fp32
def distillation_kl(logits_s: torch.Tensor, logits_t: torch.Tensor) -> torch.Tensor:
    """Mean over the batch of KL(softmax(logits_t) ‖ softmax(logits_s))."""
    log_p_s = F.log_softmax(logits_s, dim=1)
    log_p_t = F.log_softmax(logits_t, dim=1)
    return F.kl_div(log_p_s, log_p_t, reduction="batchmean", log_target=True)


def similarity_distillation(
    student: torch.Tensor,
    teacher: torch.Tensor,
    anchors: torch.Tensor,
    tau_s: float,
    tau_t: float,
    extra_anchors: torch.Tensor | None = None,
    extra_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """ISD loss: mean over the batch of KL(p_t ‖ p_s), p = softmax(x · anchorsᵀ / τ) over the anchors
    (arguments as :func:`similarity_logits`)."""
    logits = similarity_logits(student, teacher, anchors, tau_s, tau_t, extra_anchors, extra_mask)
    return distillation_kl(*logits)


@in_fp32
def info_nce(
    query: torch.Tensor,
    positives: torch.Tensor,
    queue: torch.Tensor,
    tau: float,
    negative_mask: torch.Tensor | None = None,
    positive_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """InfoNCE with a queue of negatives, optionally with several positives per query (SePP).

    query [B, d]; positives [B, P, d] or [B, d] (P = 1); queue [K, d]. Multi-positive form (Khosla et
    al.): L = −1/P Σ_p log(exp(q·k_p/τ) / Σ_c exp(q·c/τ)), c running over all P positives and the queue;
    with P = 1 this is MoCo's loss. ``negative_mask`` [B, K] drops queue entries from a query's
    candidates (True = drop); ``positive_mask`` [B, P] keeps only the positives that are True (each row
    needs at least one), so P counts a row's kept positives.
    """
    if positives.dim() == 2:
        positives = positives.unsqueeze(1)
    positives, queue = positives.detach(), queue.detach()
    pos_logits = torch.einsum("bd,bpd->bp", query, positives) / tau
    neg_logits = query @ queue.T / tau
    if negative_mask is not None:
        neg_logits = neg_logits.masked_fill(negative_mask, float("-inf"))
    if positive_mask is None:
        positive_mask = torch.ones_like(pos_logits, dtype=torch.bool)
    candidates = torch.cat([pos_logits.masked_fill(~positive_mask, float("-inf")), neg_logits], dim=1)
    log_prob = pos_logits - torch.logsumexp(candidates, dim=1, keepdim=True)
    kept = positive_mask.to(log_prob.dtype)
    return -((log_prob * kept).sum(dim=1) / kept.sum(dim=1)).mean()


@in_fp32
def normalized_mse(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """BYOL loss: mean over the batch of ‖p̂ − ẑ‖² = 2 − 2·cos(p, z), target detached."""
    p = F.normalize(prediction, dim=1)
    z = F.normalize(target.detach(), dim=1)
    return (2 - 2 * (p * z).sum(dim=1)).mean()


def byol_loss(
    pred_a: torch.Tensor, pred_b: torch.Tensor, target_a: torch.Tensor, target_b: torch.Tensor
) -> torch.Tensor:
    """BYOL's symmetrised loss as in the paper, L + L̃ (a sum, not a mean): the prediction of view a
    against the target of view b, plus the prediction of b against the target of a."""
    return normalized_mse(pred_a, target_b) + normalized_mse(pred_b, target_a)


@in_fp32
def dino_cross_entropy(
    student: torch.Tensor, teacher: torch.Tensor, center: torch.Tensor, tau_s: float, tau_t: float
) -> torch.Tensor:
    """DINO loss for one (student view, teacher view) pair: mean over the batch of
    H(softmax((t − c)/τ_t), softmax(s/τ_s)) = −Σ_k p_t,k log p_s,k.

    student [B, K] logits (gradient flows), teacher [B, K] logits (detached here), center [1, K].
    """
    p_t = F.softmax((teacher.detach() - center) / tau_t, dim=1)
    return -(p_t * F.log_softmax(student / tau_s, dim=1)).sum(dim=1).mean()


@in_fp32
def dino_multicrop_loss(
    student: Sequence[torch.Tensor],
    teacher: Sequence[torch.Tensor],
    center: torch.Tensor,
    tau_s: float,
    tau_t: float,
) -> torch.Tensor:
    """DINO's multi-crop loss: the mean of :func:`dino_cross_entropy` over every (teacher view t,
    student view v) pair with v ≠ t.

    student: V logits [B, K], the global views first, then the local crops; teacher: the T global
    views' logits [B, K] (T = 2), student view t being the same crop as teacher view t; center [1, K].
    With only the two global views this is ½ [H(t₁, s₀) + H(t₀, s₁)], the symmetric two-view loss.
    Each softmax is computed once per view, as each pair's term would compute it.
    """
    p_t = [F.softmax((t.detach() - center) / tau_t, dim=1) for t in teacher]
    log_p_s = [F.log_softmax(s / tau_s, dim=1) for s in student]
    terms = [
        -(p * log_q).sum(dim=1).mean() for t, p in enumerate(p_t) for v, log_q in enumerate(log_p_s) if v != t
    ]
    return sum(terms[1:], terms[0]) / len(terms)
