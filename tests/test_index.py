"""FAISS index: the auto rule, exact Flat, tuning of approximate indices, and the index directory's checks."""

from __future__ import annotations

import json

import faiss
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from isdretrieve.bank.arrays import write_bank
from isdretrieve.data.augment import augment_views, eval_view, view_config
from isdretrieve.data.open import open_dataset
from isdretrieve.errors import BankError, IsdError
from isdretrieve.files import bank as bank_module
from isdretrieve.files.manifest import INDEX_FORMAT, IndexManifest
from isdretrieve.index.build import build_index
from isdretrieve.index.exact import exact_search, exact_search_torch
from isdretrieve.index.faiss_ops import make_index
from isdretrieve.index.plan import choose_index, estimate_bytes, ivf_lists
from isdretrieve.index.planner import Trial, candidates, one_faiss_thread, pick_trial, plan_index
from isdretrieve.index.search import SearchIndex
from isdretrieve.index.tuning import crossing, finer, raise_knob
from isdretrieve.models.backbones import build_backbone

MiB, GiB = 2**20, 2**30


# ------------------------------------------------------------------------------------------ data
@pytest.fixture(scope="module")
def digits_cnn() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Random-init small_cnn features of the digits eval views: (train [1347,256], labels, test [450,256])."""
    torch.manual_seed(0)
    model = build_backbone("small_cnn").eval()
    train, test = open_dataset("digits"), open_dataset("digits", split="test")
    with torch.no_grad():
        f_train = F.normalize(model(eval_view(train.load_all(), "digits")), dim=1)
        f_test = F.normalize(model(eval_view(test.load_all(), "digits")), dim=1)
    return f_train.numpy(), train.labels.numpy(), f_test.numpy()


@pytest.fixture(scope="module")
def digits_views() -> tuple[np.ndarray, np.ndarray]:
    """Pixels of 20 random crops + flips of each digits train image: 26,940 rows of 256 values."""
    dataset = open_dataset("digits")
    images, generator = dataset.load_all(), torch.Generator().manual_seed(0)
    cfg = view_config("weak", "digits")
    views = [augment_views(images, cfg, generator)[:, 0].flatten(1) for _ in range(20)]
    return torch.cat(views).numpy(), dataset.labels.repeat(20).numpy()


@pytest.fixture
def faiss_one_thread():
    """One FAISS thread: on a busy 2-core machine two threads spin at each other's barriers."""
    with one_faiss_thread():
        yield


@pytest.fixture(scope="module")
def cnn_bank(tmp_path_factory, digits_cnn):
    features, labels, _ = digits_cnn
    path = tmp_path_factory.mktemp("cnn") / "source.h5"
    return write_bank(path, features, labels=labels, fingerprint="cnn-seed0", data_spec="digits")


@pytest.fixture(scope="module")
def ivf_dir(tmp_path_factory, digits_views):
    """An IVF64,Flat index over the augmented digits, tuned to recall@10 >= 0.95."""
    features, labels = digits_views
    out = tmp_path_factory.mktemp("ivf")
    write_bank(out / "bank.h5", features, labels=labels, fingerprint="pixels")
    build_index(out / "bank.h5", out, factory="IVF64,Flat", recall_target=0.95, k=10, queries=500)
    return out


# ------------------------------------------------------------------------------------ choose_index
@pytest.mark.parametrize(
    ("n", "dim", "budget", "factory"),
    [
        (1_797, 64, None, "Flat"),  # small: exact
        (1_000_000, 256, GiB, "Flat"),  # 1M x 256 x 4 B = 1 GiB: exactly fits
        (1_000_001, 256, 8 * GiB, "HNSW32"),  # above 1M rows: approximate even though Flat fits
        (1_000_000, 256, 900 * MiB, "IVF4096,SQ8"),  # Flat 977 MiB, HNSW32 and IVF4096,Flat over the budget
        (500_000, 256, 256 * MiB, "IVF2048,SQ8"),  # the benchmark's setting: SQ8 needs 128 MiB
        (500_000, 256, 100 * MiB, "IVF2048,PQ128"),  # SQ8 too big; largest PQ with m <= dim/2
        (500_000, 256, 40 * MiB, "IVF2048,PQ64"),  # PQ128 needs 67 MiB
        (3_000_000, 512, 64 * GiB, "IVF8192,Flat"),  # too many rows for Flat and HNSW, but vectors fit
        (100_000_000, 512, 64 * GiB, "IVF32768,SQ8"),
        (100_000_000, 512, 32 * GiB, "IVF32768,PQ256"),
    ],
)
def test_choose_index_rule(n, dim, budget, factory):
    plan = choose_index(n, dim, memory_budget=budget)
    assert plan.factory == factory, plan.reason
    assert plan.estimated_bytes <= (budget or plan.estimated_bytes)
    assert plan.reason


