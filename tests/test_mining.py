"""Semantic-positive mining and its audit, on real banks (digits; the CIFAR-10 copy), checked against
independent NumPy computations."""

from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from isdretrieve.bank.export import export_bank
from isdretrieve.cli.index import main as index_cli
from isdretrieve.errors import BankError, IsdError
from isdretrieve.files.bank import FeatureBank
from isdretrieve.files.pairs import MiningParams, Pairs
from isdretrieve.mine.audit import audit_pairs
from isdretrieve.mine.mining import mine_pairs

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def digits_bank(tmp_path_factory, make_encoder) -> Path:
    root = tmp_path_factory.mktemp("mine")
    encoder = make_encoder(root / "enc.pt")
    return export_bank(encoder, "digits", root / "bank.h5", batch_size=256, workers=0).path


def _bank_arrays(path):
    with FeatureBank.open(path) as bank:
        return bank.features().astype(np.float64), bank.labels()


def numpy_candidates(features: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Top-k other rows by cosine similarity, float64, self removed by masking the diagonal."""
    sims = features @ features.T
    np.fill_diagonal(sims, -np.inf)
    rows = np.argsort(-sims, axis=1, kind="stable")[:, :k]
    return rows, np.take_along_axis(sims, rows, axis=1)


def test_candidates_threshold_and_mutual_match_numpy(digits_bank, tmp_path):
    features, _ = _bank_arrays(digits_bank)
    rows, sims = numpy_candidates(features, 4)
    pairs = mine_pairs(digits_bank, tmp_path / "p.h5", MiningParams(k=4, quantile=0.3, mutual=True))
    np.testing.assert_allclose(pairs.candidate_similarities, sims, atol=1e-5)
    agree = (pairs.candidate_rows == rows).mean()
    assert agree > 0.99  # float32 vs float64 may swap near-ties only
    threshold = np.quantile(pairs.candidate_similarities, 0.3)
    assert pairs.threshold == pytest.approx(threshold)
    neighbour_sets = [set(r) for r in pairs.candidate_rows]
    expected = {
        (i, int(j))
        for i, cands in enumerate(pairs.candidate_rows)
        for j, s in zip(cands, pairs.candidate_similarities[i], strict=True)
        if s >= threshold and i in neighbour_sets[j]
    }
    assert set(zip(pairs.anchors().tolist(), pairs.rows.tolist(), strict=True)) == expected
    assert pairs.coverage == pytest.approx(len({i for i, _ in expected}) / len(features))


def test_plain_topk_keeps_every_candidate_and_self_never_appears(digits_bank, tmp_path):
    pairs = mine_pairs(digits_bank, tmp_path / "p.h5", MiningParams(k=3))
    assert pairs.num_pairs == 3 * len(pairs) and pairs.coverage == 1.0
    assert not (pairs.rows == pairs.anchors()).any()
    assert np.all(np.diff(pairs.similarities.reshape(-1, 3), axis=1) <= 1e-6)  # best first


def test_small_chunks_give_the_same_candidates(digits_bank, tmp_path):
    whole = mine_pairs(digits_bank, tmp_path / "a.h5", MiningParams(k=5))
    chunked = mine_pairs(digits_bank, tmp_path / "b.h5", MiningParams(k=5), chunk_rows=97)
    # other query blocks sum in another order: similarities agree to float32 rounding, rows up to ties
    np.testing.assert_allclose(whole.candidate_similarities, chunked.candidate_similarities, atol=1e-6)
    assert (whole.candidate_rows == chunked.candidate_rows).mean() > 0.999


def test_interrupted_search_resumes_and_equals_an_uninterrupted_one(digits_bank, tmp_path, monkeypatch):
    import isdretrieve.mine.mining as mining

    params = MiningParams(k=5, mutual=True)
    reference = mine_pairs(digits_bank, tmp_path / "ref.h5", params, chunk_rows=200)
    calls = {"n": 0}
    real = mining.drop_self_matches

    def fail_on_third_chunk(*args):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real(*args)

    out = tmp_path / "p.h5"
    monkeypatch.setattr(mining, "drop_self_matches", fail_on_third_chunk)
    with pytest.raises(KeyboardInterrupt):
        mine_pairs(digits_bank, out, params, chunk_rows=200)
    monkeypatch.setattr(mining, "drop_self_matches", real)
    assert not out.exists()  # never half-written
    with h5py.File(out.with_name("p.h5.partial"), "r") as f:
        assert int(f.attrs["rows_done"]) == 400
    seen = []
    resumed = mine_pairs(digits_bank, out, params, chunk_rows=200, progress=lambda d, n: seen.append(d))
    assert seen[0] == 600  # continued after the two finished chunks
    assert not out.with_name("p.h5.partial").exists()
    for name in ("offsets", "rows", "similarities", "candidate_rows", "candidate_similarities"):
        np.testing.assert_array_equal(getattr(resumed, name), getattr(reference, name))


def test_rerun_with_same_settings_is_a_no_op_and_other_settings_are_refused(digits_bank, tmp_path):
    out = tmp_path / "p.h5"
    mine_pairs(digits_bank, out, MiningParams(k=2))
    stamp = out.stat().st_mtime_ns
    assert mine_pairs(digits_bank, out, MiningParams(k=2)).num_pairs == 2 * 1347
    assert out.stat().st_mtime_ns == stamp
    with pytest.raises(BankError, match="other settings"):
        mine_pairs(digits_bank, out, MiningParams(k=3))


@pytest.mark.parametrize(
    ("params", "message"),
    [
        (dict(k=0), "k must be at least 1"),
        (dict(k=2, threshold=0.5, quantile=0.5), "not both"),
        (dict(k=2, quantile=1.5), "quantile must be in"),
        (dict(k=2, threshold=2.0), "threshold is a cosine"),
    ],
)
def test_bad_parameters(params, message):
    with pytest.raises(IsdError, match=message):
        MiningParams(**params)


def test_k_of_the_bank_size_is_lowered_with_a_warning(digits_bank, tmp_path):
    with pytest.warns(UserWarning, match="k=1347 lowered to 1346"):
        pairs = mine_pairs(digits_bank, tmp_path / "p.h5", MiningParams(k=1347))
    assert pairs.params.k == 1346 and pairs.candidate_rows.shape == (1347, 1346)
    assert (pairs.candidate_rows != np.arange(1347)[:, None]).all()  # every other row, never itself


def test_audit_against_labels_recomputed_independently(digits_bank, tmp_path):
    pairs = mine_pairs(digits_bank, tmp_path / "p.h5", MiningParams(k=5, quantile=0.5))
    _, labels = _bank_arrays(digits_bank)
    report = audit_pairs(pairs, labels)
    with h5py.File(tmp_path / "p.h5", "r") as f:  # straight from the file, no isdretrieve code
        offsets, rows = f["offsets"][...], f["rows"][...]
    anchors = np.repeat(np.arange(len(offsets) - 1), np.diff(offsets))
    assert report.chosen.precision == pytest.approx((labels[anchors] == labels[rows]).mean())
    assert report.chosen.coverage == pytest.approx((np.diff(offsets) > 0).mean())
    for entry in report.per_class:
        mine = labels[anchors] == entry.label
        assert entry.precision == pytest.approx((labels[rows[mine]] == entry.label).mean())
        assert entry.rows == (labels == entry.label).sum()
        covered = np.diff(offsets)[labels == entry.label] > 0
        assert entry.coverage == pytest.approx(covered.mean())
    assert [p.k for p in report.k_curve] == [1, 2, 3, 4, 5]
    assert report.k_curve[-1].precision == pytest.approx(report.chosen.precision)
    coverages = [p.coverage for p in report.threshold_curve]
    assert coverages == sorted(coverages, reverse=True)  # higher threshold, fewer rows covered


def test_cli_mine_with_audit_writes_json_and_png(digits_bank, tmp_path):
    out = tmp_path / "pairs.h5"
    args = ["mine", str(digits_bank), "--out", str(out), "-k", "3", "--mutual", "--audit", "--quiet"]
    result = CliRunner().invoke(index_cli, args)
    assert result.exit_code == 0, result.output
    assert "pairs over 1,347 rows" in result.output and "audit: precision" in result.output
    report = json.loads((tmp_path / "pairs.audit.json").read_text())
    assert 0.0 <= report["chosen"]["precision"] <= 1.0 and len(report["per_class"]) == 10
    image = np.asarray(Image.open(tmp_path / "pairs.audit.png").convert("RGB"))
    assert image.shape[1] > image.shape[0] and len(np.unique(image.reshape(-1, 3), axis=0)) > 3


def test_cli_mine_bad_input_is_one_line(tmp_path):
    result = CliRunner().invoke(index_cli, ["mine", str(tmp_path / "nope"), "--out", str(tmp_path / "p.h5")])
    assert result.exit_code == 2
    assert result.output.strip().splitlines() == [f"error: feature bank {tmp_path / 'nope'} not found"]


@pytest.mark.cifar
@pytest.mark.slow
def test_cifar_mining_precision_recomputed_from_pairs_file(cifar_root, tmp_path):
    """A (briefly) trained encoder's CIFAR-10 bank: pairs.h5 + labels give the audit's precision."""
    from isdretrieve.train.engine import Trainer
    from isdretrieve.train.recipe import recipe_from_data

    recipe = recipe_from_data(
        {
            "method": {"name": "isd", "queue_size": 1024},
            "data": {"train": f"folder:{cifar_root},split=test", "preset": "cifar", "workers": 2},
            "optim": {"batch_size": 128, "epochs": 1, "max_steps": 8},
            "monitor": {"every": 0},
        }
    )
    run = Trainer(recipe, tmp_path / "run", quiet=True).fit()
    bank = export_bank(run.encoder, f"folder:{cifar_root},split=test", tmp_path / "bank.h5", workers=2).path
    out = tmp_path / "pairs.h5"
    args = ["mine", str(bank), "--out", str(out), "-k", "5", "--mutual", "--quantile", "0.5"]
    result = CliRunner().invoke(index_cli, [*args, "--audit", "--quiet"])
    assert result.exit_code == 0, result.output
    audit = json.loads((tmp_path / "pairs.audit.json").read_text())["chosen"]
    with h5py.File(out, "r") as f, h5py.File(bank, "r") as b:
        offsets, rows, labels = f["offsets"][...], f["rows"][...], b["labels"][...]
    anchors = np.repeat(np.arange(len(offsets) - 1), np.diff(offsets))
    assert audit["precision"] == pytest.approx((labels[anchors] == labels[rows]).mean())
    assert audit["coverage"] == pytest.approx((np.diff(offsets) > 0).mean())
    assert audit["precision"] > 0.15  # above the 0.1 of random partners on 10 balanced classes
    assert Pairs.open(out).attrs["dataset_size"] == 10_000
