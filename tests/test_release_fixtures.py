"""Files written by release 0.1.0 (``tests/fixtures/release-0.1.0``) open and work with this code: an
encoder, a bank it exported, a bank of outside features, a Flat and an IVF index over it, a pairs file."""

from __future__ import annotations

import gzip
import shutil
from pathlib import Path

import numpy as np
import pytest

from isdretrieve.bank.export import export_bank
from isdretrieve.data.open import open_dataset
from isdretrieve.encoder import FrozenEncoder
from isdretrieve.files.bank import FeatureBank
from isdretrieve.files.manifest import describe_index
from isdretrieve.files.pairs import MiningParams, Pairs
from isdretrieve.index.exact import exact_search
from isdretrieve.index.search import SearchIndex
from isdretrieve.mine.mining import mine_pairs
from isdretrieve.retrieve.retriever import Retriever

FIXTURES = Path(__file__).parent / "fixtures" / "release-0.1.0"


@pytest.fixture
def release(tmp_path: Path) -> Path:
    """A copy of the fixtures (nothing is written next to the committed files), encoder.pt unpacked."""
    copy = tmp_path / "release-0.1.0"
    shutil.copytree(FIXTURES, copy)
    with gzip.open(copy / "encoder.pt.gz", "rb") as src, open(copy / "encoder.pt", "wb") as dst:
        shutil.copyfileobj(src, dst)
    return copy


def test_encoder_gives_the_features_it_exported(release: Path, tmp_path: Path) -> None:
    encoder = FrozenEncoder.load(release / "encoder.pt", device="cpu")
    digits = open_dataset("digits,split=test").subset(range(16))
    with FeatureBank.open(release / "encoder-bank.h5") as old:
        assert (old.fingerprint, len(old), old.dim) == (encoder.fingerprint, 16, 256)
        assert old.encoder == encoder.header and old.transform == encoder.transform_name == "eval:digits"
        expected = old.features()
    np.testing.assert_allclose(encoder.embed(digits.load_all()).numpy(), expected, atol=1e-5)
    export_bank(release / "encoder.pt", digits, tmp_path / "new.h5", workers=0, device="cpu")
    with FeatureBank.open(tmp_path / "new.h5") as new:
        assert new.fingerprint == encoder.fingerprint
        np.testing.assert_allclose(new.features(), expected, atol=1e-5)


def test_bank_reads_whole(release: Path) -> None:
    with FeatureBank.open(release / "bank.h5") as bank:
        assert (len(bank), bank.dim, bank.fingerprint) == (300, 32, "fixture-0.1.0")
        assert bank.classes == [f"c{i}" for i in range(6)] and bank.normalized
        assert bank.info.versions["isdretrieve"] == "0.1.0"
        np.testing.assert_allclose(np.linalg.norm(bank.features(), axis=1), 1.0, atol=1e-6)
        assert set(bank.labels().tolist()) == set(range(6))


@pytest.mark.parametrize("kind", ["flat", "ivf"])
def test_index_opens_and_searches(release: Path, kind: str) -> None:
    info = describe_index(release / kind)
    assert info["versions"]["isdretrieve"] == "0.1.0" and info["bank_rows"] == 300
    with SearchIndex.open(release / kind) as index:
        queries = index.bank.features(0, 50)
        scores, rows = index.search(queries, 10)
        truth_scores, truth = exact_search(index.bank.features(), queries, 10, device="cpu")
        found = np.mean([len(np.intersect1d(a, b)) / 10 for a, b in zip(rows, truth, strict=True)])
        assert found >= (1.0 if kind == "flat" else index.manifest.recall - 0.1)
        assert index.recall(k=10, queries=100) >= index.manifest.recall - 0.05
    with Retriever.open(release / kind, device="cpu") as retriever:
        hits = retriever.search_vectors(queries[:3], k=4)
        assert [h.row for h in hits[0]][0] == 0 and hits[0][0].score == pytest.approx(1.0, abs=1e-5)
        assert retriever.neighbours([7], k=3)[0].hits[0].row != 7


def test_pairs_read_and_are_what_this_code_mines(release: Path, tmp_path: Path) -> None:
    old = Pairs.open(release / "pairs.h5")
    assert old.params == MiningParams(k=5, mutual=True, quantile=0.5) and len(old) == 300
    offsets, members = old.in_dataset_space(300)
    assert int(offsets[-1]) == old.num_pairs == len(members)
    new = mine_pairs(release / "bank.h5", tmp_path / "pairs.h5", old.params, device="cpu")
    np.testing.assert_array_equal(new.offsets, old.offsets)
    np.testing.assert_array_equal(new.rows, old.rows)
    np.testing.assert_allclose(new.similarities, old.similarities, atol=1e-6)
