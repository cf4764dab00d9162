"""Embeddings in and out (npy, parquet, HDF5 from elsewhere) and a bank of five images, through the CLI."""

from __future__ import annotations

import json
import sys

import h5py
import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from isdretrieve.bank.arrays import write_bank
from isdretrieve.bank.embeddings_in import import_embeddings
from isdretrieve.bank.embeddings_out import export_embeddings
from isdretrieve.cli.index import main as index_cli
from isdretrieve.cli.knn import main as knn_cli
from isdretrieve.data.open import open_dataset
from isdretrieve.errors import EmbeddingsError
from isdretrieve.files.bank import FeatureBank
from isdretrieve.files.pairs import Pairs
from isdretrieve.index.build import build_index
from isdretrieve.index.search import SearchIndex


def invoke(cli, *args: str):
    return CliRunner().invoke(cli, [str(a) for a in args])


@pytest.fixture(scope="module")
def source_index(tmp_path_factory):
    """A Flat index over 1,500 x 24 clustered rows with labels, dataset indices and paths."""
    rng = np.random.default_rng(0)
    centres = rng.standard_normal((30, 24)).astype(np.float32)
    labels = rng.integers(0, 30, 1500)
    x = centres[labels] + 0.3 * rng.standard_normal((1500, 24), dtype=np.float32)
    root = tmp_path_factory.mktemp("src")
    paths = [f"class{label}/img{i:04d}.png" for i, label in enumerate(labels)]
    bank = write_bank(
        root / "bank.h5",
        x,
        labels=labels,
        indices=np.arange(1500) * 2 + 7,
        paths=paths,
        fingerprint="enc-1",
        data_spec="folder:imgs",
        classes=[f"class{c}" for c in range(30)],
    )
    build_index(bank, root / "idx", factory="Flat")
    return root / "idx"


def _same_bank_and_hits(a_dir, b_dir) -> None:
    with SearchIndex.open(a_dir) as a, SearchIndex.open(b_dir) as b:
        for name in ("labels", "indices", "paths"):
            assert np.array_equal(getattr(a.bank, name)(), getattr(b.bank, name)()), name
        assert (b.bank.fingerprint, b.bank.data_spec, b.bank.classes) == (
            a.bank.fingerprint,
            a.bank.data_spec,
            a.bank.classes,
        )
        queries = a.bank.features(0, 200) + 0.01
        a_scores, a_rows = a.search(queries, 10)
        b_scores, b_rows = b.search(queries, 10)
        np.testing.assert_array_equal(a_rows, b_rows)
        np.testing.assert_allclose(a_scores, b_scores, atol=1e-6)


def test_npy_round_trip(source_index, tmp_path):
    """The npy export is the shard layout (embeddings alone in img_emb/, metadata as parquet beside) and
    imports back into the same bank and hits."""
    import pyarrow.parquet as pq

    out = tmp_path / "emb"
    args = ["export", "--bank", source_index, "--format", "npy", "--shard-rows", 600, "--out", out]
    result = invoke(index_cli, *args)
    assert result.exit_code == 0, result.output
    assert {p.name for p in out.iterdir()} == {"img_emb", "metadata", "meta.json"}
    shards = sorted(p.name for p in (out / "img_emb").iterdir())
    assert shards == ["img_emb_0000.npy", "img_emb_0001.npy", "img_emb_0002.npy"]
    assert sorted(p.name for p in (out / "metadata").iterdir()) == [
        f"metadata_000{i}.parquet" for i in range(3)
    ]
    features = np.concatenate([np.load(out / "img_emb" / name) for name in shards])
    with SearchIndex.open(source_index) as index:
        np.testing.assert_array_equal(features, index.bank.features())
        paths = index.bank.paths()
    meta = pq.read_table(out / "metadata" / "metadata_0001.parquet").to_pydict()
    assert meta["row"][:2] == [600, 601] and meta["image_path"][0] == paths[600]
    assert json.loads((out / "meta.json").read_text())["fingerprint"] == "enc-1"
    built = invoke(index_cli, "build", "--embeddings", out, "--out", tmp_path / "idx", "--quiet")
    assert built.exit_code == 0 and "Flat over 1,500 x 24" in built.output, built.output
    _same_bank_and_hits(source_index, tmp_path / "idx")
    again = invoke(index_cli, *args)
    assert again.exit_code == 0 and not list(tmp_path.glob(".emb*"))  # replaced, no temporary left


