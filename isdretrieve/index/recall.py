"""Held-out recall: how well an index finds a query's *other* neighbours.

The queries are rows sampled from the bank; each is searched for k+1 hits, and its own row is dropped
from the hits and from the exact answer, so what is measured is what a fresh query (one not in the bank)
gets (the manifest's ``RECALL_PROTOCOL``). Searches are passed in as functions
``search(queries, k) -> (scores, rows)``.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from isdretrieve.files.bank import FeatureBank
from isdretrieve.index.exact import bank_exact_search

Search = Callable[[np.ndarray, int], tuple[np.ndarray, np.ndarray]]


def sample_rows(n: int, size: int, seed: int) -> np.ndarray:
    """``size`` distinct sorted row numbers out of ``n``, fixed by ``seed``."""
    return np.sort(np.random.default_rng(seed).choice(n, size=min(size, n), replace=False))


def heldout_queries(bank: FeatureBank, count: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(rows, features) of ``count`` bank rows sampled with ``seed``, the held-out recall queries."""
    rows = sample_rows(len(bank), count, seed)
    return rows, bank.take(rows)


def heldout_truth(
    bank: FeatureBank, count: int, seed: int, k: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(rows, features, exact top-k other rows) of the held-out queries sampled with ``seed``: what every
    held-out recall is measured against."""
    rows, queries = heldout_queries(bank, count, seed)
    truth = heldout_search(lambda q, kk: bank_exact_search(bank, q, kk), queries, rows, k)[1]
    return rows, queries, truth


def drop_self_matches(
    sims: np.ndarray, rows: np.ndarray, query_rows: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Remove each query's own row from its neighbour list [Q, k+1] -> [Q, k] (the last hit if absent)."""
    is_self = rows == query_rows[:, None]
    keep_last = ~is_self.any(axis=1)
    is_self[keep_last, -1] = True
    keep = ~is_self
    q, width = rows.shape
    return sims[keep].reshape(q, width - 1), rows[keep].reshape(q, width - 1)


def heldout_search(
    search: Search, queries: np.ndarray, rows: np.ndarray, k: int
) -> tuple[np.ndarray, np.ndarray]:
    """``search(queries, k + 1)`` with each query's own bank row dropped: the top-k *other* rows."""
    scores, found = search(queries, k + 1)
    return drop_self_matches(scores, found, rows)


def heldout_recall(search: Search, queries: np.ndarray, rows: np.ndarray, truth: np.ndarray) -> float:
    """recall@k of ``search`` on held-out queries against ``truth`` (exact, own rows dropped too)."""
    return recall_at_k(heldout_search(search, queries, rows, truth.shape[1])[1], truth)


def recall_at_k(found: np.ndarray, truth: np.ndarray) -> float:
    """Mean fraction of each query's true top-k rows that appear among its found top-k rows."""
    hits = [len(np.intersect1d(f, t)) for f, t in zip(found, truth, strict=True)]
    return float(np.mean(hits) / truth.shape[1])
