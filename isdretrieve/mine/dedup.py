"""Near-duplicate removal: groups of bank rows whose cosine similarity is at least a threshold.

Every row's top-k other rows are searched with mining's chunked, resumable search
(:func:`~isdretrieve.mine.mining.search_candidates`, exact or through an index; never an N x N matrix);
the candidates at or above ``threshold`` are the edges of a graph, and its connected components with two
or more rows are the duplicate groups. A group larger than k + 1 is still found whole when its members
are chained through their neighbours.

**Which row of a group is kept** (``keep``):

- ``"first"`` (the default): the lowest bank row, i.e. the first copy in the data set's order;
- ``"central"``: the row with the most duplicate edges inside the group (the copy the others resemble
  most), ties to the lowest bank row.

Written to ``out_dir`` (tables as CSV, or parquet with ``table_format="parquet"``):

- ``groups.csv``: one line per row in a group: ``group`` (0 = the largest), ``row``, ``index``,
  ``label``, ``path``, ``kept`` (1 for the group's representative) and ``similarity`` (cosine to it);
- ``keep.csv``: every row to keep (rows in no group, ``group`` -1, and one representative a group);
- ``drop.csv``: every other row of a group, with the ``kept_row`` it duplicates and their ``similarity``;
- ``candidates.h5``: the top-k search, resumable while it runs and kept afterwards, so a rerun with
  another threshold or keep rule searches nothing;
- ``summary.json`` (last, atomically): the counts, the settings, the largest groups.
"""

from __future__ import annotations

import csv
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

from isdretrieve.errors import InvalidArgument, IsdError
from isdretrieve.files.atomic import atomic_path
from isdretrieve.files.bank import FeatureBank
from isdretrieve.index.backend import clamp_k
from isdretrieve.mine.mining import DEFAULT_CHUNK_ROWS, open_index_over, search_candidates, search_name
from isdretrieve.util.extras import pyarrow_module

KEEP_RULES = ("first", "central")
TABLE_FORMATS = ("csv", "parquet")
CANDIDATES_FILE = "candidates.h5"
SUMMARY_FILE = "summary.json"
SUMMARY_FORMAT = "isdretrieve.dedup/1"
LARGEST = 20  # groups listed in the summary


@dataclass(frozen=True)
class DuplicateGroups:
    """The groups found: ``group`` [N] (−1: in no group; 0 is the largest group), ``kept`` [N] bool
    (True for rows kept: those in no group and one representative per group), ``representative`` [N]
    (the kept row of each row's group, the row itself outside groups) and ``similarity`` [N] (cosine
    to the representative; 1 for kept rows)."""

    group: np.ndarray
    kept: np.ndarray
    representative: np.ndarray
    similarity: np.ndarray

    @property
    def sizes(self) -> np.ndarray:
        """Rows in each group, largest first."""
        return np.bincount(self.group[self.group >= 0]) if (self.group >= 0).any() else np.zeros(0, int)

    def members(self, group: int) -> np.ndarray:
        """The rows of ``group``, its representative first, the others by falling similarity."""
        rows = np.flatnonzero(self.group == group)
        order = np.lexsort((rows, -self.similarity[rows], ~self.kept[rows]))
        return rows[order]


@dataclass(frozen=True)
class DedupResult:
    """What :func:`find_duplicates` found and wrote (``summary`` is ``summary.json``'s content)."""

    out_dir: Path
    groups: DuplicateGroups
    summary: dict[str, Any] = field(default_factory=dict)

    @property
    def files(self) -> dict[str, Path]:
        return {name: self.out_dir / name for name in self.summary["files"]}