def test_choose_index_limits():
    assert choose_index(1_000, 256, memory_budget=None).factory == "Flat"  # default: half the RAM
    assert [ivf_lists(n) for n in (5_000, 100_000, 500_000, 2_000_000, 10**10)] == [
        128,
        1024,
        2048,
        4096,
        65536,
    ]
    on_disk = choose_index(500_000, 256, memory_budget=4 * MiB)  # not even IVF2048,PQ1 fits in RAM
    assert (on_disk.factory, on_disk.on_disk) == ("IVF2048,SQ8", True) and "on disk" in on_disk.reason
    assert on_disk.estimated_bytes <= 4 * MiB and on_disk.disk_bytes == 500_000 * (256 + 8)
    with pytest.raises(IsdError, match="no index"):  # the on-disk index's 2 MiB of centroids do not fit
        choose_index(500_000, 256, memory_budget=1 * MiB)
    with pytest.raises(ValueError):
        choose_index(0, 256)


# ---------------------------------------------------------------------------------------- exact
def test_flat_search_equals_numpy(tmp_path, cnn_bank, digits_cnn):
    features, _, test = digits_cnn
    manifest = build_index(cnn_bank, tmp_path / "flat", factory="auto")
    assert (manifest.factory, manifest.recall, manifest.params) == ("Flat", 1.0, {})
    assert (tmp_path / "flat" / "bank.h5").is_file()  # the directory holds its bank

    k = 7
    sims = test.astype(np.float64) @ features.T.astype(np.float64)
    order = np.argsort(-sims, axis=1)[:, : k + 1]
    top = np.take_along_axis(sims, order, 1)
    test = test[np.diff(-top, axis=1).min(axis=1) > 1e-5]  # queries without near-ties in their top k+1
    assert len(test) > 300
    sims = test.astype(np.float64) @ features.T.astype(np.float64)
    order = np.argsort(-sims, axis=1)[:, :k]
    want = np.take_along_axis(sims, order, 1)
    with SearchIndex.open(tmp_path / "flat") as index:
        scores, rows = index.search(torch.from_numpy(test), k)
        assert scores.dtype == np.float32 and rows.dtype == np.int64
        np.testing.assert_array_equal(rows, order)
        np.testing.assert_allclose(scores, want, atol=1e-5)
        one_scores, one_rows = index.search(test[3] * 5.0, k)  # a single unnormalised query
        np.testing.assert_array_equal(one_rows[0], order[3])
        np.testing.assert_allclose(one_scores[0], want[3], atol=1e-5)
        with pytest.raises(IsdError, match="k must be"):
            index.search(test, 0)
        with pytest.warns(UserWarning, match=f"lowered to {len(features)}"):  # more than the bank: all rows
            assert index.search(test[:2], len(features) + 1)[1].shape == (2, len(features))
        with pytest.raises(IsdError, match="shape"):
            index.search(test[:, :10], 3)


