"""Dataset-indexed neighbour memory for methods that pick partner images (AdaSim).

The pieces, one job each:

- ``IndexedMemory``: one L2-normalised embedding per dataset image, rewritten whenever the image is seen.
- ``topk_neighbours``: cosine top-k of queries against the memory, in chunks of rows.
- ``NeighbourLists``: every image's latest top-k list (int32 indices, fp16 similarities; −1 = absent).
- ``NeighbourHistory``: a ring of the last W epochs' lists.
- ``window_average`` / ``select_partners`` / ``nearest_other``: AdaSim's selection rule, vectorised.
- ``self_retrieval_rate`` / ``label_precision`` / ``feature_std``: diagnostics (labels only for logging).
"""

from __future__ import annotations

import torch
from torch import nn

ABSENT = -1  # the index of an empty neighbour slot


class IndexedMemory(nn.Module):
    """Embeddings [N, d] indexed by dataset index; ``written`` marks rows that hold one."""

    def __init__(self, num_images: int, dim: int) -> None:
        super().__init__()
        self.register_buffer("embeddings", torch.zeros(num_images, dim))
        self.register_buffer("written", torch.zeros(num_images, dtype=torch.bool))

    @torch.no_grad()
    def write(self, indices: torch.Tensor, embeddings: torch.Tensor) -> None:
        self.embeddings[indices] = embeddings.to(self.embeddings.dtype)
        self.written.index_fill_(0, indices, True)

    def search(self, queries: torch.Tensor, k: int, chunk: int = 65536) -> tuple[torch.Tensor, torch.Tensor]:
        """Top-k over the written rows (see ``topk_neighbours``)."""
        return topk_neighbours(queries, self.embeddings, k, self.written, chunk)


@torch.no_grad()
def topk_neighbours(
    queries: torch.Tensor, bank: torch.Tensor, k: int, valid: torch.Tensor | None = None, chunk: int = 65536
) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices [b, k] (long, −1 where fewer than k valid rows) and similarities [b, k] (fp32, best
    first) of ``queries`` [b, d] against ``bank`` [N, d], in fp32 and ``chunk`` bank rows at a time."""
    queries = queries.float()
    best_sim = queries.new_full((queries.shape[0], 0), float("-inf"))
    best_idx = torch.empty((queries.shape[0], 0), dtype=torch.long, device=queries.device)
    with torch.autocast(queries.device.type, enabled=False):
        for start in range(0, bank.shape[0], chunk):
            sims = queries @ bank[start : start + chunk].float().T
            if valid is not None:
                sims = sims.masked_fill(~valid[start : start + chunk], float("-inf"))
            sim, idx = sims.topk(min(k, sims.shape[1]), dim=1)
            merged_sim, pos = torch.cat([best_sim, sim], dim=1).topk(
                min(k, best_sim.shape[1] + sim.shape[1]), dim=1
            )
            best_idx = torch.cat([best_idx, idx + start], dim=1).gather(1, pos)
            best_sim = merged_sim
    pad = k - best_sim.shape[1]
    if pad > 0:
        best_sim = torch.cat([best_sim, best_sim.new_full((best_sim.shape[0], pad), float("-inf"))], dim=1)
        best_idx = torch.cat([best_idx, best_idx.new_full((best_idx.shape[0], pad), ABSENT)], dim=1)
    best_idx = best_idx.masked_fill(best_sim == float("-inf"), ABSENT)
    return best_idx, best_sim.masked_fill(best_idx == ABSENT, 0.0)


class NeighbourLists(nn.Module):
    """Each image's latest top-k neighbour list: indices [N, k] int32 (−1 absent), sims [N, k] fp16."""

    def __init__(self, num_images: int, k: int) -> None:
        super().__init__()
        self.register_buffer("indices", torch.full((num_images, k), ABSENT, dtype=torch.int32))
        self.register_buffer("sims", torch.zeros(num_images, k, dtype=torch.float16))

    @torch.no_grad()
    def write(self, rows: torch.Tensor, indices: torch.Tensor, sims: torch.Tensor) -> None:
        self.indices[rows] = indices.to(torch.int32)
        self.sims[rows] = sims.to(torch.float16)


