"""The measured ``auto`` plan: try the indices that fit the memory budget on a sample of the bank and keep
the one that answers queries fastest at the recall target.

1. **Candidates** (:func:`candidates`): ``Flat``; ``HNSW{M}`` and ``HNSW{M},SQ8`` for M in 8, 16, 32;
   ``IVF{c},Flat`` and ``IVF{c},SQ8`` for c in c0/4, c0/2, c0, 2·c0 (c0 from :func:`ivf_lists`, each
   with at least 39 bank rows per list), with an HNSW coarse quantizer (``IVF{c}_HNSW32,SQ8``) from
   8,192 lists; ``IVF{c0},PQ{m}`` only when no SQ8 or Flat code fits. Each is kept if its memory over the
   full bank (:func:`~isdretrieve.index.plan.estimate_bytes`) fits the budget.
2. **Trials** on a sample of S = min(n, 20,000) bank rows: each candidate is built on it (trained on and
   filled with the sample; an IVF with c·S/n lists, so that its lists hold as many rows as on the full
   bank), tuned by the build's own loop (:func:`~isdretrieve.index.tuning.raise_knob`) to recall@k on
   held-out sample rows (:mod:`~isdretrieve.index.recall`), and timed at one FAISS thread on those
   queries (the least CPU time of three batches). A candidate whose knob cannot reach the target is
   dropped (its sweep stops once the recall it gains a step, repeated for the values left, would fall
   short).
3. **Extrapolation** from S to n rows, as queries/s:

   - Flat scans every row: time x n/S.
   - HNSW's search path grows with the graph's depth, log n: time x ln n / ln S (and efSearch with it).
   - IVF: the nprobe that reaches the target grows as (n/S)^a at a fixed number of rows a list; a is
     measured by tuning the same index on a quarter of the sample with a quarter of the lists (each
     nprobe interpolated between the values tried; a = 0 means nprobe carries over, a = 1 that it grows
     as the list count). The predicted nprobe, rounded up to a value the tuning loop tries, scales the
     time of scanning the lists; the coarse search (timed apart) scales with the centroid count (with
     its log for an HNSW quantizer).

4. **Choice**: the highest predicted queries/s. Flat is exact and needs no tuning, so it is kept unless
   an approximate index is predicted at least 1.25x faster. Trials stop starting after
   ``PLAN_SECONDS``; those not run are recorded as skipped.

The chosen factory is then built on the whole bank and tuned again (``build_index``); that recall is the
one its manifest records, next to the trials. Banks under 10,000 rows are not sampled: Flat when it fits
(exact search over so few rows is as fast as anything), else the rule of
:func:`~isdretrieve.index.plan.choose_index`, which also decides when nothing fits in RAM (on disk). When
no candidate reaches the target (say only a short PQ code fits), the lists go on disk as well: an
``IVF{c},SQ8`` whose centroids and list directory fit the budget, or ``IVF{c},Flat`` when SQ8 codes miss
the target on the sample too (:func:`~isdretrieve.index.plan.ondisk_plan`).
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

import faiss
import numpy as np

from isdretrieve.files.bank import FeatureBank
from isdretrieve.index.exact import exact_search
from isdretrieve.index.faiss_ops import make_index
from isdretrieve.index.plan import (
    FLAT_MAX_ROWS,
    HNSW_MAX_ROWS,
    MIN_POINTS_PER_CENTROID,
    IndexPlan,
    choose_index,
    estimate_bytes,
    ivf_lists,
    mib,
    ondisk_plan,
)
from isdretrieve.index.recall import heldout_recall, heldout_search, sample_rows
from isdretrieve.index.tuning import Tuned, crossing, finer, raise_knob

PLAN_SECONDS = 120.0  # no trial starts after this many seconds of planning
SAMPLE_ROWS = 20_000
MIN_PLAN_ROWS = 10_000
PLAN_QUERIES = 500
FLAT_MARGIN = 1.25
HNSW_DEGREES = (8, 16, 32)
HNSW_QUANTIZER_LISTS = 8_192  # from this many lists the coarse search goes through an HNSW graph
TIMING_RUNS = 3


@dataclass(frozen=True)
class Candidate:
    """An index for the full bank, its memory there, and the index built in its place on the sample."""

    factory: str
    estimated_bytes: int
    sample_factory: str
    kind: str  # "flat", "hnsw" or "ivf"
    lists: int = 0  # IVF lists on the full bank
    sample_lists: int = 0


@dataclass
class Trial:
    """What a candidate measured on the sample, and what that predicts for the full bank."""

    factory: str
    estimated_bytes: int
    sample_factory: str
    status: str = "skipped"  # "ok", "below target", or "skipped" (the planning time ran out)
    sample_params: dict[str, int] = field(default_factory=dict)
    sample_recall: float = 0.0
    sample_qps: float = 0.0
    predicted_qps: float = 0.0
    predicted_params: dict[str, int] = field(default_factory=dict)
    nprobe_exponent: float = 0.0  # IVF: a in nprobe ~ rows^a, measured on the sample and a quarter of it
    seconds: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        record = asdict(self)
        for name in ("sample_recall", "nprobe_exponent", "sample_qps", "predicted_qps", "seconds"):
            record[name] = round(record[name], {"sample_recall": 4, "nprobe_exponent": 3}.get(name, 1))
        return record


@dataclass
class MeasuredPlan:
    """The plan ``build_index`` follows, the trials behind it, the sample size and the planning time."""

    plan: IndexPlan
    trials: list[Trial]
    sample_rows: int = 0
    seconds: float = 0.0


@dataclass(frozen=True)
class _Sample:
    """Sampled bank rows, the held-out queries among them and their exact top-k other sample rows."""

    x: np.ndarray
    query_rows: np.ndarray  # positions within ``x``
    queries: np.ndarray
    truth: np.ndarray
    k: int


def candidates(n: int, dim: int, budget: int, sample: int | None = None) -> list[Candidate]:
    """Every index of the module's grammar that fits ``budget`` bytes over ``n`` x ``dim`` vectors, cheap
    trials first (Flat, then IVF, then HNSW), each with the index standing in for it on ``sample`` rows."""
    sample = min(n, sample or SAMPLE_ROWS)
    found: list[Candidate] = []

    def add(factory: str, kind: str, sample_factory: str | None = None, lists: int = 0, s_lists: int = 0):
        need = estimate_bytes(factory, n, dim)
        if need <= budget:
            found.append(Candidate(factory, need, sample_factory or factory, kind, lists, s_lists))

    if n <= FLAT_MAX_ROWS:
        add("Flat", "flat")
    base = ivf_lists(n)
    most = max(1, n // MIN_POINTS_PER_CENTROID)
    for code in ("Flat", "SQ8"):
        for lists in sorted({c for c in (base // 4, base // 2, base, 2 * base) if 1 <= c <= most}):
            s_lists = max(1, round(lists * sample / n))
            quantizer = "_HNSW32" if lists >= HNSW_QUANTIZER_LISTS else ""
            add(f"IVF{lists}{quantizer},{code}", "ivf", f"IVF{s_lists}{quantizer},{code}", lists, s_lists)
    if not any(c.kind == "ivf" for c in found):
        s_lists = max(1, round(base * sample / n))
        for m in (m for m in range(dim // 2, 0, -1) if dim % m == 0):
            before = len(found)
            add(f"IVF{base},PQ{m}", "ivf", f"IVF{s_lists},PQ{m}", base, s_lists)
            if len(found) > before:
                break
    if n <= HNSW_MAX_ROWS:
        for code in ("", ",SQ8"):
            for degree in HNSW_DEGREES:
                add(f"HNSW{degree}{code}", "hnsw")
    return found


def plan_index(
    bank: FeatureBank,
    *,
    memory_budget: int,
    recall_target: float = 0.95,
    k: int = 10,
    seed: int = 0,
    seconds: float = PLAN_SECONDS,
    queries: int = PLAN_QUERIES,
    sample: int = SAMPLE_ROWS,
    say: Callable[[str], None] | None = None,
) -> MeasuredPlan:
    """The fastest index at ``recall_target`` (recall@k) within ``memory_budget`` bytes for ``bank``."""
    started = time.perf_counter()
    n, dim = len(bank), bank.dim
    rule = choose_index(n, dim, memory_budget=memory_budget)
    if rule.on_disk or n < MIN_PLAN_ROWS:
        return MeasuredPlan(rule, [], 0, time.perf_counter() - started)
    found = candidates(n, dim, memory_budget, sample)
    if not found:
        return MeasuredPlan(rule, [], 0, time.perf_counter() - started)
    drawn = _draw(bank, sample, queries, k, seed)
    trials = []
    for candidate in found:
        if time.perf_counter() - started > seconds:
            trials.append(Trial(candidate.factory, candidate.estimated_bytes, candidate.sample_factory))
            continue
        trials.append(_trial(candidate, drawn, n, recall_target))
        if say is not None:
            say(_describe(trials[-1]))
    best, ran = pick_trial(trials), [t for t in trials if t.status != "skipped"]
    if best is not None:
        plan = _fastest(best, trials, n, memory_budget, len(drawn.x), drawn.k, recall_target)
    elif ran:
        plan = _on_disk_instead(ran, drawn, (n, dim), memory_budget, recall_target) or rule
    else:
        why = "the planning time ran out before any trial"
        plan = IndexPlan(rule.factory, f"{why}; by rule: {rule.reason}", rule.estimated_bytes)
    return MeasuredPlan(plan, trials, len(drawn.x), time.perf_counter() - started)


def _draw(bank: FeatureBank, size: int, queries: int, k: int, seed: int) -> _Sample:
    """``size`` bank rows (seed + 2) and ``queries`` of them as held-out queries (seed), with their truth."""
    x = np.ascontiguousarray(bank.take(sample_rows(len(bank), size, seed + 2)))
    return _with_truth(x, sample_rows(len(x), min(queries, len(x)), seed), k)


def _with_truth(x: np.ndarray, query_rows: np.ndarray, k: int) -> _Sample:
    """The sample ``x`` with its rows ``query_rows`` as queries and their exact top-k other rows."""
    xq, k = x[query_rows], min(k, len(x) - 1)
    truth = heldout_search(lambda q, kk: exact_search(x, q, kk, device="cpu"), xq, query_rows, k)[1]
    return _Sample(x, query_rows, xq, truth, k)


def _trial(candidate: Candidate, drawn: _Sample, n: int, target: float) -> Trial:
    """Build ``candidate``'s sample index, tune it to ``target`` and predict its full-bank speed."""
    started = time.perf_counter()
    trial = Trial(candidate.factory, candidate.estimated_bytes, candidate.sample_factory)
    index, tuned = _tuned(candidate.sample_factory, drawn, target)
    trial.sample_params, trial.sample_recall = tuned.params, tuned.recall
    trial.status = "ok" if tuned.reached else "below target"
    if tuned.reached:
        total = _search_seconds(lambda: index.search(drawn.queries, drawn.k))
        trial.sample_qps = len(drawn.queries) / total
        if candidate.kind == "ivf":
            trial.nprobe_exponent = _nprobe_exponent(candidate, drawn, target, tuned.trace)
            coarse = _coarse_seconds(index, drawn, tuned.params["nprobe"])
            nprobe = crossing(tuned.trace, target) * (n / len(drawn.x)) ** trial.nprobe_exponent
            predicted = _extrapolate_ivf(candidate, trial, (total, coarse), nprobe, n, len(drawn.x))
        else:
            predicted = _extrapolate(candidate, trial, total, n, len(drawn.x))
        trial.predicted_qps = len(drawn.queries) / predicted
    trial.seconds = time.perf_counter() - started
    return trial


