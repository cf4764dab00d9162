"""Small operations on FAISS indices: make one from a factory string, find its search knob, set it, move
it to a GPU, read it from disk, search a subset of rows through an ID selector, and turn FAISS's C++
errors into one line."""

from __future__ import annotations

import re
from pathlib import Path

import faiss
import numpy as np

from isdretrieve.errors import IsdError
from isdretrieve.files.bank import FeatureBank
from isdretrieve.index.backend import widen_for_filter
from isdretrieve.index.exact import bank_exact_search, faiss_has_gpu, gpu_resources
from isdretrieve.index.ondisk import is_ondisk

EF_SEARCH = (16, 32, 64, 128, 256, 512, 1024, 2048)


def faiss_message(exc: BaseException) -> str:
    """The useful part of a FAISS C++ error, on one line."""
    text = str(exc).strip()
    match = re.search(r"failed: (.*)", text) or re.search(r"Error: (.*)", text)
    lines = (match.group(1) if match else text).strip().splitlines()
    return lines[0] if lines else type(exc).__name__


def make_index(factory: str, dim: int) -> faiss.Index:
    """``faiss.index_factory`` with the inner-product metric; a bad string is an IsdError."""
    try:
        return faiss.index_factory(dim, factory, faiss.METRIC_INNER_PRODUCT)
    except RuntimeError as exc:
        raise IsdError(f"invalid index factory {factory!r}: {faiss_message(exc)}") from exc


def innermost(index: faiss.Index) -> faiss.Index:
    """The index under pre-transforms and refinement wrappers."""
    index = faiss.downcast_index(index)
    while isinstance(index, faiss.IndexPreTransform | faiss.IndexRefine):
        inner = index.index if isinstance(index, faiss.IndexPreTransform) else index.base_index
        index = faiss.downcast_index(inner)
    return index


def is_exact(index: faiss.Index) -> bool:
    """Whether ``index`` is a flat (exact) index."""
    return isinstance(faiss.downcast_index(index), faiss.IndexFlat)


def search_knob(index: faiss.Index) -> tuple[str, list[int]] | None:
    """The parameter that trades speed for recall, with the values to try, or None."""
    try:
        lists = faiss.extract_index_ivf(index).nlist
    except RuntimeError:
        lists = 0
    if lists:
        return "nprobe", sorted({min(2**i, lists) for i in range(lists.bit_length() + 1)})
    if isinstance(innermost(index), faiss.IndexHNSW):
        return "efSearch", list(EF_SEARCH)
    return None


def set_params(index: faiss.Index, params: dict[str, int], gpu: bool) -> None:
    """Set search parameters such as ``{"nprobe": 16}`` on a CPU or GPU index."""
    space = faiss.GpuParameterSpace() if gpu else faiss.ParameterSpace()
    for name, value in params.items():
        space.set_index_parameter(index, name, value)


def to_gpu(index: faiss.Index) -> faiss.Index | None:
    """A GPU copy of a Flat/IVF index when GPU FAISS is usable, else None (HNSW and on-disk lists stay
    on the CPU)."""
    if not faiss_has_gpu() or isinstance(innermost(index), faiss.IndexHNSW) or is_ondisk(index):
        return None
    try:
        return faiss.index_cpu_to_gpu(gpu_resources(), 0, index)
    except RuntimeError:  # a layout the GPU does not support (e.g. some PQ sizes)
        return None


def read_index(path: Path) -> faiss.Index:
    """``index.faiss`` read into memory; an unreadable file is an IsdError."""
    try:
        return faiss.read_index(str(path))
    except RuntimeError as exc:
        raise IsdError(f"cannot read FAISS index {path}: {faiss_message(exc)}") from exc


def selector_params(
    index: faiss.Index, selector: faiss.IDSelector, params: dict[str, int], passing: float
) -> faiss.SearchParameters:
    """Search parameters carrying ``selector`` and the index's tuned knob widened for the fraction of
    rows ``passing`` the filter (:func:`~isdretrieve.index.backend.widen_for_filter`). A parameters
    object replaces the index's own settings for that search, so the knob is always set."""
    try:
        ivf = faiss.extract_index_ivf(index)
    except RuntimeError:
        ivf = None
    if ivf is not None:
        nprobe = widen_for_filter("nprobe", int(params.get("nprobe", ivf.nprobe)), passing, ivf.nlist)
        return faiss.SearchParametersIVF(sel=selector, nprobe=nprobe)
    inner = innermost(index)
    if isinstance(inner, faiss.IndexHNSW):
        ef = int(params.get("efSearch", inner.hnsw.efSearch))
        return faiss.SearchParametersHNSW(
            sel=selector, efSearch=widen_for_filter("ef", ef, passing, index.ntotal)
        )
    return faiss.SearchParameters(sel=selector)


def search_selected(
    index: faiss.Index,
    x: np.ndarray,
    k: int,
    allowed: np.ndarray,
    params: dict[str, int],
    bank: FeatureBank,
) -> tuple[np.ndarray, np.ndarray]:
    """Top-k of the unit queries ``x`` among the bank rows ``allowed`` (sorted int64) through ``index``.

    Flat, IVF (in RAM or on disk) and HNSW indices take FAISS's ID selector, so the approximate search is
    the same one, restricted, with its knob widened (:func:`selector_params`); a query for which it still
    finds fewer hits than the allowed rows could give, and every query of an index type that refuses a
    selector (a refinement wrapper), is searched exactly over the allowed rows. Only when fewer than k
    rows pass do lists end in row -1.
    """
    passing = len(allowed) / max(index.ntotal, 1)
    selector = faiss.IDSelectorBatch(allowed)
    try:
        scores, rows = index.search(x, k, params=selector_params(index, selector, params, passing))
    except RuntimeError:
        return bank_exact_search(bank, x, k, allowed)
    scores, rows = scores.astype(np.float32, copy=False), rows.astype(np.int64, copy=False)
    short = (rows >= 0).sum(axis=1) < min(k, len(allowed))
    if short.any():
        scores[short], rows[short] = bank_exact_search(bank, x[short], k, allowed)
    return scores, rows
