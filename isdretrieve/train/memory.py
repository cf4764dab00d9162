"""Memories of teacher embeddings: a FIFO queue (ISD, MoCo) shared by every method that needs one."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class EmbeddingQueue(nn.Module):
    """Ring buffer of K embeddings [K, d] with the dataset index of each row (−1 while still random).

    Callers push the *global* batch (all ranks gathered), so every process holds the same queue.
    """

    def __init__(self, size: int, dim: int, generator: torch.Generator | None = None) -> None:
        super().__init__()
        init = F.normalize(torch.randn(size, dim, generator=generator), dim=1)
        self.register_buffer("embeddings", init)
        self.register_buffer("indices", torch.full((size,), -1, dtype=torch.long))
        self.register_buffer("ptr", torch.zeros((), dtype=torch.long))

    @property
    def size(self) -> int:
        return self.embeddings.shape[0]

    @torch.no_grad()
    def push(self, embeddings: torch.Tensor, indices: torch.Tensor) -> None:
        """Write a batch at the pointer (wrapping around) and advance it."""
        n = embeddings.shape[0]
        if n > self.size:
            embeddings, indices, n = embeddings[-self.size :], indices[-self.size :], self.size
        rows = (self.ptr + torch.arange(n, device=self.ptr.device)) % self.size
        self.embeddings[rows] = embeddings.detach().to(self.embeddings.dtype)
        self.indices[rows] = indices.to(self.indices.device)
        self.ptr.copy_((self.ptr + n) % self.size)

    def snapshot(self) -> torch.Tensor:
        """A detached copy to compute a loss against, safe to keep across the next ``push``."""
        return self.embeddings.clone()
