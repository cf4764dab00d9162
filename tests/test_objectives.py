"""Each objective against its formula, written out independently in NumPy (float64)."""

import numpy as np
import torch
import torch.nn.functional as F

from isdretrieve.train.objectives import info_nce, normalized_mse, similarity_distillation


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
