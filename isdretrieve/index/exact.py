"""Exact inner-product search: FAISS brute force on the CPU, GPU FAISS or a torch GEMM on CUDA, and a
bank streamed block by block. It is the ground truth every approximate index is measured against."""

from __future__ import annotations

import os
import sys
from typing import TYPE_CHECKING, Any

import faiss
import numpy as np

from isdretrieve.errors import IsdError
from isdretrieve.files.bank import FeatureBank

if TYPE_CHECKING:
    import torch  # imported only on the CUDA paths: searching on a CPU needs FAISS and NumPy alone

GPU_MAX_K = 2048  # FAISS GPU selection limit for k and nprobe


def cuda_available() -> bool:
    """Whether torch sees a CUDA device; on a Linux machine without an NVIDIA driver, answered without
    importing torch (an import costs a CPU-only ``isd-knn`` about a second and most of its memory)."""
    if "torch" not in sys.modules and sys.platform.startswith("linux"):
        if not any(os.path.exists(p) for p in ("/proc/driver/nvidia", "/dev/nvidiactl", "/dev/dxg")):
            return False
    import torch

    return torch.cuda.is_available()


def faiss_has_gpu() -> bool:
    """True when the installed FAISS has GPU support and sees at least one GPU."""
    return hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0


_gpu_resources: Any = None


def gpu_resources() -> Any:
    """FAISS's GPU resources, made once per process."""
    global _gpu_resources
    if _gpu_resources is None:
        _gpu_resources = faiss.StandardGpuResources()
    return _gpu_resources


def exact_search_torch(
    bank_features: torch.Tensor, queries: torch.Tensor, k: int, *, chunk: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Exact inner-product top-k with chunked fp32 matmul + ``topk`` on the bank tensor's device.

    ``chunk`` query rows are scored at a time (default: enough for a 2^28-element score block).
    """
    import torch

    bank = bank_features.to(torch.float32)
    queries = queries.to(bank.device, torch.float32)
    chunk = chunk or max(1, (1 << 28) // max(1, bank.shape[0]))
    precision = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")  # no TF32: this is ground truth
    try:
        with torch.no_grad():
            parts = [
                torch.topk(queries[s : s + chunk] @ bank.T, k, dim=1) for s in range(0, len(queries), chunk)
            ]
    finally:
        torch.set_float32_matmul_precision(precision)
    scores = torch.cat([p.values for p in parts]) if parts else torch.zeros(0, k)
    rows = torch.cat([p.indices for p in parts]) if parts else torch.zeros(0, k, dtype=torch.int64)
    return scores.cpu().numpy().astype(np.float32), rows.cpu().numpy().astype(np.int64)


def exact_search(
    bank_features: np.ndarray | torch.Tensor,
    queries: np.ndarray | torch.Tensor,
    k: int,
    *,
    device: str = "auto",
    chunk: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Exact inner-product top-k: (scores [Q,k] float32, rows [Q,k] int64 into ``bank_features``).

    ``device`` "auto" means CUDA when torch sees one. On CUDA: GPU FAISS when installed (and k <= 2048),
    else :func:`exact_search_torch`. On the CPU: FAISS's brute-force ``knn`` (BLAS).
    """
    if not 1 <= k <= len(bank_features):
        raise IsdError(f"k must be between 1 and {len(bank_features)} (the number of bank rows), got {k}")
    cuda = cuda_available() if device == "auto" else str(device).split(":")[0] == "cuda"
    if cuda and not (faiss_has_gpu() and k <= GPU_MAX_K):
        import torch

        return exact_search_torch(
            torch.as_tensor(bank_features, device="cuda"), torch.as_tensor(queries), k, chunk=chunk
        )
    xb, xq = as_float32(bank_features), as_float32(queries)
    if cuda:
        scores, rows = faiss.knn_gpu(gpu_resources(), xq, xb, k, metric=faiss.METRIC_INNER_PRODUCT)
    else:
        scores, rows = faiss.knn(xq, xb, k, metric=faiss.METRIC_INNER_PRODUCT)
    return scores.astype(np.float32, copy=False), rows.astype(np.int64, copy=False)


def as_float32(x: np.ndarray | torch.Tensor) -> np.ndarray:
    """A NumPy array or a tensor as a C-contiguous float32 array (torch is not imported for arrays)."""
    torch = sys.modules.get("torch")  # without torch imported, x cannot be a tensor
    if torch is not None and isinstance(x, torch.Tensor):
        x = x.detach().cpu().to(torch.float32).numpy()
    return np.ascontiguousarray(x, dtype=np.float32)


def bank_exact_search(
    bank: FeatureBank, queries: np.ndarray, k: int, allowed: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-k over the whole bank (or only its sorted rows ``allowed``), one block at a time, keeping
    the best k seen so far; fewer rows than k leave the last hits missing (row -1)."""
    scores = np.full((len(queries), k), -np.inf, dtype=np.float32)
    rows = np.full((len(queries), k), -1, dtype=np.int64)
    for start, x in bank.blocks():
        ids = np.arange(start, start + len(x))
        if allowed is not None:
            ids = allowed[(allowed >= start) & (allowed < start + len(x))]
            x = x[ids - start]
        if not len(ids):
            continue
        s, r = exact_search(x, queries, min(k, len(x)))
        scores, rows = np.concatenate([scores, s], axis=1), np.concatenate([rows, ids[r]], axis=1)
        best = np.argsort(-scores, axis=1, kind="stable")[:, :k]
        scores, rows = np.take_along_axis(scores, best, 1), np.take_along_axis(rows, best, 1)
    return scores, rows
