"""A 2-D map of a bank: its rows laid out by UMAP (or PCA + t-SNE), coloured by class, as a PNG.

    points = bank_map("indices/digits-test/bank.h5")            # up to 3,000 rows, seed 0
    draw_map(points, "map.png", title="digits-test")

``method="auto"`` uses UMAP (cosine metric) when ``umap-learn`` is installed (``pip install
'isdretrieve[map]'``), else scikit-learn's t-SNE (cosine) on the first 50 principal components. Banks
larger than ``max_rows`` are sampled with ``seed``; rows named in ``include`` (a report's queries and
their neighbours) are always mapped and can be ringed in the picture.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from isdretrieve.errors import InvalidArgument, IsdError
from isdretrieve.files.atomic import atomic_path
from isdretrieve.files.bank import FeatureBank
from isdretrieve.retrieve.hits import class_name

METHODS = ("auto", "umap", "tsne")
MAX_ROWS = 3000
PCA_DIMS = 50


@dataclass(frozen=True)
class BankMap:
    """Mapped bank rows: ``rows`` [M] (sorted), their ``xy`` [M, 2], ``labels`` [M]; ``classes`` names the
    labels; ``method`` is what laid them out ("umap" or "tsne"); ``total`` the bank's row count."""

    rows: np.ndarray
    xy: np.ndarray
    labels: np.ndarray
    classes: list[str]
    method: str
    total: int


def map_method(method: str = "auto") -> str:
    """The layout ``method`` resolves to: "umap" or "tsne" (``auto``: UMAP when umap-learn is installed)."""
    if method not in METHODS:
        raise InvalidArgument(f"method must be one of {', '.join(METHODS)}, got {method!r}")
    has_umap = importlib.util.find_spec("umap") is not None
    if method == "umap" and not has_umap:
        raise IsdError("a UMAP map needs umap-learn: pip install 'isdretrieve[map]'")
    return "umap" if method == "umap" or (method == "auto" and has_umap) else "tsne"


def layout(x: np.ndarray, method: str, seed: int = 0) -> np.ndarray:
    """[M, 2] coordinates of the rows ``x`` ([M, D], M >= 2) by ``method`` ("umap" or "tsne")."""
    m = len(x)
    if method == "umap":
        import umap

        neighbours = max(2, min(15, m - 1))
        reducer = umap.UMAP(n_neighbors=neighbours, metric="cosine", random_state=seed, n_jobs=1)
        return np.asarray(reducer.fit_transform(x), dtype=np.float32)
    from sklearn.decomposition import PCA
    from sklearn.manifold import TSNE

    dims = min(PCA_DIMS, x.shape[1], m)
    reduced = PCA(n_components=dims, random_state=seed).fit_transform(x) if dims < x.shape[1] else x
    perplexity = float(min(30, max(1, (m - 1) / 3)))
    tsne = TSNE(2, perplexity=perplexity, metric="cosine", init="pca", random_state=seed)
    return np.asarray(tsne.fit_transform(reduced), dtype=np.float32)


def bank_map(
    bank_path: str | Path,
    *,
    max_rows: int = MAX_ROWS,
    seed: int = 0,
    method: str = "auto",
    include: Sequence[int] = (),
) -> BankMap:
    """Lay out up to ``max_rows`` rows of the bank (a sample drawn with ``seed``, plus ``include``)."""
    if max_rows < 2:
        raise InvalidArgument(f"max_rows must be at least 2, got {max_rows}")
    method = map_method(method)
    with FeatureBank.open(bank_path) as bank:
        n = len(bank)
        if n < 2:
            raise IsdError(f"a map needs at least 2 bank rows, the bank has {n}")
        rng = np.random.default_rng(seed)
        rows = np.arange(n) if n <= max_rows else rng.choice(n, max_rows, replace=False)
        extra = np.asarray([r for r in include if 0 <= r < n], dtype=np.int64)
        rows = np.unique(np.concatenate([rows.astype(np.int64), extra]))
        x, labels, classes = bank.take(rows), bank.labels()[rows], bank.classes
    return BankMap(rows, layout(x, method, seed), labels.astype(np.int64), classes, method, n)


def draw_map(points: BankMap, path: str | Path, *, title: str = "", ringed: Sequence[int] = ()) -> Path:
    """Draw ``points`` coloured by class into the PNG ``path`` (atomically); rows in ``ringed`` get a ring."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7.5, 6.0), dpi=100, layout="constrained")
    ax = fig.subplots()
    present = np.unique(points.labels)
    palette = matplotlib.colormaps["tab10" if len(present) <= 10 else "tab20"]
    size = 14 if len(points.rows) <= 2000 else 6
    for n, label in enumerate(present):
        at = points.labels == label
        colour = (0.6, 0.6, 0.6, 1.0) if label < 0 else palette(n % palette.N)
        name = class_name(int(label), points.classes)
        ax.scatter(*points.xy[at].T, s=size, color=colour, label=name, linewidths=0)
    ring = np.isin(points.rows, np.asarray(list(ringed), dtype=np.int64))
    if ring.any():
        ax.scatter(*points.xy[ring].T, s=80, facecolors="none", edgecolors="black", linewidths=1.2)
    if len(present) <= 20:
        ax.legend(
            loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize="small", markerscale=2, frameon=False
        )
    ax.set_xticks([])
    ax.set_yticks([])
    shown = (
        f"{len(points.rows):,} of {points.total:,} rows" if len(points.rows) < points.total else "all rows"
    )
    ax.set_title(f"{title + ': ' if title else ''}{points.method.upper()} map, {shown}, coloured by class")
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    return Path(path)


def map_png(
    bank_path: str | Path,
    path: str | Path,
    *,
    title: str = "",
    max_rows: int = MAX_ROWS,
    seed: int = 0,
    method: str = "auto",
    include: Sequence[int] = (),
) -> Path:
    """:func:`bank_map` then :func:`draw_map` into the PNG ``path``, the rows of ``include`` ringed."""
    points = bank_map(bank_path, max_rows=max_rows, seed=seed, method=method, include=include)
    return draw_map(points, path, title=title, ringed=include)