class NeighbourHistory(nn.Module):
    """The neighbour lists of the last ``window`` epochs, a ring [N, W, k] (int32 / fp16) filled by
    ``push`` once per epoch; ``count`` is the number of epochs pushed so far."""

    def __init__(self, num_images: int, window: int, k: int) -> None:
        super().__init__()
        self.register_buffer("indices", torch.full((num_images, window, k), ABSENT, dtype=torch.int32))
        self.register_buffer("sims", torch.zeros(num_images, window, k, dtype=torch.float16))
        self.register_buffer("count", torch.zeros((), dtype=torch.long))

    @property
    def window(self) -> int:
        return self.indices.shape[1]

    @property
    def full(self) -> bool:
        return int(self.count) >= self.window

    @torch.no_grad()
    def push(self, lists: NeighbourLists) -> None:
        """Store this epoch's lists in the oldest slot."""
        slot = int(self.count) % self.window
        self.indices[:, slot] = lists.indices
        self.sims[:, slot] = lists.sims
        self.count += 1

    def latest(self) -> torch.Tensor:
        """Indices [N, k] of the newest epoch (all −1 before the first push)."""
        return self.indices[:, (int(self.count) - 1) % self.window]

    def flat(self, rows: slice) -> tuple[torch.Tensor, torch.Tensor]:
        """Indices and sims of ``rows`` over the whole window, [n, W·k] each."""
        idx, sims = self.indices[rows], self.sims[rows]
        return idx.flatten(1), sims.flatten(1)


def window_average(
    indices: torch.Tensor, sims: torch.Tensor, window: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """s̄_i(j) = (1/W) Σ over the window of i's similarity to j, 0 in epochs where j is not in i's list.

    indices/sims [n, M] (M = W·k, −1 = absent). Returns candidates [n, M] (long) and their scores
    [n, M]: each distinct candidate of a row scores once, every other position scores −inf.
    """
    idx, order = indices.long().sort(dim=1)
    s = sims.double().gather(1, order).masked_fill(idx == ABSENT, 0.0)
    last = torch.ones_like(idx, dtype=torch.bool)  # the last position of each run of equal indices
    last[:, :-1] = idx[:, 1:] != idx[:, :-1]
    total = s.cumsum(dim=1)
    pos = torch.arange(idx.shape[1], device=idx.device).expand_as(idx)
    ends = torch.where(last, pos, -1)  # the previous run ends at the latest 'last' strictly before
    prev = torch.cat([ends.new_full((idx.shape[0], 1), -1), ends[:, :-1]], dim=1).cummax(dim=1).values
    before = torch.where(prev >= 0, total.gather(1, prev.clamp(min=0)), 0.0)
    scores = ((total - before) / window).float()
    return idx, scores.masked_fill(~last | (idx == ABSENT), float("-inf"))


def select_partners(
    own: torch.Tensor,
    candidates: torch.Tensor,
    scores: torch.Tensor,
    k: int,
    tau: float,
    uniform: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """AdaSim's rule: among the k best-scoring candidates (self included), sample the partner from
    softmax(score/τ) if the image itself scores best, else keep the image itself.

    own [n] dataset indices; candidates/scores [n, M] as ``window_average`` returns them; ``uniform``
    [n, k] draws in (0, 1) (Gumbel-max sampling). Returns partners [n] (long) and the gate [n] (bool).
    """
    top, pos = scores.topk(min(k, scores.shape[1]), dim=1)
    cand = candidates.gather(1, pos)
    best = top[:, :1]
    gate = ((cand == own[:, None]) & (top == best) & torch.isfinite(best)).any(dim=1)
    logits = (top - best) / tau  # −inf for padding stays −inf
    gumbel = -torch.log(-torch.log(uniform[:, : top.shape[1]].clamp(1e-12, 1 - 1e-7)))
    choice = torch.where(torch.isfinite(top), logits + gumbel, float("-inf")).argmax(dim=1, keepdim=True)
    return torch.where(gate, cand.gather(1, choice).squeeze(1), own), gate


def nearest_other(own: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """The first entry of each list [n, k] that is neither the image itself nor absent; itself if none."""
    indices = indices.long()
    other = (indices != own[:, None]) & (indices != ABSENT)
    first = other.int().argmax(dim=1, keepdim=True)  # the first True (0 when there is none)
    return torch.where(other.any(dim=1), indices.gather(1, first).squeeze(1), own)


def self_retrieval_rate(indices: torch.Tensor) -> float | None:
    """Fraction of images with a list whose top-1 neighbour is the image itself."""
    has = indices[:, 0] != ABSENT
    own = torch.arange(indices.shape[0], device=indices.device)
    return (indices[has, 0].long() == own[has]).float().mean().item() if has.any() else None


def label_precision(indices: torch.Tensor, labels: torch.Tensor) -> float | None:
    """Fraction of images whose nearest other neighbour shares their label (unknown labels skipped)."""
    own = torch.arange(indices.shape[0], device=indices.device)
    other = nearest_other(own, indices)
    labels = labels.to(indices.device)
    keep = (other != own) & (labels >= 0) & (labels[other] >= 0)
    return (labels[other] == labels)[keep].float().mean().item() if keep.any() else None


def feature_std(memory: IndexedMemory) -> float | None:
    """Per-dimension std of the written (unit) rows, averaged: ≈ 1/sqrt(d) when spread, → 0 at collapse."""
    rows = memory.embeddings[memory.written]
    return rows.float().std(dim=0).mean().item() if rows.shape[0] > 1 else None
