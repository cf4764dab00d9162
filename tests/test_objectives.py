"""Each objective against its formula, written out independently in NumPy (float64)."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from isdretrieve.train.objectives import (
    dino_cross_entropy,
    dino_multicrop_loss,
    info_nce,
    normalized_mse,
    similarity_distillation,
)


def _unit(rows, dim, seed):
    x = np.random.default_rng(seed).normal(size=(rows, dim))
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _softmax(z):
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def test_similarity_distillation_is_mean_kl_teacher_to_student():
    s, t, q = _unit(5, 8, 0), _unit(5, 8, 1), _unit(30, 8, 2)
    tau_s, tau_t = 0.1, 0.01
    p_s, p_t = _softmax(s @ q.T / tau_s), _softmax(t @ q.T / tau_t)
    expected = np.mean(np.sum(p_t * (np.log(p_t) - np.log(p_s)), axis=1))
    got = similarity_distillation(*(torch.tensor(a) for a in (s, t, q)), tau_s, tau_t)
    assert np.isclose(got.item(), expected, rtol=1e-9, atol=1e-12)


def test_similarity_distillation_gradient_reaches_only_the_student():
    s, t, q = (torch.tensor(_unit(4, 6, i), requires_grad=True) for i in range(3))
    similarity_distillation(s, t, q, 0.02, 0.02).backward()
    assert s.grad is not None and s.grad.abs().sum() > 0
    assert t.grad is None and q.grad is None


def test_similarity_distillation_is_zero_when_student_equals_teacher():
    x, q = torch.tensor(_unit(4, 6, 0)), torch.tensor(_unit(20, 6, 1))
    assert similarity_distillation(x, x, q, 0.05, 0.05).abs().item() < 1e-12


def test_info_nce_single_positive_is_moco_cross_entropy():
    qv, k, queue = _unit(6, 8, 0), _unit(6, 8, 1), _unit(40, 8, 2)
    tau = 0.2
    logits = np.concatenate([np.sum(qv * k, axis=1, keepdims=True), qv @ queue.T], axis=1) / tau
    expected = np.mean(-np.log(_softmax(logits)[:, 0]))
    got = info_nce(torch.tensor(qv), torch.tensor(k), torch.tensor(queue), tau)
    assert np.isclose(got.item(), expected, rtol=1e-9)


def test_info_nce_multi_positive_with_mask_matches_formula():
    qv, pos, queue = _unit(3, 5, 0), _unit(6, 5, 1).reshape(3, 2, 5), _unit(10, 5, 2)
    mask = np.zeros((3, 10), dtype=bool)
    mask[0, [1, 4]] = True
    mask[2, 9] = True
    tau = 0.1
    expected = 0.0
    for b in range(3):
        candidates = [pos[b, 0], pos[b, 1]] + [queue[j] for j in range(10) if not mask[b, j]]
        denom = sum(np.exp(qv[b] @ c / tau) for c in candidates)
        expected += -np.mean([np.log(np.exp(qv[b] @ pos[b, p] / tau) / denom) for p in range(2)])
    expected /= 3
    got = info_nce(torch.tensor(qv), torch.tensor(pos), torch.tensor(queue), tau, torch.tensor(mask))
    assert np.isclose(got.item(), expected, rtol=1e-9)


def test_info_nce_positive_mask_drops_a_positive_from_numerator_and_denominator():
    qv, pos, queue = _unit(3, 5, 3), _unit(6, 5, 4).reshape(3, 2, 5), _unit(10, 5, 5)
    keep = np.array([[True, True], [True, False], [True, False]])
    tau = 0.2
    expected = 0.0
    for b in range(3):
        kept = [pos[b, p] for p in range(2) if keep[b, p]]
        denom = sum(np.exp(qv[b] @ c / tau) for c in kept + list(queue))
        expected += -np.mean([np.log(np.exp(qv[b] @ c / tau) / denom) for c in kept])
    expected /= 3
    args = (torch.tensor(qv), torch.tensor(pos), torch.tensor(queue), tau)
    got = info_nce(*args, positive_mask=torch.tensor(keep))
    assert np.isclose(got.item(), expected, rtol=1e-9)
    # a row whose second positive is dropped scores exactly as MoCo's single-positive loss
    single = info_nce(args[0][1:2], args[1][1:2, 0], args[2], tau)
    alone = info_nce(args[0][1:2], args[1][1:2], args[2], tau, positive_mask=torch.tensor(keep[1:2]))
    assert torch.isclose(single, alone, rtol=1e-12)


def test_similarity_distillation_extra_anchor_per_sample_matches_formula():
    s, t, q, extra = _unit(4, 8, 0), _unit(4, 8, 1), _unit(30, 8, 2), _unit(4, 8, 3)
    keep = np.array([True, False, True, True])
    tau_s, tau_t = 0.1, 0.02
    expected = 0.0
    for b in range(4):
        anchors = np.concatenate([q, extra[b : b + 1]]) if keep[b] else q
        p_s = _softmax((s[b] @ anchors.T / tau_s)[None])[0]
        p_t = _softmax((t[b] @ anchors.T / tau_t)[None])[0]
        expected += np.sum(p_t * (np.log(p_t) - np.log(p_s)))
    expected /= 4
    got = similarity_distillation(
        *(torch.tensor(a) for a in (s, t, q)),
        tau_s,
        tau_t,
        extra_anchors=torch.tensor(extra).unsqueeze(1),
        extra_mask=torch.tensor(keep).unsqueeze(1),
    )
    assert np.isclose(got.item(), expected, rtol=1e-9, atol=1e-12)


def test_normalized_mse_is_two_minus_two_cosine():
    p, z = np.random.default_rng(0).normal(size=(2, 7, 16))
    cos = np.sum(p * z, axis=1) / (np.linalg.norm(p, axis=1) * np.linalg.norm(z, axis=1))
    got = normalized_mse(torch.tensor(p), torch.tensor(z))
    assert np.isclose(got.item(), np.mean(2 - 2 * cos), rtol=1e-9)
    # unnormalised inputs give the same loss as their unit versions
    assert torch.isclose(got, normalized_mse(F.normalize(torch.tensor(p)), torch.tensor(z) * 3.0))


def _clustered(rows, dim, seed, centres):
    """Unit rows around ``centres``: near neighbours at cosine ≈ 0.8, as a trained encoder gives."""
    g = torch.Generator().manual_seed(seed)
    picks = centres[torch.randint(0, len(centres), (rows,), generator=g)]
    return F.normalize(picks + 0.5 * torch.randn(rows, dim, generator=g) / dim**0.5, dim=1)


_CUDA = pytest.param(
    "cuda",
    marks=[pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")],
)


def _dino_logits(views, seed):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(6, 20, generator=g, dtype=torch.float64) * 3 for _ in range(views)]


def test_dino_multicrop_is_the_mean_over_teacher_student_pairs_of_different_views():
    """2 global + 3 local views: the mean of H(teacher t, student v) over the 2 x 5 - 2 = 8 pairs v ≠ t,
    each written out in NumPy; the gradient reaches the student only."""
    student = [s.requires_grad_() for s in _dino_logits(5, 0)]
    teacher = [t.requires_grad_() for t in _dino_logits(2, 1)]
    center = torch.randn(1, 20, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    tau_s, tau_t = 0.1, 0.04
    loss = dino_multicrop_loss(student, teacher, center, tau_s, tau_t)
    terms = []
    for t, teacher_logits in enumerate(teacher):
        p_t = _softmax((teacher_logits.detach().numpy() - center.numpy()) / tau_t)
        for v, student_logits in enumerate(student):
            if v != t:
                log_p_s = np.log(_softmax(student_logits.detach().numpy() / tau_s))
                terms.append(np.mean(-np.sum(p_t * log_p_s, axis=1)))
    assert len(terms) == 8
    assert np.isclose(loss.item(), np.mean(terms), rtol=1e-10, atol=0)
    loss.backward()
    assert all(s.grad is not None and s.grad.abs().sum() > 0 for s in student)
    assert all(t.grad is None for t in teacher)


def test_dino_multicrop_without_local_crops_is_the_two_view_loss_exactly():
    """Bit for bit the symmetric form DINO used before multi-crop: ½ [H(t_b, s_a) + H(t_a, s_b)]."""
    for dtype in (torch.float32, torch.float64):
        (s_a, s_b), (t_a, t_b) = ([x.to(dtype) for x in _dino_logits(2, seed)] for seed in (3, 4))
        center = torch.randn(1, 20, generator=torch.Generator().manual_seed(5)).to(dtype)
        two_view = (
            dino_cross_entropy(s_a, t_b, center, 0.1, 0.04) + dino_cross_entropy(s_b, t_a, center, 0.1, 0.04)
        ) / 2
        assert torch.equal(dino_multicrop_loss([s_a, s_b], [t_a, t_b], center, 0.1, 0.04), two_view)


@pytest.mark.parametrize("device", ["cpu", _CUDA])
def test_objectives_compute_in_fp32_under_bf16_autocast(device):
    """bf16 inputs under bf16 autocast (as on a GPU) give the loss and gradient of fp32 math on the same
    values: the similarity logits are not rounded to bf16 (at τ = 0.02 that left ISD's gradient a cosine
    of ~0.5–0.8 with the fp32 one)."""
    centres = F.normalize(torch.randn(10, 128, generator=torch.Generator().manual_seed(0)), dim=1)
    t, anchors = _clustered(64, 128, 1, centres), _clustered(4096, 128, 2, centres)
    s = F.normalize(t + 0.5 * torch.randn(64, 128, generator=torch.Generator().manual_seed(3)) / 128**0.5)
    s, t, anchors = s.bfloat16().to(device), t.bfloat16().to(device), anchors.to(device)  # as bf16 layers
    scores_s, scores_t = (((x.float() @ anchors[:256].T) * 5).bfloat16() for x in (s, t))  # a bf16 head
    center = torch.zeros(1, 256, device=device)

    def loss_and_grad(fn, x, y, autocast):
        leaf = x.clone().requires_grad_()
        with torch.autocast(device, dtype=torch.bfloat16, enabled=autocast):
            loss = fn(leaf, y)
        loss.backward()
        return loss, leaf.grad.float()

    cases = {
        "isd": (s, t, lambda x, y: similarity_distillation(x, y, anchors, 0.02, 0.02)),
        "info_nce": (s, t, lambda x, y: info_nce(x, y, anchors, 0.2)),
        "byol": (s, t, normalized_mse),
        "dino": (scores_s, scores_t, lambda x, y: dino_cross_entropy(x, y, center, 0.1, 0.04)),
        "dino_multicrop": (
            scores_s,
            scores_t,
            lambda x, y: dino_multicrop_loss([x, x.flip(0), x.roll(1, 0)], [y, y.flip(0)], center, 0.1, 0.04),
        ),
    }
    for name, (x, y, fn) in cases.items():
        loss, grad = loss_and_grad(fn, x, y, autocast=True)
        ref_loss, ref_grad = loss_and_grad(fn, x.float(), y.float(), autocast=False)
        assert loss.dtype == torch.float32, name
        torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-7, msg=name)
        cosine = F.cosine_similarity(grad.flatten(), ref_grad.flatten(), dim=0)
        assert cosine > 0.9999, (name, cosine)
