"""The one index interface on the FAISS backend: label filters through FAISS's ID selector on every index
kind we build (in RAM and on disk), the exact fallback where a kind refuses a selector, and opening any
index directory by its manifest's backend."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from isdretrieve.bank.arrays import write_bank
from isdretrieve.data.open import open_dataset
from isdretrieve.errors import IsdError, QueryError
from isdretrieve.files.manifest import read_manifest
from isdretrieve.index.backend import LabelFilter
from isdretrieve.index.build import build_index
from isdretrieve.index.exact import bank_exact_search
from isdretrieve.index.open import open_index
from isdretrieve.index.search import SearchIndex
from isdretrieve.retrieve.retriever import Retriever

KINDS = [("Flat", False), ("HNSW16", False), ("IVF16,Flat", False), ("IVF16,SQ8", False), ("IVF16,SQ8", True)]


@pytest.fixture(scope="module")
def digits_bank(tmp_path_factory):
    """The 1,797 digits images' pixels (64 values each) as a bank with their labels."""
    train, test = open_dataset("digits"), open_dataset("digits", split="test")
    x = np.concatenate([d.load_all().flatten(1).float().numpy() for d in (train, test)])
    labels = np.concatenate([train.labels.numpy(), test.labels.numpy()])
    path = tmp_path_factory.mktemp("digits") / "bank.h5"
    return write_bank(path, x, labels=labels, fingerprint="digits-pixels", data_spec="digits")


def test_label_filter_values():
    assert LabelFilter.of(None) is None
    assert LabelFilter.of(3).expression() == "label == 3"
    assert LabelFilter.of([5, 3, 3]).expression() == "label in [3, 5]"
    assert LabelFilter.of(np.int64(7)).labels == (7,)
    with pytest.raises(QueryError, match="at least one label"):
        LabelFilter.of([])
    with pytest.raises(QueryError, match="whole numbers"):
        LabelFilter.of(["cat"])


@pytest.mark.parametrize(
    ("factory", "on_disk"), KINDS, ids=[f"{f}{'-ondisk' if d else ''}" for f, d in KINDS]
)
def test_label_filter_through_the_id_selector(digits_bank, tmp_path, factory, on_disk):
    """Every hit passes the filter; exact kinds return exactly the exact filtered answer, approximate kinds
    nearly (the same search, restricted), on an on-disk IVF too."""
    build_index(digits_bank, tmp_path / "idx", factory=factory, on_disk=on_disk, recall_target=0.99)
    with open_index(tmp_path / "idx") as index:
        assert isinstance(index, SearchIndex) and index.backend == "faiss"
        labels, queries = index.bank.labels(), index.bank.features(0, 40)
        wanted = LabelFilter.of([3, 5])
        scores, rows = index.search(queries, 10, filter=wanted)
        assert rows.shape == (40, 10) and (rows >= 0).all()
        assert np.isin(labels[rows], [3, 5]).all()
        truth = bank_exact_search(index.bank, queries, 10, wanted.rows(labels))[1]
        overlap = np.mean([len(np.intersect1d(a, b)) / 10 for a, b in zip(rows, truth, strict=True)])
        assert overlap == 1.0 if factory == "Flat" else overlap >= 0.9, overlap
        unfiltered = index.search(queries, 10)[1]
        assert not np.isin(labels[unfiltered], [3, 5]).all()  # the filter did something


def test_refine_wrapper_falls_back_to_exact(digits_bank, tmp_path):
    """``IndexRefine`` refuses an ID selector: the filtered search is then exact over the allowed rows."""
    build_index(digits_bank, tmp_path / "idx", factory="IVF16,SQ8,RFlat", recall_target=0.9)
    with open_index(tmp_path / "idx") as index:
        queries, labels = index.bank.features(100, 120), index.bank.labels()
        scores, rows = index.search(queries, 5, filter=LabelFilter.of(1))
        exact_scores, exact_rows = bank_exact_search(index.bank, queries, 5, LabelFilter.of(1).rows(labels))
        assert np.array_equal(rows, exact_rows) and (labels[rows] == 1).all()


def test_a_narrow_filter_leaves_missing_hits(digits_bank, tmp_path):
    """A filter that fewer than k rows pass: the rest of the list is row -1 (as FAISS reports missing)."""
    labels = np.array([0, 0, 1, 1, 1, 2])
    write_bank(tmp_path / "few.h5", np.eye(6, dtype=np.float32), labels=labels, fingerprint="eye")
    build_index(tmp_path / "few.h5", tmp_path / "idx", factory="Flat")
    with open_index(tmp_path / "idx") as index:
        scores, rows = index.search(np.eye(6, dtype=np.float32)[:1], 4, filter=LabelFilter.of([0, 2]))
    assert rows[0, 0] == 0 and set(rows[0, 1:3]) == {1, 5} and rows[0, 3] == -1
    assert scores[0, 0] == pytest.approx(1.0)


def test_retriever_filters_by_class(digits_bank, tmp_path):
    build_index(digits_bank, tmp_path / "idx", factory="Flat")
    with Retriever.open(tmp_path / "idx") as r:
        x = r.index.bank.features(0, 3)
        hits = r.search_vectors(x, k=8, labels=7)
        assert all(h.label == 7 for row in hits for h in row) and all(len(row) == 8 for row in hits)
        found = r.neighbours([0, 1], k=5, labels=[2, 4])
        assert all(h.label in (2, 4) and h.row not in (0, 1) for result in found for h in result.hits)


def test_open_index_follows_the_backend(digits_bank, tmp_path):
    """A manifest names its backend: FAISS opens as a SearchIndex; SearchIndex refuses a Milvus manifest;
    an unknown backend is one error line."""
    build_index(digits_bank, tmp_path / "idx", factory="Flat")
    assert read_manifest(tmp_path / "idx").backend == "faiss"
    for name, backend in (("milvus", "milvus"), ("other", "elasticsearch")):
        shutil.copytree(tmp_path / "idx", tmp_path / name)
        manifest = json.loads((tmp_path / name / "manifest.json").read_text())
        (tmp_path / name / "manifest.json").write_text(json.dumps({**manifest, "backend": backend}))
    with pytest.raises(IsdError, match="is a milvus index"):
        SearchIndex.open(tmp_path / "milvus")
    with pytest.raises(IsdError, match="unknown backend 'elasticsearch'"):
        open_index(tmp_path / "other")
