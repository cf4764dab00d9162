"""Near-duplicate removal (``isd-index dedup``): groups, keep and drop lists, resume, planted duplicates."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from planted import families, plant

from isdretrieve.bank.arrays import write_bank
from isdretrieve.bank.export import export_bank
from isdretrieve.cli.index import main as index_cli
from isdretrieve.errors import InvalidArgument, IsdError
from isdretrieve.files.bank import FeatureBank
from isdretrieve.index.build import build_index
from isdretrieve.mine.dedup import duplicate_edges, find_duplicates, group_rows

pytestmark = pytest.mark.usefixtures("one_thread")


def invoke(*args):
    return CliRunner().invoke(index_cli, [str(a) for a in args])


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_components_and_keep_rules():
    """Edges 0-1, 1-2 (a chain), 3-5, 5-6, 4-6 and 6-3: groups {0,1,2} and {3,4,5,6}; row 7 alone."""
    a, b = np.array([0, 1, 3, 5, 4, 6]), np.array([1, 2, 5, 6, 6, 3])
    group, representative = group_rows(8, a, b, "first")
    assert group.tolist() == [1, 1, 1, 0, 0, 0, 0, -1]  # the largest group is numbered 0
    assert representative.tolist() == [0, 0, 0, 3, 3, 3, 3, 7]
    group, representative = group_rows(8, a, b, "central")  # 1 has two edges in its group, 6 three
    assert representative.tolist() == [1, 1, 1, 6, 6, 6, 6, 7]
    with pytest.raises(InvalidArgument, match="keep must be one of first, central"):
        group_rows(8, a, b, "best")


def test_a_bank_without_duplicates_keeps_every_row(digits_bank, tmp_path):
    result = find_duplicates(digits_bank, tmp_path / "none", threshold=1.0, k=3)
    assert result.summary["groups"] == 0 and result.summary["kept"] == result.summary["rows"]
    assert len(read_csv(tmp_path / "none" / "keep.csv")) == result.summary["rows"]
    assert read_csv(tmp_path / "none" / "drop.csv") == [] and read_csv(tmp_path / "none" / "groups.csv") == []
    assert group_rows(3, np.zeros(0, np.int64), np.zeros(0, np.int64))[0].tolist() == [-1, -1, -1]


def test_edges_are_symmetric_pairs_above_the_threshold():
    rows = np.array([[1, 2], [0, 2], [0, 1]])
    sims = np.array([[0.95, 0.5], [0.95, 0.91], [0.5, 0.91]], np.float32)
    a, b, s = duplicate_edges(rows, sims, 0.9)
    assert (a.tolist(), b.tolist()) == ([0, 1], [1, 2])
    np.testing.assert_allclose(s, [0.95, 0.91], rtol=1e-6)


@pytest.fixture(scope="module")
def planted_bank(cifar_root, tmp_path_factory, make_encoder) -> Path:
    """300 CIFAR-10 test images plus 3 copies (JPEG q95, JPEG q50, 2x enlarged) of 20 of them, embedded by a
    random-init small CNN at 32 px."""
    root = tmp_path_factory.mktemp("planted")
    images = sorted((cifar_root / "test").glob("*/*.jpg"))
    images = [images[i] for i in sorted(np.random.default_rng(0).choice(len(images), 300, replace=False))]
    data = plant(images, root / "data", list(range(0, 300, 15)), ["jpeg95", "jpeg50", "up2x"])
    encoder = make_encoder(root / "encoder.pt", image_size=32)
    return export_bank(encoder, f"folder:{data}", root / "bank.h5", workers=0).path


@pytest.mark.cifar
def test_planted_duplicates_are_found_kept_and_dropped(planted_bank, tmp_path):
    with FeatureBank.open(planted_bank) as bank:
        paths, x = bank.paths(), bank.features()
    family = families(paths)
    sims = x @ x.T
    originals = {row for row, path in enumerate(paths) if "__" not in Path(path).name}
    head = {family[row]: row for row in originals}
    to_original = [sims[row, head[family[row]]] for row in range(len(paths)) if row not in originals]
    other_family = family[:, None] != family[None, :]
    # the threshold separates every copy's similarity to its original from any two images of other families
    assert min(to_original) > 0.9975 > sims[other_family].max()
    out = tmp_path / "dedup"
    result = invoke("dedup", planted_bank, "--threshold", 0.9975, "-k", 5, "--out", out, "--json", "--quiet")
    assert result.exit_code == 0, result.output
    summary = json.loads(result.output)
    assert (summary["rows"], summary["groups"], summary["rows_in_groups"]) == (360, 20, 80)
    assert (summary["kept"], summary["dropped"]) == (300, 60)

    groups = read_csv(out / "groups.csv")
    found = {}
    for line in groups:
        found.setdefault(int(line["group"]), set()).add(int(line["row"]))
    planted = {
        frozenset(np.flatnonzero(family == f).tolist()) for f in np.unique(family) if (family == f).sum() > 1
    }
    assert {frozenset(rows) for rows in found.values()} == planted

    keep = read_csv(out / "keep.csv")
    assert {int(line["row"]) for line in keep} == originals  # "first": the original sorts before its copies
    assert all(line["path"] == paths[int(line["row"])] for line in keep)
    drop = read_csv(out / "drop.csv")
    assert {int(line["row"]) for line in drop} == set(range(360)) - originals
    for line in drop:
        row, kept = int(line["row"]), int(line["kept_row"])
        assert family[row] == family[kept] and kept in originals
        assert float(line["similarity"]) == pytest.approx(float(sims[row, kept]), abs=1e-5)

    report = (out / "report" / "index.html").read_text()
    assert report.count("<tr>") == 20 and len(list((out / "report" / "thumbs").glob("r*.png"))) == 80


@pytest.mark.cifar
def test_another_threshold_reuses_the_search(planted_bank, tmp_path):
    out = tmp_path / "dedup"
    searched = []
    first = find_duplicates(
        planted_bank, out, threshold=0.9975, k=5, progress=lambda d, t: searched.append(d)
    )
    assert searched == [360]
    looser = find_duplicates(
        planted_bank, out, threshold=0.99, k=5, keep="central", progress=lambda d, t: searched.append(d)
    )
    assert searched == [360]  # nothing was searched again
    assert looser.summary["rows_in_groups"] > first.summary["rows_in_groups"]
    assert json.loads((out / "summary.json").read_text())["threshold"] == 0.99


@pytest.fixture(scope="module")
def digits_bank(tmp_path_factory, make_encoder) -> Path:
    root = tmp_path_factory.mktemp("digits")
    return export_bank(make_encoder(root / "encoder.pt"), "digits", root / "bank.h5", workers=0).path


def test_interrupted_search_resumes_to_the_same_lists(digits_bank, tmp_path):
    whole = find_duplicates(digits_bank, tmp_path / "whole", threshold=0.995, k=4, chunk_rows=200)

    def stop_after_two_chunks(done, total):
        if done >= 400:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        find_duplicates(
            digits_bank,
            tmp_path / "cut",
            threshold=0.995,
            k=4,
            chunk_rows=200,
            progress=stop_after_two_chunks,
        )
    assert not (tmp_path / "cut" / "summary.json").exists()
    seen = []
    resumed = find_duplicates(
        digits_bank,
        tmp_path / "cut",
        threshold=0.995,
        k=4,
        chunk_rows=200,
        progress=lambda d, t: seen.append(d),
    )
    assert seen[0] == 600  # continued after the two finished chunks
    for name in ("group", "kept", "representative", "similarity"):
        np.testing.assert_array_equal(getattr(resumed.groups, name), getattr(whole.groups, name))
    for name in ("groups.csv", "keep.csv", "drop.csv"):
        assert (tmp_path / "cut" / name).read_bytes() == (tmp_path / "whole" / name).read_bytes()


def test_parquet_tables_and_search_through_an_index(digits_bank, tmp_path):
    import pyarrow.parquet as pq

    build_index(digits_bank, tmp_path / "idx", factory="Flat")
    exact = find_duplicates(digits_bank, tmp_path / "exact", threshold=0.995, k=4)
    result = invoke(
        "dedup", tmp_path / "idx", "--approximate", "--threshold", 0.995, "-k", 4,
        "--format", "parquet", "--report-groups", 0, "--out", tmp_path / "approx", "--json", "--quiet",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    summary = json.loads(result.output)
    assert summary["search"] == "approximate" and "report" not in summary
    drop = pq.read_table(tmp_path / "approx" / "drop.parquet").to_pydict()
    assert drop["row"] == np.flatnonzero(~exact.groups.kept).tolist()  # a Flat index finds the same rows
    assert drop["kept_row"] == exact.groups.representative[~exact.groups.kept].tolist()


def test_bad_input_is_one_line(digits_bank, tmp_path):
    (tmp_path / "file").write_text("x")
    cases = [
        (["dedup", digits_bank, "--threshold", 1.5, "--out", tmp_path / "o"], "1.5 is not in the range"),
        (["dedup", digits_bank, "--out", tmp_path / "o"], "Missing option '--threshold'"),
        (
            ["dedup", digits_bank, "--threshold", 0.9, "--approximate", "--out", tmp_path / "o"],
            "index directory",
        ),
        (["dedup", digits_bank, "--threshold", 0.9, "--out", tmp_path / "file"], "is a file"),
        (["dedup", tmp_path / "nope.h5", "--threshold", 0.9, "--out", tmp_path / "o"], "nope.h5"),
    ]
    for args, message in cases:
        result = invoke(*args)
        assert result.exit_code == 2 and message in result.output, (args, result.output)
        assert len(result.output.strip().splitlines()) == 1 and not (tmp_path / "o").exists()
    tiny = write_bank(tmp_path / "one.h5", np.ones((1, 4), np.float32), labels=np.zeros(1), fingerprint="x")
    with pytest.raises(IsdError, match="at least 2 bank rows"):
        find_duplicates(tiny, tmp_path / "o", threshold=0.9)
    with pytest.raises(InvalidArgument, match="table_format"):
        find_duplicates(digits_bank, tmp_path / "o", threshold=0.9, table_format="xlsx")
