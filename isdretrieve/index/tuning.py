"""The tuning loop: raise an index's search knob (``nprobe`` for IVF, ``efSearch`` for HNSW) until a
measured recall reaches a target. Building an index and planning one (:mod:`isdretrieve.index.planner`)
both tune through it, and so does a Milvus collection (:func:`raise_until`); the recall itself is
measured by :mod:`isdretrieve.index.recall`."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import faiss

from isdretrieve.index.faiss_ops import search_knob, set_params


@dataclass
class Tuned:
    """The search parameters chosen, the recall measured with them, and every (value, recall) tried."""

    params: dict[str, int] = field(default_factory=dict)
    recall: float = 1.0
    reached: bool = True
    trace: list[tuple[int, float]] = field(default_factory=list)


def raise_knob(
    index: faiss.Index,
    recall: Callable[[], float],
    target: float,
    *,
    gpu_index: faiss.Index | None = None,
    max_value: int | None = None,
    report: Callable[[str, int, float], None] | None = None,
    give_up: bool = False,
) -> Tuned:
    """Set the knob of ``index`` to 1, 2, 3, 4, 6, 8, 12, ... (efSearch 16, 24, 32, 48, ... 2048) until
    ``recall()`` >= ``target``: the powers of two of :func:`search_knob` and 1.5x each between them.

    ``recall()`` measures the index as it is set now. The values go on ``index`` and on ``gpu_index`` (its
    GPU copy) alike; ``max_value`` caps them (a GPU's nprobe limit). An index without a knob is measured
    once. The rest is :func:`raise_until`'s.
    """
    knob = search_knob(index)
    if knob is None:
        measured = recall()
        return Tuned({}, measured, measured >= target, [])
    name, values = knob

    def measure(params: dict[str, int]) -> float:
        set_params(index, params, gpu=False)
        if gpu_index is not None:
            set_params(gpu_index, params, gpu=True)
        return recall()

    values = [v for v in finer(values) if max_value is None or v <= max_value]
    return raise_until(name, values, measure, target, report=report, give_up=give_up)


def raise_until(
    name: str,
    values: list[int],
    measure: Callable[[dict[str, int]], float],
    target: float,
    *,
    report: Callable[[str, int, float], None] | None = None,
    give_up: bool = False,
) -> Tuned:
    """Try ``{name: value}`` for each of ``values`` (increasing) until ``measure(params)`` >= ``target``.

    If no value reaches the target the last one tried is kept and ``reached`` is False. With ``give_up``
    the loop stops early once the last step's gain in recall, repeated for every value left, would still
    fall short of the target (recall flattens as the knob grows).
    """
    tuned = Tuned(reached=False)
    for value in values:
        tuned.params = {name: value}
        tuned.recall = measure(tuned.params)
        tuned.trace.append((value, tuned.recall))
        if report is not None:
            report(name, value, tuned.recall)
        if tuned.recall >= target:
            tuned.reached = True
            break
        if give_up and len(tuned.trace) > 1:
            gain, left = tuned.recall - tuned.trace[-2][1], len(values) - len(tuned.trace)
            if tuned.recall + gain * left < target:
                break
    return tuned


def finer(values: list[int]) -> list[int]:
    """``values`` (increasing) with 1.5x the lower of each pair that doubles inserted between them."""
    out: list[int] = []
    for low, high in zip(values, values[1:], strict=False):
        out.append(low)
        if high == 2 * low and low >= 2:
            out.append(low * 3 // 2)
    return out + values[-1:]


def crossing(trace: list[tuple[int, float]], target: float) -> float:
    """The knob value at which recall reaches ``target``, interpolated in log(value) between the last
    value of ``trace`` below it and the first at or above it (the first value if that one reaches it)."""
    for i, (value, recall) in enumerate(trace):
        if recall >= target:
            if i == 0:
                return float(value)
            low, low_recall = trace[i - 1]
            step = (target - low_recall) / max(recall - low_recall, 1e-9)
            return math.exp(math.log(low) + step * (math.log(value) - math.log(low)))
    raise ValueError(f"recall never reaches {target} in {trace}")