def test_exact_search_torch_equals_faiss(digits_cnn):
    features, _, test = digits_cnn
    faiss_scores, faiss_rows = exact_search(features, test, 10, device="cpu")
    torch_scores, torch_rows = exact_search_torch(
        torch.from_numpy(features), torch.from_numpy(test), 10, chunk=64
    )
    np.testing.assert_allclose(torch_scores, faiss_scores, atol=1e-5)
    # rows agree except where two neighbours' scores tie to float32 rounding (the GEMMs sum in other orders)
    exact = np.abs(np.diff(faiss_scores, axis=1)) > 1e-5
    clear = np.ones_like(faiss_rows, dtype=bool)
    clear[:, 1:] &= exact
    clear[:, :-1] &= exact
    np.testing.assert_array_equal(torch_rows[clear], faiss_rows[clear])
    assert clear.mean() > 0.9


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_exact_search_on_cuda_equals_cpu(tmp_path, cnn_bank, digits_cnn):
    features, _, test = digits_cnn
    cpu_scores, cpu_rows = exact_search(features, test, 10, device="cpu")
    cuda_scores, cuda_rows = exact_search(features, test, 10, device="cuda")
    assert (cuda_rows == cpu_rows).mean() > 0.99  # near-ties may swap
    np.testing.assert_allclose(cuda_scores, cpu_scores, atol=1e-5)
    manifest = build_index(cnn_bank, tmp_path / "flat", factory="Flat")
    assert manifest.gpu
    with SearchIndex.open(tmp_path / "flat") as index:
        scores, rows = index.search(test, 10)
    np.testing.assert_allclose(scores, cpu_scores, atol=1e-5)


# ---------------------------------------------------------------------------------- approximate
def test_ivf_reaches_recall_target_after_tuning(ivf_dir):
    manifest = IndexManifest.from_json((ivf_dir / "manifest.json").read_text())
    on_disk = json.loads((ivf_dir / "manifest.json").read_text())
    assert on_disk["format"] == INDEX_FORMAT and on_disk["metric"] == "inner_product"
    assert manifest.factory == "IVF64,Flat" and manifest.reason == "given"
    assert manifest.params["nprobe"] > 1  # nprobe=1 is not enough: tuning raised it
    assert manifest.recall >= 0.95 and manifest.recall_target == 0.95
    assert (manifest.recall_k, manifest.recall_queries, manifest.count) == (10, 500, 26_940)
    assert manifest.train_rows == 26_940 and manifest.index_bytes == (ivf_dir / "index.faiss").stat().st_size
    assert not manifest.gpu and manifest.versions["faiss"]


def test_recall_remeasures(ivf_dir, monkeypatch):
    with SearchIndex.open(ivf_dir) as index:
        assert index.recall(k=10, queries=500, seed=0) == pytest.approx(index.manifest.recall)  # same queries
        monkeypatch.setattr(bank_module, "BLOCK_BYTES", 4 * 256 * 1000)  # read the bank 1,000 rows at a time
        blockwise = index.recall(k=10, queries=500, seed=0)  # merged top-k: only near-ties may differ
        assert blockwise == pytest.approx(index.manifest.recall, abs=0.002)
        assert index.recall(k=10, queries=500, seed=1) >= 0.9
        index._index.nprobe = 1  # a worse setting measures worse
        assert index.recall(k=10, queries=500, seed=0) < index.manifest.recall


def test_hnsw_tunes_ef_search(tmp_path, digits_views):
    features, labels = digits_views
    bank = write_bank(tmp_path / "views.h5", features[:8000], labels=labels[:8000], fingerprint="pixels")
    manifest = build_index(bank, tmp_path / "hnsw", factory="HNSW8", recall_target=0.99, queries=300)
    assert "efSearch" in manifest.params and manifest.recall >= 0.99
    with SearchIndex.open(tmp_path / "hnsw") as index:
        assert index._index.hnsw.efSearch == manifest.params["efSearch"]  # applied on open


# ------------------------------------------------------------------------------------------ errors
def test_invalid_factory_is_one_line(tmp_path, cnn_bank):
    with pytest.raises(IsdError, match="Bogus") as info:
        build_index(cnn_bank, tmp_path / "bad", factory="IVF64,Bogus")
    assert "\n" not in str(info.value)
    assert not (tmp_path / "bad" / "manifest.json").exists()


