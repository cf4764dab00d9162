"""The on-disk IVF index (sharded build, merge, memory-mapped search), held-out recall, mining through it."""

from __future__ import annotations

import json

import faiss
import numpy as np
import pytest
from click.testing import CliRunner

from isdretrieve.bank.arrays import write_bank
from isdretrieve.cli.index import main as index_cli
from isdretrieve.errors import BankError, IsdError
from isdretrieve.files.manifest import RECALL_PROTOCOL
from isdretrieve.files.pairs import MiningParams
from isdretrieve.index import ondisk as index_ondisk
from isdretrieve.index.build import build_index
from isdretrieve.index.exact import bank_exact_search
from isdretrieve.index.ondisk import IVFDATA_FILE, is_ondisk
from isdretrieve.index.partial_build import PARTIAL_DIR
from isdretrieve.index.plan import choose_index
from isdretrieve.index.recall import recall_at_k
from isdretrieve.index.search import SearchIndex
from isdretrieve.mine.mining import mine_pairs


@pytest.fixture(scope="module")
def mixture() -> np.ndarray:
    """20,000 x 32 unit vectors from a mixture of 256 Gaussians (fixed seed)."""
    rng = np.random.default_rng(0)
    centres = rng.standard_normal((256, 32)).astype(np.float32)
    x = centres[rng.integers(0, 256, 20_000)] + 0.5 * rng.standard_normal((20_000, 32), dtype=np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


@pytest.fixture(scope="module")
def mixture_bank(tmp_path_factory, mixture):
    labels = np.arange(len(mixture)) % 7
    return write_bank(tmp_path_factory.mktemp("mix") / "bank.h5", mixture, labels=labels, fingerprint="mix")


@pytest.fixture(scope="module")
def ondisk_dir(tmp_path_factory, mixture_bank):
    out = tmp_path_factory.mktemp("ondisk") / "idx"
    build_index(
        mixture_bank, out, factory="IVF32,SQ8", on_disk=True, shard_rows=6000, queries=300, recall_target=0.9
    )
    return out


def test_ondisk_build_is_sharded_merged_and_memory_mapped(ondisk_dir, mixture):
    manifest = json.loads((ondisk_dir / "manifest.json").read_text())
    assert (manifest["kind"], manifest["shards"], manifest["factory"]) == ("ondisk", 4, "IVF32,SQ8")
    assert manifest["ivfdata_bytes"] == 20_000 * (32 + 8)  # SQ8 code + id per row, all on disk
    assert manifest["index_bytes"] == manifest["ivfdata_bytes"] + (ondisk_dir / "index.faiss").stat().st_size
    names = sorted(p.name for p in ondisk_dir.iterdir())
    assert names == [
        "bank.h5",
        "index.faiss",
        IVFDATA_FILE,
        "manifest.json",
    ]  # shards removed after the merge
    with SearchIndex.open(ondisk_dir) as index:
        assert is_ondisk(index._index) and index._index.nprobe == manifest["params"]["nprobe"]
        rows = index.search(mixture[:50], 10)[1]
    assert (rows[:, 0] == np.arange(50)).mean() > 0.9  # a bank row finds itself


def test_ondisk_search_equals_in_ram_ivf(ondisk_dir, mixture_bank, mixture, tmp_path):
    build_index(mixture_bank, tmp_path / "ram", factory="IVF32,SQ8", queries=30, recall_target=0.9)
    with SearchIndex.open(ondisk_dir) as disk, SearchIndex.open(tmp_path / "ram") as ram:
        assert not is_ondisk(ram._index)
        quantizer = [faiss.extract_index_ivf(i._index).quantizer for i in (disk, ram)]
        np.testing.assert_array_equal(*(q.reconstruct_n(0, q.ntotal) for q in quantizer))  # same training
        queries = mixture[::97] + 0.05
        for nprobe in (1, 4, 32):
            disk._index.nprobe = ram._index.nprobe = nprobe
            disk_scores, disk_rows = disk.search(queries, 10)
            ram_scores, ram_rows = ram.search(queries, 10)
            np.testing.assert_array_equal(disk_rows, ram_rows)
            np.testing.assert_allclose(disk_scores, ram_scores, rtol=1e-6)


def test_interrupted_ondisk_build_resumes_with_its_shards(mixture_bank, tmp_path, monkeypatch):
    out = tmp_path / "idx"

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(index_ondisk, "merge_ondisk", full_disk)
    with pytest.raises(OSError, match="No space"):
        build_index(
            mixture_bank,
            out,
            factory="IVF32,SQ8",
            on_disk=True,
            shard_rows=6000,
            queries=100,
            recall_target=0.9,
        )
    partial = sorted(p.name for p in (out / PARTIAL_DIR).iterdir())
    assert partial == ["build.json", *(f"shard-{s:05d}.faiss" for s in range(4)), "trained.faiss"]
    assert not (out / "manifest.json").exists() and not (out / IVFDATA_FILE).exists()

    monkeypatch.undo()
    cloned = []
    clone = faiss.clone_index
    monkeypatch.setattr(index_ondisk.faiss, "clone_index", lambda i: cloned.append(1) or clone(i))
    manifest = build_index(
        mixture_bank, out, factory="IVF32,SQ8", on_disk=True, shard_rows=6000, queries=100, recall_target=0.9
    )
    assert not cloned and manifest.shards == 4 and manifest.train_rows == 20_000  # nothing redone
    assert not (out / PARTIAL_DIR).exists()
    # another shard size is another build: the partial state is not reused
    manifest = build_index(
        mixture_bank, out, factory="IVF32,SQ8", on_disk=True, shard_rows=9000, queries=100, recall_target=0.9
    )
    assert manifest.shards == 3 and len(cloned) == 3


def test_auto_chooses_ondisk_under_a_tiny_budget(mixture_bank, tmp_path):
    plan = choose_index(20_000, 32, memory_budget=100_000)
    assert plan.on_disk and plan.factory == "IVF512,SQ8" and "no in-RAM index fits" in plan.reason
    manifest = build_index(
        mixture_bank, tmp_path / "auto", memory_budget=100_000, queries=300, recall_target=0.9
    )
    assert (manifest.kind, manifest.factory, manifest.memory_budget) == ("ondisk", "IVF512,SQ8", 100_000)
    assert manifest.shards == 2 and "on disk" in manifest.reason  # 10,000-row shards (the minimum)
    assert manifest.recall >= 0.9
    with SearchIndex.open(tmp_path / "auto") as index:
        assert index.recall(k=10, queries=300, seed=0) == pytest.approx(manifest.recall)


def test_recall_is_held_out(ondisk_dir, tmp_path):
    manifest = json.loads((ondisk_dir / "manifest.json").read_text())
    assert manifest["recall_protocol"] == RECALL_PROTOCOL and manifest["recall_queries"] == 300
    with SearchIndex.open(ondisk_dir) as index:
        assert index.recall(k=10, queries=300, seed=0) == pytest.approx(manifest["recall"])
    # unclustered rows, one list probed: recall is low, and a query's own row (always in its own list)
    # would flatter it if it counted
    x = np.random.default_rng(1).standard_normal((5000, 32)).astype(np.float32)
    build_index(x, tmp_path / "random", factory="IVF32,Flat", queries=200, recall_target=0.5)
    with SearchIndex.open(tmp_path / "random") as index:
        index._index.nprobe = 1
        held_out = index.recall(k=10, queries=200, seed=0)
        rows = np.sort(np.random.default_rng(0).choice(5000, 200, replace=False))
        queries = index.bank.features()[rows]
        with_self = recall_at_k(index.search(queries, 10)[1], bank_exact_search(index.bank, queries, 10)[1])
    assert held_out < with_self - 0.03


def test_mine_through_the_index(ondisk_dir, mixture_bank, tmp_path):
    exact = mine_pairs(mixture_bank, tmp_path / "exact.h5", MiningParams(k=5))
    approx = mine_pairs(mixture_bank, tmp_path / "approx.h5", MiningParams(k=5), index=ondisk_dir)
    assert exact.attrs["search"] == "exact" and exact.search_recall == 1.0
    assert approx.attrs["search"] == "approximate" and approx.attrs["index_factory"] == "IVF32,SQ8"
    assert approx.attrs["search_recall_queries"] == 1000
    overlap = np.mean(
        [
            len(np.intersect1d(a, b)) / 5
            for a, b in zip(approx.candidate_rows, exact.candidate_rows, strict=True)
        ]
    )
    assert 0.9 <= approx.search_recall < 1.0 and approx.search_recall == pytest.approx(overlap, abs=0.03)
    assert (approx.candidate_rows >= 0).all()
    assert (approx.candidate_rows != np.arange(20_000)[:, None]).all()  # self excluded
    with pytest.raises(BankError, match="exact search"):  # an approximate rerun does not reuse exact pairs
        mine_pairs(mixture_bank, tmp_path / "exact.h5", MiningParams(k=5), index=ondisk_dir)


def test_mine_approximate_cli_reports_recall_in_the_audit(ondisk_dir, tmp_path):
    out = tmp_path / "pairs.h5"
    args = ["mine", str(ondisk_dir), "--out", str(out), "--approximate", "--audit", "--quiet"]
    result = CliRunner().invoke(index_cli, args)
    assert result.exit_code == 0, result.output
    assert "approximate search recall@5" in result.output
    audit = json.loads((tmp_path / "pairs.audit.json").read_text())
    assert audit["search"]["kind"] == "approximate" and 0.9 <= audit["search"]["recall"] < 1.0
    bank_only = CliRunner().invoke(
        index_cli, ["mine", str(ondisk_dir / "bank.h5"), "--out", str(out), "--approximate"]
    )
    assert bank_only.exit_code == 2 and "index directory" in bank_only.output


def test_ondisk_needs_an_ivf_and_its_lists(mixture_bank, tmp_path):
    for factory in ("Flat", "HNSW8"):
        with pytest.raises(IsdError, match="on-disk index must be an IVF"):
            build_index(mixture_bank, tmp_path / "x", factory=factory, on_disk=True)
    build_index(mixture_bank, tmp_path / "idx", factory="IVF16,SQ8", on_disk=True, queries=50)
    (tmp_path / "idx" / IVFDATA_FILE).unlink()
    with pytest.raises(IsdError, match=f"{IVFDATA_FILE} is missing"):
        SearchIndex.open(tmp_path / "idx")
