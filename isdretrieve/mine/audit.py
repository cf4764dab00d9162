"""Label audit of mined pairs: how often a mined positive shares its anchor's class, and how many rows
get one. Labels only measure the mining here; they never choose pairs."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from isdretrieve.errors import BankError
from isdretrieve.files.atomic import atomic_path
from isdretrieve.files.pairs import Pairs
from isdretrieve.mine.mining import keep_mask
from isdretrieve.util.plot import Panel, line_charts

QUANTILES = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95)


@dataclass(frozen=True)
class AuditPoint:
    """Precision and coverage of one setting (a threshold or a k)."""

    threshold: float
    k: int
    precision: float  # fraction of pairs (both labels known) whose labels agree; NaN without pairs
    coverage: float  # fraction of rows with at least one positive
    pairs_per_row: float


@dataclass(frozen=True)
class ClassAudit:
    label: int
    name: str
    rows: int
    coverage: float
    precision: float


@dataclass(frozen=True)
class AuditReport:
    chosen: AuditPoint
    per_class: list[ClassAudit]
    threshold_curve: list[AuditPoint]  # at the chosen k and mutual setting
    k_curve: list[AuditPoint]  # at the chosen threshold and mutual setting
    search: dict | None = None  # how the candidates were searched: kind, recall against exact, queries

    def to_dict(self) -> dict:
        return asdict(self)


def _point(
    keep: np.ndarray,
    rows: np.ndarray,
    labels: np.ndarray,
    threshold: float,
    k: int,
    anchor_rows: np.ndarray | None = None,
) -> AuditPoint:
    """Audit the candidates ``rows`` [n, k] where ``keep``; ``anchor_rows`` [n]: whose lists they are."""
    if anchor_rows is None:
        anchor_rows = np.arange(len(rows))
    a = labels[np.broadcast_to(anchor_rows[:, None], rows.shape)[keep]]
    b = labels[rows[keep]]
    known = (a >= 0) & (b >= 0)
    precision = float((a[known] == b[known]).mean()) if known.any() else float("nan")
    per_row = keep.sum(axis=1)
    return AuditPoint(threshold, k, precision, float((per_row > 0).mean()), float(per_row.mean()))


def audit_pairs(pairs: Pairs, labels: np.ndarray, classes: list[str] | None = None) -> AuditReport:
    """Audit ``pairs`` against the bank's ``labels`` (−1 unknown): overall, per class, and as curves."""
    labels = np.asarray(labels, dtype=np.int64)
    if len(labels) != len(pairs):
        raise BankError(f"{len(labels)} labels for {len(pairs)} mined rows: not the mined bank")
    if not (labels >= 0).any():
        raise BankError("the bank has no labels to audit the pairs against")
    rows, sims = pairs.candidate_rows, pairs.candidate_similarities
    mutual, k = pairs.params.mutual, rows.shape[1]
    chosen_keep = keep_mask(rows, sims, pairs.threshold, mutual)  # exactly how mine_pairs chose them
    chosen = _point(chosen_keep, rows, labels, pairs.threshold, k)

    per_class = []
    for label in np.unique(labels[labels >= 0]):
        sub = np.flatnonzero(labels == label)
        point = _point(chosen_keep[sub], rows[sub], labels, pairs.threshold, k, anchor_rows=sub)
        name = classes[label] if classes and label < len(classes) else str(label)
        per_class.append(ClassAudit(int(label), name, len(sub), point.coverage, point.precision))

    threshold_curve = []
    for q in QUANTILES:
        t = float(np.quantile(sims, q))
        threshold_curve.append(_point(keep_mask(rows, sims, t, mutual), rows, labels, t, k))
    k_curve = []
    for kk in range(1, k + 1):
        keep = keep_mask(rows[:, :kk], sims[:, :kk], pairs.threshold, mutual)
        k_curve.append(_point(keep, rows[:, :kk], labels, pairs.threshold, kk))
    search = {
        "kind": str(pairs.attrs.get("search", "exact")),
        "recall": pairs.search_recall,
        "recall_queries": int(pairs.attrs.get("search_recall_queries", 0)),
    }
    return AuditReport(chosen, per_class, threshold_curve, k_curve, search)


def write_audit(report: AuditReport, json_path: Path, png_path: Path) -> None:
    """The report as JSON and as a PNG of precision/coverage against threshold and k."""
    with atomic_path(json_path) as tmp:
        tmp.write_text(json.dumps(report.to_dict(), indent=2, allow_nan=True))

    def series(points: list[AuditPoint], x: str) -> dict[str, tuple[list[float], list[float]]]:
        xs = [getattr(p, x) for p in points]
        return {
            "precision": (xs, [p.precision if p.precision == p.precision else 0.0 for p in points]),
            "coverage": (xs, [p.coverage for p in points]),
        }

    line_charts(
        [
            Panel("vs threshold", "threshold", series(report.threshold_curve, "threshold")),
            Panel("vs k (candidates per row)", "k", series(report.k_curve, "k")),
        ],
        png_path,
    )


def audit_paths(pairs_path: str | Path) -> tuple[Path, Path]:
    """Where the audit of ``PAIRS.h5`` lives: ``PAIRS.audit.json`` and ``PAIRS.audit.png`` beside it."""
    stem = Path(pairs_path).with_suffix("")
    return Path(f"{stem}.audit.json"), Path(f"{stem}.audit.png")


def load_audit(json_path: str | Path) -> dict:
    """An audit JSON file as a dict, its NaN precisions (settings without pairs) as None (strict JSON)."""
    path = Path(json_path)
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise BankError(f"cannot read the audit {path}: {exc}") from None

    def strict(value: object) -> object:
        if isinstance(value, float) and not math.isfinite(value):
            return None
        if isinstance(value, dict):
            return {key: strict(v) for key, v in value.items()}
        if isinstance(value, list):
            return [strict(v) for v in value]
        return value

    return strict(data)
