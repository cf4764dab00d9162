"""Semantic-positive mining: each bank row's nearest other rows, kept above a similarity threshold.

The design is ours (SePP's paper does not publish its mining settings): exact cosine top-k of every row
against the whole bank, self excluded; optionally only mutual neighbours; then a threshold, given as a
similarity or as a quantile of all candidates' similarities. Labels are never used to choose pairs.

The file's layout and attributes: :mod:`isdretrieve.files.pairs`.

Exact search is the default. ``index=`` searches through a built index instead, for banks where exact
search is too slow; its recall is measured and recorded, and rows for which the index returns fewer
than k + 1 hits are searched exactly. A bank with k or fewer rows lowers k to its size - 1, with a warning.

The search is resumable: the top-k lists go to ``OUT.partial`` chunk by chunk (``rows_done`` advances
after each flushed chunk); a rerun continues there. ``pairs.h5`` itself is written atomically at the end,
so it never exists half-written. No N×N matrix is ever held: queries go ``chunk_rows`` at a time.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from dataclasses import asdict, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from isdretrieve.errors import BankError, IsdError
from isdretrieve.files.atomic import atomic_path, names_file
from isdretrieve.files.bank import FeatureBank
from isdretrieve.files.h5 import attr_value
from isdretrieve.files.pairs import MiningParams, Pairs, write_pairs
from isdretrieve.index.backend import VectorIndex, clamp_k
from isdretrieve.index.exact import bank_exact_search, cuda_available, exact_search, exact_search_torch
from isdretrieve.index.open import open_index
from isdretrieve.index.recall import drop_self_matches, heldout_truth, recall_at_k

PARTIAL_FORMAT = "isdretrieve.pairs-partial/1"
IN_MEMORY_BYTES = 4 << 30  # banks up to this many float32 bytes are searched from memory
DEFAULT_CHUNK_ROWS = 16384
_DELETE_HINT = "delete it or choose another --out"
RECALL_QUERIES = 1000  # rows sampled (seed 0) to measure an approximate search's recall


# ------------------------------------------------------------------------------------ filtering
def keep_mask(
    candidate_rows: np.ndarray, candidate_sims: np.ndarray, threshold: float, mutual: bool
) -> np.ndarray:
    """[N, k] True where candidate j of row i passes the threshold (and is mutual, if asked)."""
    keep = candidate_sims >= threshold
    if mutual:
        n = len(candidate_rows)
        anchors = np.repeat(np.arange(n, dtype=np.int64), candidate_rows.shape[1])
        forward = anchors * n + candidate_rows.reshape(-1)
        backward = candidate_rows.reshape(-1) * n + anchors
        keep &= np.isin(backward, forward).reshape(candidate_rows.shape)
    return keep


def resolve_threshold(params: MiningParams, candidate_sims: np.ndarray) -> float:
    if params.threshold is not None:
        return float(params.threshold)
    if params.quantile is not None and candidate_sims.size:
        return float(np.quantile(candidate_sims, params.quantile))
    return -math.inf


# --------------------------------------------------------------------------------------- search
def _searcher(bank: FeatureBank, device: str) -> Callable[[np.ndarray, int], tuple[np.ndarray, np.ndarray]]:
    """Exact top-k of query rows against the whole bank, from memory when it fits, else streamed."""
    cuda = cuda_available() if device == "auto" else device.split(":")[0] == "cuda"
    if len(bank) * bank.dim * 4 > IN_MEMORY_BYTES:
        return lambda queries, k: bank_exact_search(bank, queries, k)
    features = bank.features()
    if cuda:
        import torch  # the GPU path only: mining on a CPU needs FAISS and NumPy

        on_gpu = torch.as_tensor(features, device=device if device != "auto" else "cuda")
        return lambda queries, k: exact_search_torch(on_gpu, torch.as_tensor(queries), k)
    return lambda queries, k: exact_search(features, queries, k, device="cpu")


def _open_partial(path: Path, expect: dict[str, Any], n: int, k: int, chunk_rows: int) -> h5py.File:
    """The partial top-k file, created or reopened; a partial of another search is replaced.

    It keeps the chunk size it was started with: BLAS sums in another order for another query block,
    so a resume continues in the same blocks to end with exactly the lists of an uninterrupted run.
    """
    if path.exists():
        try:
            f = h5py.File(path, "r+")
            found = {key: attr_value(f.attrs.get(key)) for key in expect}
            if attr_value(f.attrs.get("format")) == PARTIAL_FORMAT and found == expect:
                return f
            f.close()
        except OSError:
            pass
        path.unlink()
    with atomic_path(path) as tmp, h5py.File(tmp, "w") as f:
        chunk = (max(1, min(n, 1 << 14)), k)
        f.create_dataset("rows", (n, k), dtype=np.int64, chunks=chunk)
        f.create_dataset("similarities", (n, k), dtype=np.float32, chunks=chunk)
        attrs = {"format": PARTIAL_FORMAT, **expect, "chunk_rows": chunk_rows, "rows_done": 0}
        for key, value in attrs.items():
            f.attrs[key] = value
    return h5py.File(path, "r+")


def search_candidates(
    bank: FeatureBank,
    k: int,
    partial: Path,
    *,
    device: str = "auto",
    chunk_rows: int = DEFAULT_CHUNK_ROWS,
    progress: Callable[[int, int], None] | None = None,
    index: VectorIndex | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Top-k other rows of every bank row, resumable through the file ``partial``.

    Exact by default; through ``index`` when given (rows it returns too few hits for: searched exactly).
    """
    n = len(bank)
    if k >= n:
        raise IsdError(f"k must be smaller than the number of bank rows ({n}), got {k}")
    expect = {"fingerprint": bank.fingerprint, "bank_rows": n, "k": k, "search": search_name(index)}
    search = _searcher(bank, device) if index is None else _index_searcher(bank, index, device)
    with _open_partial(partial, expect, n, k, chunk_rows) as f, names_file(partial):
        done, chunk_rows = int(f.attrs["rows_done"]), int(f.attrs["chunk_rows"])
        while done < n:
            stop = min(done + chunk_rows, n)
            sims, rows = search(bank.features(done, stop), k + 1)
            sims, rows = drop_self_matches(sims, rows, np.arange(done, stop))
            order = np.lexsort((rows, -sims), axis=-1)  # exact ties: the lower row first
            rows, sims = np.take_along_axis(rows, order, 1), np.take_along_axis(sims, order, 1)
            f["rows"][done:stop], f["similarities"][done:stop] = rows, sims
            f.flush()  # rows first, then the marker that covers them
            f.attrs.modify("rows_done", np.int64(stop))
            f.flush()
            done = stop
            if progress is not None:
                progress(done, n)
        return f["rows"][...], f["similarities"][...]