def duplicate_edges(
    cand_rows: np.ndarray, cand_sims: np.ndarray, threshold: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(row a, row b, similarity) of every candidate at or above ``threshold``, each pair once (a < b)."""
    anchors = np.repeat(np.arange(len(cand_rows), dtype=np.int64), cand_rows.shape[1])
    others, sims = cand_rows.reshape(-1), cand_sims.reshape(-1)
    keep = (sims >= threshold) & (others >= 0) & (others != anchors)
    a, b, s = np.minimum(anchors, others)[keep], np.maximum(anchors, others)[keep], sims[keep]
    pairs, first = np.unique(np.stack([a, b], 1), axis=0, return_index=True)
    return pairs[:, 0], pairs[:, 1], s[first]


def group_rows(n: int, a: np.ndarray, b: np.ndarray, keep: str = "first") -> tuple[np.ndarray, np.ndarray]:
    """(group [N], representative [N]) of the graph with edges a–b: groups are the connected components
    of two or more rows, numbered by falling size (ties: by their lowest row); ``keep`` picks each
    group's representative (see the module docstring)."""
    if keep not in KEEP_RULES:
        raise InvalidArgument(f"keep must be one of {', '.join(KEEP_RULES)}, got {keep!r}")
    graph = coo_matrix((np.ones(len(a), np.int8), (a, b)), shape=(n, n))
    _, component = connected_components(graph, directed=False)
    sizes = np.bincount(component)
    lowest = np.full(len(sizes), n, np.int64)
    np.minimum.at(lowest, component, np.arange(n))
    grouped = np.flatnonzero(sizes >= 2)
    order = grouped[np.lexsort((lowest[grouped], -sizes[grouped]))]
    number = np.full(len(sizes), -1, np.int64)
    number[order] = np.arange(len(order))
    group = number[component]
    representative = np.arange(n, dtype=np.int64)
    score = np.zeros(n, np.int64)  # "central": degree inside the group; "first": none
    if keep == "central":
        np.add.at(score, a, 1)
        np.add.at(score, b, 1)
    rows = np.flatnonzero(group >= 0)
    rows = rows[np.lexsort((rows, -score[rows], group[rows]))]  # by group, best candidate first
    starts = np.r_[True, group[rows][1:] != group[rows][:-1]] if len(rows) else np.zeros(0, bool)
    chosen = np.full(len(order), -1, np.int64)
    chosen[group[rows][starts]] = rows[starts]
    representative[rows] = chosen[group[rows]]
    return group, representative


def _similarities(bank: FeatureBank, representative: np.ndarray, group: np.ndarray) -> np.ndarray:
    """Cosine of every grouped row to its representative (1 elsewhere): the representatives' rows are
    read once, the bank streamed block by block."""
    sims = np.ones(len(group), np.float32)
    heads = np.unique(representative[group >= 0])
    head_rows = bank.take(heads)
    for start, x in bank.blocks():
        rows = np.flatnonzero(group[start : start + len(x)] >= 0)
        theirs = head_rows[np.searchsorted(heads, representative[start + rows])]
        sims[start + rows] = np.einsum("ij,ij->i", x[rows], theirs)
    sims[representative == np.arange(len(group))] = 1.0
    return sims


def find_duplicates(
    bank_path: str | Path,
    out_dir: str | Path,
    *,
    threshold: float,
    k: int = 10,
    keep: str = "first",
    table_format: str = "csv",
    device: str = "auto",
    chunk_rows: int = DEFAULT_CHUNK_ROWS,
    progress: Callable[[int, int], None] | None = None,
    index: str | Path | None = None,
) -> DedupResult:
    """Group the near-duplicate rows of the bank at ``bank_path`` and write the lists to ``out_dir``.

    ``threshold``: the cosine similarity at or above which two rows are duplicates; ``k``: candidates
    searched per row; ``index``: an index directory over the same bank to search through (else exact).
    Resumable: an interrupted search continues from ``out_dir/candidates.h5``.
    """
    _check(threshold, keep, table_format, chunk_rows)
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise IsdError(f"{out} is a file: dedup writes a folder")
    with FeatureBank.open(bank_path) as bank:
        if len(bank) < 2:
            raise IsdError(f"dedup needs at least 2 bank rows, the bank has {len(bank)}")
        k = clamp_k(k, len(bank) - 1)
        searcher = None if index is None else open_index_over(index, bank)
        try:
            out.mkdir(parents=True, exist_ok=True)
            (out / SUMMARY_FILE).unlink(missing_ok=True)  # unfinished until the new summary lands
            started = time.perf_counter()
            cand_rows, cand_sims = search_candidates(
                bank,
                k,
                out / CANDIDATES_FILE,
                device=device,
                chunk_rows=chunk_rows,
                progress=progress,
                index=searcher,
            )
            seconds = time.perf_counter() - started
            search = search_name(searcher).split(":")[0]
        finally:
            if searcher is not None:
                searcher.close()
        a, b, _ = duplicate_edges(cand_rows, cand_sims, threshold)
        group, representative = group_rows(len(bank), a, b, keep)
        kept = representative == np.arange(len(bank))
        groups = DuplicateGroups(group, kept, representative, _similarities(bank, representative, group))
        files = _write_tables(bank, groups, out, table_format)
        settings = {"threshold": threshold, "k": k, "keep": keep, "search": search, "index": index}
        summary = _summary(bank, groups, settings, files, len(a), seconds)
    with atomic_path(out / SUMMARY_FILE) as tmp:
        tmp.write_text(json.dumps(summary, indent=2) + "\n")
    return DedupResult(out, groups, summary)


def _check(threshold: float, keep: str, table_format: str, chunk_rows: int) -> None:
    if not -1.0 <= threshold <= 1.0:
        raise InvalidArgument(f"threshold must be a cosine similarity in [-1, 1], got {threshold}")
    if keep not in KEEP_RULES:
        raise InvalidArgument(f"keep must be one of {', '.join(KEEP_RULES)}, got {keep!r}")
    if table_format not in TABLE_FORMATS:
        raise InvalidArgument(f"table_format must be one of {', '.join(TABLE_FORMATS)}, got {table_format!r}")
    if chunk_rows < 1:
        raise InvalidArgument(f"chunk_rows must be positive, got {chunk_rows}")
    if table_format == "parquet":
        pyarrow_module()  # a missing pyarrow is reported before the search, not after it


def _summary(
    bank: FeatureBank,
    groups: DuplicateGroups,
    settings: dict[str, Any],
    files: list[str],
    edges: int,
    seconds: float,
) -> dict[str, Any]:
    sizes = groups.sizes
    largest = [
        {"group": g, "size": int(sizes[g]), "kept_row": int(groups.members(g)[0])}
        for g in range(min(LARGEST, len(sizes)))
    ]
    return {
        "format": SUMMARY_FORMAT,
        "bank": str(bank.path),
        "fingerprint": bank.fingerprint,
        "rows": len(bank),
        **{key: (str(value) if isinstance(value, Path) else value) for key, value in settings.items()},
        "pairs": edges,
        "groups": len(sizes),
        "rows_in_groups": int(sizes.sum()),
        "kept": int(groups.kept.sum()),
        "dropped": int((~groups.kept).sum()),
        "largest": largest,
        "search_seconds": round(seconds, 3),
        "files": files,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
    }


def _write_tables(bank: FeatureBank, groups: DuplicateGroups, out: Path, table_format: str) -> list[str]:
    """groups / keep / drop tables as CSV or parquet, each written atomically; returns their names."""
    indices, labels, paths = bank.indices(), bank.labels(), bank.paths()
    grouped = np.flatnonzero(groups.group >= 0)
    grouped = grouped[np.lexsort((grouped, ~groups.kept[grouped], groups.group[grouped]))]
    dropped = np.flatnonzero(~groups.kept)
    tables = {
        "groups": (grouped, ["group", "row", "index", "label", "path", "kept", "similarity"]),
        "keep": (np.flatnonzero(groups.kept), ["row", "index", "label", "path", "group"]),
        "drop": (dropped, ["row", "index", "label", "path", "group", "kept_row", "similarity"]),
    }
    values = {
        "row": lambda r: r,
        "index": lambda r: indices[r].astype(np.int64),
        "label": lambda r: labels[r].astype(np.int64),
        "path": lambda r: [paths[i] for i in r],
        "group": lambda r: groups.group[r],
        "kept": lambda r: groups.kept[r].astype(np.int64),
        "kept_row": lambda r: groups.representative[r],
        "similarity": lambda r: np.round(groups.similarity[r].astype(np.float64), 6),
    }
    names = []
    for name, (rows, columns) in tables.items():
        data = {column: values[column](rows) for column in columns}
        names.append(_write_table(out / f"{name}.{table_format}", data, table_format))
    return names


def _write_table(path: Path, data: dict[str, Any], table_format: str) -> str:
    with atomic_path(path) as tmp:
        if table_format == "parquet":
            pa = pyarrow_module()
            table = pa.table({key: pa.array(value) for key, value in data.items()})
            pa.parquet.write_table(table, tmp)
        else:
            with open(tmp, "w", newline="", encoding="utf-8") as f:
                writer = csv.writer(f)
                writer.writerow(list(data))
                writer.writerows(zip(*(list(map(_plain, v)) for v in data.values()), strict=True))
    return path.name


def _plain(value: Any) -> Any:
    return value.item() if hasattr(value, "item") else value