def test_embedding_reader_reads_the_npy_export(source_index, tmp_path):
    """embedding-reader (what autofaiss reads through) takes img_emb/ as embeddings, metadata/ as parquet."""
    embedding_reader = pytest.importorskip("embedding_reader")
    out = tmp_path / "emb"
    export_embeddings(source_index / "bank.h5", out, "npy", shard_rows=400)
    reader = embedding_reader.EmbeddingReader(
        str(out / "img_emb"),
        file_format="parquet_npy",
        metadata_folder=str(out / "metadata"),
        meta_columns=["image_path", "label"],
    )
    assert (reader.count, reader.dimension) == (1500, 24)
    batches = list(reader(batch_size=500, start=0, end=reader.count, show_progress=False))
    embeddings = np.concatenate([emb for emb, _ in batches])
    metadata = pd_concat([meta for _, meta in batches])
    with SearchIndex.open(source_index) as index:
        np.testing.assert_array_equal(embeddings, index.bank.features())
        assert list(metadata["image_path"]) == index.bank.paths()
        assert list(metadata["label"]) == index.bank.labels().tolist()


def pd_concat(frames):
    import pandas as pd

    return pd.concat(frames, ignore_index=True)


def _clip_retrieval_folder(root, x, paths):
    """A folder as clip-retrieval's inference writes it: img_emb/img_emb_N.npy (float16 here) and
    metadata/metadata_N.parquet with image_path (and no labels), N unpadded past 9 shards."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    (root / "img_emb").mkdir(parents=True)
    (root / "metadata").mkdir()
    bounds = np.linspace(0, len(x), 12).astype(int)
    for n, (lo, hi) in enumerate(zip(bounds[:-1], bounds[1:], strict=True)):
        np.save(root / "img_emb" / f"img_emb_{n}.npy", x[lo:hi].astype(np.float16))
        table = pa.table({"image_path": paths[lo:hi], "exif": ["{}"] * int(hi - lo)})
        pq.write_table(table, root / "metadata" / f"metadata_{n}.parquet")
    return root


def test_clip_retrieval_folder_is_imported(tmp_path):
    """clip-retrieval's output imports with its paths in order (shard 10 after shard 9), whether given
    as the output folder or its img_emb folder; labels, when wanted, come from --labels."""
    rng = np.random.default_rng(1)
    x = rng.standard_normal((1100, 16)).astype(np.float32)
    paths = [f"/photos/{i:05d}.jpg" for i in range(1100)]
    root = _clip_retrieval_folder(tmp_path / "clip", x, paths)
    (tmp_path / "labels.txt").write_text("".join(f"{i % 5}\n" for i in range(1100)))
    from isdretrieve.bank.embedding_shards import read_shard_folder

    rows, meta = read_shard_folder(root)
    assert rows.shape == (1100, 16) and rows.dtype == np.float16 and meta["paths"] == paths
    np.testing.assert_array_equal(rows[95:205], x[95:205].astype(np.float16))  # across a shard boundary
    for source in (root, root / "img_emb"):
        out = tmp_path / f"idx-{source.name}"
        args = ["--labels", tmp_path / "labels.txt", "--quiet"]
        result = invoke(index_cli, "build", "--embeddings", source, "--out", out, *args)
        assert result.exit_code == 0, result.output
        with FeatureBank.open(out / "bank.h5") as bank:
            assert bank.paths() == paths and bank.labels().tolist()[:6] == [0, 1, 2, 3, 4, 0]
            expected = x.astype(np.float16).astype(np.float32)
            expected /= np.linalg.norm(expected, axis=1, keepdims=True)
            np.testing.assert_allclose(bank.features(), expected, rtol=1e-6, atol=1e-7)
            assert bank.fingerprint.startswith("sha256:")


def test_old_npy_folder_still_imports(source_index, tmp_path):
    """A folder in the npy layout of release 0.1.0 (features.npy, labels.npy, ..., meta.json)."""
    out = tmp_path / "old"
    out.mkdir()
    with SearchIndex.open(source_index) as index:
        bank = index.bank
        np.save(out / "features.npy", bank.features())
        np.save(out / "rows.npy", np.arange(len(bank)))
        np.save(out / "indices.npy", bank.indices())
        np.save(out / "labels.npy", bank.labels())
        (out / "paths.txt").write_text("".join(f"{p}\n" for p in bank.paths()))
        meta = {"fingerprint": bank.fingerprint, "data_spec": bank.data_spec, "classes": bank.classes}
        (out / "meta.json").write_text(json.dumps(meta))
    built = invoke(index_cli, "build", "--embeddings", out, "--out", tmp_path / "idx", "--quiet")
    assert built.exit_code == 0, built.output
    _same_bank_and_hits(source_index, tmp_path / "idx")


@pytest.mark.parametrize("damage", ["fewer-metadata", "row-count", "widths"])
def test_bad_shard_folders_are_one_line(tmp_path, damage):
    x = np.random.default_rng(2).standard_normal((300, 8)).astype(np.float32)
    root = _clip_retrieval_folder(tmp_path / "clip", x, [f"{i}.jpg" for i in range(300)])
    if damage == "fewer-metadata":
        (root / "metadata" / "metadata_10.parquet").unlink()
        expected = "11 embedding shards but 10 metadata files"
    elif damage == "row-count":
        np.save(root / "img_emb" / "img_emb_3.npy", x[:5])
        expected = "metadata_3.parquet has 28 rows, "
    else:
        np.save(root / "img_emb" / "img_emb_3.npy", np.ones((27, 9), np.float32))
        expected = "shards must be 2-D arrays [N, D] of one D, got shape [27, 9]"
    result = invoke(index_cli, "build", "--embeddings", root, "--out", tmp_path / "idx", "--quiet")
    assert result.exit_code == 2 and expected in result.output, result.output
    assert len(result.output.strip().splitlines()) == 1 and not (tmp_path / "idx" / "bank.h5").exists()


def test_parquet_round_trip(source_index, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    out = tmp_path / "emb.parquet"
    result = invoke(
        index_cli, "export", "--bank", source_index / "bank.h5", "--format", "parquet", "--out", out
    )
    assert result.exit_code == 0, result.output
    table = pq.read_table(out)
    assert table.column_names == ["row", "index", "label", "path", "embedding"]
    embedding = table.schema.field("embedding").type
    assert pa.types.is_list(embedding) and embedding.value_type == pa.float32()  # as Milvus imports it
    assert {len(v) for v in table.column("embedding").to_pylist()} == {24}
    assert table.column("index").to_pylist()[:2] == [7, 9] and table.column("path")[0].as_py().startswith(
        "class"
    )
    built = invoke(index_cli, "build", "--embeddings", out, "--out", tmp_path / "idx", "--quiet")
    assert built.exit_code == 0, built.output
    _same_bank_and_hits(source_index, tmp_path / "idx")


def test_hdf5_written_elsewhere(tmp_path):
    x = np.random.default_rng(0).standard_normal((300, 16)).astype(np.float32)
    with h5py.File(tmp_path / "emb.h5", "w") as f:
        f["model/emb"] = x
        f["model/aux"] = x[:, :3]
    result = invoke(index_cli, "build", "--embeddings", tmp_path / "emb.h5", "--out", tmp_path / "a")
    assert result.exit_code == 2 and "several 2-D datasets" in result.output and "--key" in result.output
    (tmp_path / "labels.txt").write_text("".join(f"{i % 3}\n" for i in range(300)))
    args = ["--key", "model/emb", "--labels", tmp_path / "labels.txt", "--quiet"]
    result = invoke(index_cli, "build", "--embeddings", tmp_path / "emb.h5", "--out", tmp_path / "a", *args)
    assert result.exit_code == 0, result.output
    with FeatureBank.open(tmp_path / "a" / "bank.h5") as bank:
        np.testing.assert_allclose(bank.features(), x / np.linalg.norm(x, axis=1, keepdims=True), rtol=1e-6)
        assert bank.labels().tolist()[:4] == [0, 1, 2, 0] and bank.fingerprint.startswith("sha256:")


def test_build_index_accepts_an_array(tmp_path):
    x = np.random.default_rng(0).standard_normal((400, 8)).astype(np.float32)
    manifest = build_index(x, tmp_path / "idx")
    assert manifest.factory == "Flat" and manifest.count == 400
    with SearchIndex.open(tmp_path / "idx") as index:
        assert index.search(x[:5], 1)[1][:, 0].tolist() == [0, 1, 2, 3, 4]
    assert build_index(x.copy(), tmp_path / "other").bank_fingerprint == manifest.bank_fingerprint


@pytest.mark.parametrize(
    ("array", "message"),
    [
        (np.ones((4, 3, 2), np.float32), "2-D array"),
        (np.vstack([np.ones((7, 4)), [[np.nan, 0, 0, 1]], np.ones((2, 4))]), "row 7 holds NaN"),
        (np.vstack([np.ones((3, 4)), np.zeros((1, 4))]), "row 3 is all zeros"),
    ],
)
def test_bad_embeddings_are_one_line(tmp_path, array, message):
    np.save(tmp_path / "bad.npy", array)
    result = invoke(index_cli, "build", "--embeddings", tmp_path / "bad.npy", "--out", tmp_path / "idx")
    assert result.exit_code == 2 and message in result.output, result.output
    assert result.output.count("\n") == 1 and not (tmp_path / "idx" / "bank.h5").exists()
    with pytest.raises(EmbeddingsError, match=message):
        build_index(np.asarray(array), tmp_path / "arr")


def test_parquet_without_pyarrow_is_one_line(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "pyarrow", None)
    (tmp_path / "x.parquet").write_bytes(b"PAR1")
    with pytest.raises(EmbeddingsError, match=r"pip install 'isdretrieve\[parquet\]'"):
        import_embeddings(tmp_path / "x.parquet", tmp_path / "bank.h5")


def test_npy_export_without_pyarrow_is_one_line_and_writes_nothing(source_index, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "pyarrow", None)
    with pytest.raises(EmbeddingsError, match=r"pip install 'isdretrieve\[parquet\]'"):
        export_embeddings(source_index / "bank.h5", tmp_path / "emb", "npy")
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------------------- a bank of 5 images
@pytest.fixture(scope="module")
def five_images(tmp_path_factory, make_encoder):
    """Five digits images as PNG files in two class folders, and a random-init encoder."""
    root = tmp_path_factory.mktemp("five")
    digits = open_dataset("digits")
    images = digits.load_all()
    for i in range(5):
        folder = root / "imgs" / ("even" if i % 2 == 0 else "odd")
        folder.mkdir(parents=True, exist_ok=True)
        pixels = images[i].permute(1, 2, 0).numpy()
        Image.fromarray(pixels).resize((16, 16)).save(folder / f"digit{i}.png")
    return root, make_encoder(root / "enc.pt")


def test_five_image_folder_builds_searches_and_reports(five_images, tmp_path):
    root, encoder = five_images
    idx = tmp_path / "idx"
    args = ["--checkpoint", encoder, "--data", f"folder:{root / 'imgs'}", "--out", idx, "--quiet"]
    built = invoke(index_cli, "build", *args)
    assert built.exit_code == 0 and "Flat over 5 x 256" in built.output, built.output
    note = json.loads((idx / "manifest.json").read_text())["notes"]
    assert note == ["k lowered from 10 to 5: the bank has 5 rows"]

    info = invoke(index_cli, "info", idx, "--json")
    assert info.exit_code == 0 and json.loads(info.output)["count"] == 5
    with SearchIndex.open(idx) as index, pytest.warns(UserWarning, match="k=10 lowered to 5"):
        rows = index.search(index.bank.features(), 10)[1]
    assert rows.shape == (5, 5) and rows[:, 0].tolist() == [0, 1, 2, 3, 4]
    assert sorted(rows[0].tolist()) == [0, 1, 2, 3, 4]

    recall = invoke(index_cli, "recall", idx)  # -k 10 on 5 rows: the 4 other rows
    assert recall.exit_code == 0 and "recall@4 = 1.0000" in recall.output, recall.output

    knn = invoke(knn_cli, "--train", idx, "--test", idx, "-k", "3", "--json")
    assert knn.exit_code == 0, knn.output
    assert json.loads(knn.stdout)["results"][0]["k"] == 3

    mined = invoke(index_cli, "mine", idx, "--out", tmp_path / "pairs.h5", "--audit", "--quiet")  # k=5 > 4
    assert mined.exit_code == 0 and "k=4" in mined.output, mined.output
    pairs = Pairs.open(tmp_path / "pairs.h5")
    assert pairs.num_pairs == 20 and pairs.params.k == 4
    assert json.loads((tmp_path / "pairs.audit.json").read_text())["chosen"]["coverage"] == 1.0
