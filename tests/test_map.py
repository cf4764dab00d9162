"""The 2-D map of a bank (t-SNE here, UMAP where umap-learn is installed) and its place in the report."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from isdretrieve.cli.index import main as index_cli
from isdretrieve.errors import InvalidArgument
from isdretrieve.retrieve.map import bank_map, draw_map, map_method

pytestmark = pytest.mark.usefixtures("one_thread")


def _two_d_knn(points, k: int = 5) -> float:
    """Leave-one-out k-NN accuracy of the labels in the 2-D layout (chance: 0.1 on digits)."""
    d = ((points.xy[:, None, :] - points.xy[None, :, :]) ** 2).sum(-1)
    np.fill_diagonal(d, np.inf)
    votes = points.labels[np.argsort(d, axis=1)[:, :k]]
    guess = np.array([np.bincount(v, minlength=10).argmax() for v in votes])
    return float((guess == points.labels).mean())


def test_tsne_map_keeps_classes_apart_and_draws_them(digits_test_index, tmp_path):
    bank = digits_test_index / "bank.h5"
    points = bank_map(bank, max_rows=200, method="tsne", include=[440, 449, 5000])
    assert points.method == "tsne" and points.total == 450 and points.xy.shape == (len(points.rows), 2)
    assert {440, 449} <= set(points.rows.tolist()) and len(points.rows) <= 202  # 5000 is no row: ignored
    assert np.all(np.diff(points.rows) > 0) and np.isfinite(points.xy).all()
    assert _two_d_knn(points) > 0.6  # neighbours in the picture are mostly of one class
    again = bank_map(bank, max_rows=200, method="tsne", include=[440, 449])
    np.testing.assert_array_equal(again.rows, points.rows)  # the same sample for the same seed

    path = draw_map(points, tmp_path / "map.png", title="digits", ringed=[440])
    image = Image.open(path).convert("RGB")
    hues = {c for _, c in image.getcolors(1 << 20) if max(c) - min(c) > 60}
    assert image.size == (750, 600) and len(hues) >= 10


def test_method_choice():
    assert map_method("tsne") == "tsne"
    with pytest.raises(InvalidArgument, match="method must be one of auto, umap, tsne"):
        map_method("pca")


@pytest.mark.slow
def test_umap_map(digits_test_index):
    pytest.importorskip("umap")
    assert map_method("auto") == "umap"
    points = bank_map(digits_test_index / "bank.h5", max_rows=300, method="umap")
    assert points.method == "umap" and _two_d_knn(points) > 0.6


def test_neighbours_report_with_a_map(digits_test_index, tmp_path):
    out = tmp_path / "report"
    args = ["neighbours", digits_test_index, "--sample", 4, "-k", 3, "--map", 150, "--map-method", "tsne"]
    args += ["--out", out, "--json"]
    result = CliRunner().invoke(index_cli, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["map"] == str(out / "map.png")
    page = (out / "index.html").read_text()
    assert re.search(r'<img id="map" src="map.png"', page) and (out / "map.png").stat().st_size > 10_000
    plain = CliRunner().invoke(index_cli, [str(a) for a in args[:6]] + ["--out", str(tmp_path / "plain")])
    assert plain.exit_code == 0 and not (tmp_path / "plain" / "map.png").exists()
    assert 'id="map"' not in (tmp_path / "plain" / "index.html").read_text()