def test_open_refuses_bank_of_another_encoder(tmp_path, cnn_bank, digits_cnn):
    features, labels, _ = digits_cnn
    build_index(cnn_bank, tmp_path / "idx", factory="Flat")
    write_bank(tmp_path / "other.h5", features, labels=labels, fingerprint="another-encoder")
    (tmp_path / "other.h5").replace(tmp_path / "idx" / "bank.h5")
    with pytest.raises(BankError, match="another encoder.*rebuild the index"):
        SearchIndex.open(tmp_path / "idx")


def test_open_missing_files(tmp_path, cnn_bank):
    with pytest.raises(IsdError, match="not found"):
        SearchIndex.open(tmp_path / "nowhere")
    build_index(cnn_bank, tmp_path / "idx", factory="Flat")
    (tmp_path / "idx" / "index.faiss").unlink()
    with pytest.raises(IsdError, match="index.faiss is missing"):
        SearchIndex.open(tmp_path / "idx")


def test_rebuild_in_place_keeps_directory_consistent(tmp_path, cnn_bank):
    build_index(cnn_bank, tmp_path / "idx", factory="Flat")
    manifest = build_index(tmp_path / "idx" / "bank.h5", tmp_path / "idx", factory="IVF16,Flat", queries=200)
    assert manifest.factory == "IVF16,Flat" and manifest.recall >= 0.95
    assert sorted(p.name for p in (tmp_path / "idx").iterdir()) == ["bank.h5", "index.faiss", "manifest.json"]
    with pytest.raises(IsdError, match="format"):
        IndexManifest.from_json(json.dumps({"format": "something/else"}))


# ------------------------------------------------------------------------------------ auto's planner
@pytest.fixture(scope="module")
def digits_views_8px(digits_views) -> np.ndarray:
    """The augmented digits views pooled 2 x 2 to 8 x 8 pixels: 26,940 rows of 64 values."""
    return digits_views[0].reshape(-1, 8, 2, 8, 2).mean(axis=(2, 4)).reshape(-1, 64)


@pytest.mark.parametrize(
    "factory",
    ["Flat", "HNSW16", "HNSW32,SQ8", "IVF64,Flat", "IVF64,SQ8", "IVF64_HNSW32,SQ8", "IVF64,PQ4"],
)
def test_estimate_matches_written_index(digits_views_8px, factory, faiss_one_thread):
    """The memory estimate the planner budgets with is the size of the index FAISS writes (within 1%)."""
    features = digits_views_8px[:2_600]  # 39 rows a list for k-means
    index = make_index(factory, features.shape[1])
    index.train(features)
    index.add(features)
    written = len(faiss.serialize_index(index))
    assert estimate_bytes(factory, *features.shape) == pytest.approx(written, rel=0.01)


def test_candidates_fit_the_budget():
    found = candidates(60_000, 256, 40 * MiB)
    assert [c.factory for c in found] == [
        "IVF256,SQ8",  # IVF Flat (61 MiB of vectors alone) and Flat do not fit; c0 = 1024
        "IVF512,SQ8",
        "IVF1024,SQ8",  # 2048 lists would hold fewer than 39 rows each
        "HNSW8,SQ8",
        "HNSW16,SQ8",
        "HNSW32,SQ8",
    ]
    assert all(c.estimated_bytes <= 40 * MiB for c in found)
    assert [c.sample_factory for c in found][:3] == ["IVF85,SQ8", "IVF171,SQ8", "IVF341,SQ8"]  # c·20k/60k
    assert {c.factory for c in candidates(60_000, 256, GiB)} >= {"Flat", "HNSW32", "IVF1024,Flat"}
    big = [c.factory for c in candidates(5_000_000, 128, 8 * GiB)]
    assert "IVF16384_HNSW32,SQ8" in big and "HNSW32" not in big and "Flat" not in big  # too many rows
    assert [c.factory for c in candidates(500_000, 256, 40 * MiB)] == ["IVF2048,PQ64"]  # only PQ fits
    assert candidates(500_000, 256, MiB) == []