def search_name(index: VectorIndex | None) -> str:
    """How candidates are searched: "exact", or "approximate:FACTORY:PARAMS" through ``index``."""
    if index is None:
        return "exact"
    where = "" if index.backend == "faiss" else f"{index.backend}/"  # FAISS names as before
    return f"approximate:{where}{index.manifest.factory}:{json.dumps(index.manifest.params, sort_keys=True)}"


def _index_searcher(
    bank: FeatureBank, index: VectorIndex, device: str
) -> Callable[[np.ndarray, int], tuple[np.ndarray, np.ndarray]]:
    """Search through ``index``; query rows with a missing hit (row -1) are searched exactly."""
    exact = None

    def search(queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        nonlocal exact
        sims, rows = index.search(queries, k)
        short = (rows < 0).any(axis=1)
        if short.any():
            exact = exact or _searcher(bank, device)
            sims[short], rows[short] = exact(queries[short], k)
        return sims, rows

    return search


def candidate_recall(bank: FeatureBank, cand_rows: np.ndarray, seed: int = 0) -> tuple[float, int]:
    """(recall@k of ``cand_rows`` against exact search, queries) on up to 1,000 rows sampled with ``seed``."""
    k = cand_rows.shape[1]
    rows, _, truth = heldout_truth(bank, RECALL_QUERIES, seed, k)
    return recall_at_k(cand_rows[rows], truth), len(rows)


def open_index_over(index_dir: str | Path, bank: FeatureBank) -> VectorIndex:
    """The index at ``index_dir``, refused (BankError) unless it was built over ``bank``."""
    index = open_index(index_dir)
    if index.manifest.bank_fingerprint != bank.fingerprint or len(index) != len(bank):
        index.close()
        raise BankError(f"index {index_dir} was built over another bank than {bank.path}: rebuild it")
    return index


# --------------------------------------------------------------------------------------- mining
def mine_pairs(
    bank_path: str | Path,
    out: str | Path,
    params: MiningParams,
    *,
    device: str = "auto",
    chunk_rows: int = DEFAULT_CHUNK_ROWS,
    progress: Callable[[int, int], None] | None = None,
    index: str | Path | None = None,
) -> Pairs:
    """Mine positives of every row of the bank at ``bank_path`` into ``out`` (pairs.h5) and return them.

    ``index``: an index directory over the same bank to search through instead of exact search (its
    measured recall goes into the attributes). A complete ``out`` mined from the same bank with the
    same parameters and search is returned as is; any other file at ``out`` is refused. An
    interrupted search resumes from ``out.partial``.
    """
    out = Path(out)
    if chunk_rows < 1:
        raise IsdError(f"chunk_rows must be positive, got {chunk_rows}")
    partial = out.with_name(out.name + ".partial")
    with FeatureBank.open(bank_path) as bank:
        if len(bank) < 2:
            raise IsdError(f"mining needs at least 2 bank rows, the bank has {len(bank)}")
        k = clamp_k(params.k, len(bank) - 1)
        if k != params.k:
            params = replace(params, k=k)
        searcher = None if index is None else open_index_over(index, bank)
        try:
            if out.exists():
                return _existing(out, bank.fingerprint, params, search_name(searcher).split(":")[0])
            started = time.perf_counter()
            cand_rows, cand_sims = search_candidates(
                bank,
                params.k,
                partial,
                device=device,
                chunk_rows=chunk_rows,
                progress=progress,
                index=searcher,
            )
            seconds = time.perf_counter() - started
            search_attrs = _search_attrs(bank, cand_rows, searcher, index)
        finally:
            if searcher is not None:
                searcher.close()
        threshold = resolve_threshold(params, cand_sims)
        keep = keep_mask(cand_rows, cand_sims, threshold, params.mutual)
        attrs = {
            "params": json.dumps(asdict(params)),
            "threshold": threshold,
            "fingerprint": bank.fingerprint,
            "bank": str(bank_path),
            "data_spec": bank.data_spec,
            "dataset_size": bank.info.items_total or len(bank),
            "items_sha256": bank.info.items_sha256,
            "search_seconds": round(seconds, 3),
            "created": datetime.now(UTC).isoformat(timespec="seconds"),
            **search_attrs,
        }
        write_pairs(out, cand_rows, cand_sims, keep, bank.indices(), attrs)
    partial.unlink(missing_ok=True)
    return Pairs.open(out)


def _search_attrs(
    bank: FeatureBank, cand_rows: np.ndarray, searcher: VectorIndex | None, index: str | Path | None
) -> dict[str, Any]:
    """How the candidates were searched: exact, or through ``index`` with its measured recall."""
    if searcher is None:
        return {"search": "exact", "search_recall": 1.0, "search_recall_queries": 0}
    recall, queries = candidate_recall(bank, cand_rows)
    return {
        "search": "approximate",
        "index": str(index),
        "index_backend": searcher.backend,
        "index_factory": searcher.manifest.factory,
        "index_params": json.dumps(searcher.manifest.params),
        "search_recall": recall,
        "search_recall_queries": queries,
    }


def _existing(out: Path, fingerprint: str, params: MiningParams, search: str) -> Pairs:
    pairs = Pairs.open(out)
    same_search = pairs.attrs.get("search", "exact") == search
    if pairs.attrs.get("fingerprint") != fingerprint or pairs.params != params or not same_search:
        raise BankError(
            f"{out} holds pairs mined from another bank or with other settings "
            f"({pairs.params}, {pairs.attrs.get('search', 'exact')} search): {_DELETE_HINT}"
        )
    return pairs