def _tuned(factory: str, drawn: _Sample, target: float) -> tuple[faiss.Index, Tuned]:
    """``factory`` trained on and filled with the sample's rows, tuned to ``target`` on its queries."""
    index = make_index(factory, drawn.x.shape[1])
    index.train(drawn.x)
    index.add(drawn.x)
    recall = lambda: heldout_recall(index.search, drawn.queries, drawn.query_rows, drawn.truth)  # noqa: E731
    return index, raise_knob(index, recall, target, give_up=True)


def _nprobe_exponent(candidate: Candidate, drawn: _Sample, target: float, trace: list) -> float:
    """a in nprobe ~ rows^a at a fixed number of rows a list: the nprobe reaching ``target`` on the
    sample against that on a quarter of it (with a quarter of the lists), each interpolated between the
    values tried; clamped to 0..1 (1: nprobe grows as the list count, if the quarter fails)."""
    part = _part(drawn, len(drawn.x) // 4)
    lists = max(1, round(candidate.sample_lists * len(part.x) / len(drawn.x)))
    factory = candidate.sample_factory.replace(f"IVF{candidate.sample_lists}", f"IVF{lists}", 1)
    tuned = _tuned(factory, part, target)[1]
    if not tuned.reached:
        return 1.0
    ratio = crossing(trace, target) / crossing(tuned.trace, target)
    return min(1.0, max(0.0, math.log(ratio) / math.log(len(drawn.x) / len(part.x))))


def _part(drawn: _Sample, size: int) -> _Sample:
    """``size`` rows of the sample: its queries and others (every other row first), with their truth."""
    others = np.setdiff1d(np.arange(len(drawn.x)), drawn.query_rows)
    rows = np.sort(np.concatenate([drawn.query_rows, others[: max(0, size - len(drawn.query_rows))]]))
    x = np.ascontiguousarray(drawn.x[rows])
    return _with_truth(x, np.searchsorted(rows, drawn.query_rows), drawn.k)


def _coarse_seconds(index: faiss.Index, drawn: _Sample, nprobe: int) -> float:
    """Seconds the IVF coarse search takes for the queries at ``nprobe``."""
    quantizer = faiss.extract_index_ivf(index).quantizer
    return _search_seconds(lambda: quantizer.search(drawn.queries, nprobe))


def _extrapolate(candidate: Candidate, trial: Trial, total: float, n: int, s: int) -> float:
    """Predicted seconds of Flat or HNSW for the queries on the full bank (and its efSearch, in ``trial``)."""
    if candidate.kind == "flat":
        return total * n / s
    depth = math.log(n) / math.log(s) if s > 1 else 1.0
    trial.predicted_params = {"efSearch": math.ceil(trial.sample_params["efSearch"] * depth)}
    return total * depth


def _extrapolate_ivf(
    candidate: Candidate, trial: Trial, seconds: tuple[float, float], wanted: float, n: int, s: int
) -> float:
    """Predicted seconds of an IVF for the queries on the full bank, and its nprobe (in ``trial``).

    ``seconds`` are the sample's (total, coarse search) at the tuned nprobe; ``wanted`` the nprobe the
    full bank needs, rounded up here to a value the tuning loop tries. Scanning grows with nprobe and the
    rows a list, the coarse search with the centroids."""
    total, coarse = seconds
    values = finer(sorted({min(2**i, candidate.lists) for i in range(candidate.lists.bit_length() + 1)}))
    nprobe = next((v for v in values if v >= wanted - 1e-9), values[-1])
    trial.predicted_params = {"nprobe": nprobe}
    if "_HNSW" in candidate.factory:
        centroids = math.log(candidate.lists) / math.log(max(2, candidate.sample_lists))
    else:
        centroids = candidate.lists / candidate.sample_lists
    rows_a_list = (n / candidate.lists) / (s / candidate.sample_lists)
    return coarse * centroids + (total - coarse) * rows_a_list * nprobe / trial.sample_params["nprobe"]


def pick_trial(trials: list[Trial]) -> Trial | None:
    """The trial with the most predicted queries/s among those that reached the target, except that Flat
    (exact) is kept unless that one is predicted FLAT_MARGIN times faster; None if none reached it."""
    ranked = sorted((t for t in trials if t.status == "ok"), key=lambda t: -t.predicted_qps)
    if not ranked:
        return None
    flat = next((t for t in ranked if t.factory == "Flat"), None)
    if flat is not None and ranked[0].predicted_qps < FLAT_MARGIN * flat.predicted_qps:
        return flat
    return ranked[0]


def _fastest(
    best: Trial, trials: list[Trial], n: int, budget: int, s: int, k: int, target: float
) -> IndexPlan:
    """The plan of ``best``, the others' predictions in its reason."""
    others = ", ".join(
        f"{t.factory} {t.predicted_qps:,.0f}" for t in trials if t.status == "ok" and t is not best
    )
    reason = (
        f"fastest of {len(trials)} indices within the {mib(budget)} budget at recall@{k} >= {target}, "
        f"measured on {s:,} of {n:,} rows at 1 thread: {best.factory} ({mib(best.estimated_bytes)}), "
        f"{best.predicted_qps:,.0f} queries/s predicted" + (f" (others: {others})" if others else "")
    )
    return IndexPlan(best.factory, reason, best.estimated_bytes)


def _on_disk_instead(
    ran: list[Trial], drawn: _Sample, shape: tuple[int, int], budget: int, target: float
) -> IndexPlan | None:
    """When no candidate reaches the target: an IVF with its lists on disk, SQ8 codes if they reach the
    target on the sample (tried now unless an IVF SQ8 candidate already missed it), else Flat codes."""
    (n, dim), s = shape, len(drawn.x)
    code = "Flat"
    if not any(t.factory.startswith("IVF") and t.factory.endswith(",SQ8") for t in ran):
        lists = max(1, round(ivf_lists(n) * s / n))
        code = "SQ8" if _tuned(f"IVF{lists},SQ8", drawn, target)[1].reached else "Flat"
    why = (
        f"no candidate reached recall@{drawn.k} >= {target} on a {s:,}-row sample "
        f"(tried {', '.join(t.factory for t in ran)}"
        + ("; SQ8 codes miss it too" if code == "Flat" else "")
        + ")"
    )
    return ondisk_plan(n, dim, budget, why, code)


def _describe(trial: Trial) -> str:
    if trial.status != "ok":
        return f"plan: {trial.factory} ({trial.sample_factory} on the sample): {trial.status}"
    params = ", ".join(f"{name}={value}" for name, value in trial.sample_params.items()) or "exact"
    return (
        f"plan: {trial.factory} ({trial.sample_factory} on the sample, {params}, recall "
        f"{trial.sample_recall:.3f}): {trial.sample_qps:,.0f} queries/s, {trial.predicted_qps:,.0f} predicted"
    )


def _search_seconds(search: Callable[[], Any]) -> float:
    """The least CPU time of TIMING_RUNS calls of ``search`` at one FAISS thread.

    CPU time rather than wall time: with one thread they agree on an idle machine, and on a busy one
    only the CPU time is free of the other jobs' share of the cores."""
    with one_faiss_thread():
        runs = []
        for _ in range(TIMING_RUNS):
            started = time.process_time()
            search()
            runs.append(time.process_time() - started)
    return max(min(runs), 1e-6)


@contextlib.contextmanager
def one_faiss_thread() -> Iterator[None]:
    """FAISS on one OpenMP thread inside the block, as many as before after it."""
    before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    try:
        yield
    finally:
        faiss.omp_set_num_threads(before)