def test_pick_trial_keeps_flat_unless_clearly_beaten():
    def trial(factory, qps, status="ok"):
        return Trial(factory, 0, factory, status=status, predicted_qps=qps)

    assert pick_trial([trial("Flat", 1000), trial("HNSW32", 1200)]).factory == "Flat"  # < 1.25x
    assert pick_trial([trial("Flat", 1000), trial("HNSW32", 1300)]).factory == "HNSW32"
    assert pick_trial([trial("IVF64,SQ8", 900), trial("HNSW32", 5000, "below target")]).factory == "IVF64,SQ8"
    assert pick_trial([trial("HNSW32", 0, "skipped")]) is None


def test_plan_measures_candidates_on_a_sample(tmp_path, digits_views, faiss_one_thread):
    """On 26,940 real rows under 20 MiB, trials on a 5,000-row sample: every fitting candidate is built,
    tuned to the target and timed, and the plan is the fastest of them."""
    features, labels = digits_views
    bank = write_bank(tmp_path / "views.h5", features, labels=labels, fingerprint="pixels")
    with bank_module.FeatureBank.open(bank) as opened:
        measured = plan_index(opened, memory_budget=20 * MiB, sample=5_000, queries=300)
    trials = {t.factory: t for t in measured.trials}
    assert list(trials) == [c.factory for c in candidates(26_940, 256, 20 * MiB, 5_000)]
    assert measured.sample_rows == 5_000 and measured.seconds > 0
    for t in trials.values():
        assert t.status in ("ok", "below target")
        assert t.sample_recall >= 0.95 if t.status == "ok" else t.sample_recall < 0.95
        assert t.estimated_bytes <= 20 * MiB and t.seconds > 0
    ivf = trials["IVF512,SQ8"]  # 512 lists on 26,940 rows: 95 on the sample, as many rows a list
    assert ivf.sample_factory == "IVF95,SQ8" and 0 <= ivf.nprobe_exponent <= 1
    assert ivf.predicted_params["nprobe"] <= ivf.sample_params["nprobe"] * 26_940 / 5_000 * 1.5
    hnsw = trials["HNSW16,SQ8"]
    assert hnsw.predicted_qps < hnsw.sample_qps  # a deeper graph on the full bank
    assert measured.plan.factory == pick_trial(measured.trials).factory
    assert measured.plan.reason.startswith("fastest of 6 indices within the 20 MiB budget")

    with bank_module.FeatureBank.open(bank) as opened:  # no time for any trial: the rule decides
        hurried = plan_index(opened, memory_budget=20 * MiB, sample=5_000, queries=300, seconds=0)
    assert {t.status for t in hurried.trials} == {"skipped"}
    assert hurried.plan.factory == choose_index(26_940, 256, memory_budget=20 * MiB).factory
    assert hurried.plan.reason.startswith("the planning time ran out")


def test_auto_builds_the_planned_index_and_records_the_trials(tmp_path, digits_views, faiss_one_thread):
    """build_index("auto") on 12,000 real rows: the plan's choice, tuned on the whole bank to the target
    on held-out queries, the trials in the manifest."""
    features, labels = digits_views
    bank = write_bank(tmp_path / "views.h5", features[:12_000], labels=labels[:12_000], fingerprint="px")
    manifest = build_index(bank, tmp_path / "auto", memory_budget=8 * MiB, queries=300)
    plan = manifest.plan
    assert plan["sample_rows"] == 12_000 and plan["seconds"] > 0  # a bank this small is its own sample
    chosen = next(t for t in plan["trials"] if t["factory"] == manifest.factory)
    assert chosen["status"] == "ok" and chosen["predicted_qps"] == max(
        t["predicted_qps"] for t in plan["trials"] if t["status"] == "ok"
    )
    assert manifest.recall >= 0.95 and manifest.recall_queries == 300
    assert manifest.estimated_bytes == chosen["estimated_bytes"] <= 8 * MiB
    assert manifest.index_bytes == pytest.approx(manifest.estimated_bytes, rel=0.01)
    assert manifest.reason.startswith("fastest of")
    with SearchIndex.open(tmp_path / "auto") as index:
        assert index.recall(k=10, queries=300, seed=0) == pytest.approx(manifest.recall)
    old = json.loads(manifest.to_json())
    del old["plan"], old["estimated_bytes"]  # a manifest written before the planner still loads
    assert IndexManifest.from_json(json.dumps(old)).plan == {}


def test_tuning_steps_between_powers_of_two():
    assert finer([1, 2, 4, 8, 16, 24]) == [1, 2, 3, 4, 6, 8, 12, 16, 24]
    assert finer([16, 32, 64]) == [16, 24, 32, 48, 64] and finer([1]) == [1]
    trace = [(4, 0.90), (6, 0.94), (8, 0.98)]  # recall 0.96 lies halfway from 6 to 8 in log(nprobe)
    assert crossing(trace, 0.96) == pytest.approx(np.sqrt(6 * 8)) and crossing(trace, 0.5) == 4
    with pytest.raises(ValueError):
        crossing(trace, 0.99)


def test_auto_goes_on_disk_when_no_index_in_ram_reaches_the_target(
    tmp_path, digits_views_8px, faiss_one_thread
):
    """Under 260 kB only a 4-byte PQ code fits 10,000 x 64 rows in RAM, and it misses recall@10 0.95 on
    the sample: the lists go on disk instead (SQ8, which reaches it), the centroids stay within budget."""
    bank = write_bank(tmp_path / "views.h5", digits_views_8px[:10_000], labels=None, fingerprint="px8")
    assert [c.factory for c in candidates(10_000, 64, 260_000)] == ["IVF256,PQ4"]
    manifest = build_index(bank, tmp_path / "auto", memory_budget=260_000, queries=300)
    (trial,) = manifest.plan["trials"]
    assert trial["status"] == "below target" and trial["sample_recall"] < 0.95
    assert (manifest.kind, manifest.factory) == ("ondisk", "IVF256,SQ8")
    assert manifest.reason.startswith("no candidate reached recall@10 >= 0.95 on a 10,000-row sample")
    assert manifest.estimated_bytes <= 260_000 and manifest.recall >= 0.95


def test_auto_keeps_raw_vectors_on_disk_when_8_bits_are_too_coarse(
    tmp_path, digits_views_8px, faiss_one_thread
):
    """Rows nearly parallel (the digits pixels + 20, mean cosine 0.997, as random-init networks' features
    are): no SQ8 code reaches recall@10 0.95, and the raw vectors do not fit 2 MiB in RAM, so the lists
    go on disk with Flat codes, which do."""
    rows = digits_views_8px[:10_000] + 20
    bank = write_bank(tmp_path / "parallel.h5", rows, labels=None, fingerprint="px8+20")
    manifest = build_index(bank, tmp_path / "auto", memory_budget=2 * MiB, queries=300)
    assert {t["status"] for t in manifest.plan["trials"]} == {"below target"}
    assert {t["factory"].split(",")[1] for t in manifest.plan["trials"]} == {"SQ8"}
    assert (manifest.kind, manifest.factory) == ("ondisk", "IVF256,Flat")
    assert "SQ8 codes miss it too" in manifest.reason and manifest.recall >= 0.95
    assert manifest.ivfdata_bytes >= 10_000 * 64 * 4 and manifest.estimated_bytes <= 2 * MiB


def test_tuning_gives_up_when_recall_flattens(digits_cnn):
    """The planner's trials stop a sweep whose last gain, repeated for the values left, falls short."""
    features = digits_cnn[0]
    index = make_index("IVF16,Flat", features.shape[1])  # nprobe 1, 2, 3, 4, 6, 8, 12, 16
    index.train(features)
    index.add(features)
    for give_up, stops_at in ((True, 4), (False, 16)):
        recalls = iter([0.5, 0.7, 0.8, 0.82, 0.825, 0.826, 0.9, 0.99])
        tuned = raise_knob(index, lambda recalls=recalls: next(recalls), 0.95, give_up=give_up)
        assert tuned.params == {"nprobe": stops_at} and tuned.reached is not give_up
