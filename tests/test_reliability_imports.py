"""Embeddings made elsewhere: the whole input (shape, dtype, labels, indices, paths, metadata) is checked
before anything on disk changes; nothing is re-cut or padded; and a refused input or a failed build
leaves an index already in the folder exactly as it was."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import h5py
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from isdretrieve.cli.index import main as index_cli
from isdretrieve.errors import EmbeddingsError, IsdError
from isdretrieve.index.build import build_index
from isdretrieve.index.search import SearchIndex
from isdretrieve.pipeline import build_index_from_embeddings

N, D = 20, 4


def _rows(n: int = N, d: int = D) -> np.ndarray:
    return np.random.default_rng(0).standard_normal((n, d)).astype(np.float32)


def invoke(*args: object):
    return CliRunner().invoke(index_cli, [str(a) for a in args])


# ------------------------------------------------------------------------------ parquet, re-cut rows
def _parquet(target: Path, embedding: pa.Array, metadata: dict | None = None, **columns: pa.Array) -> Path:
    table = pa.table({"embedding": embedding, **columns})
    if metadata is not None:
        table = table.replace_schema_metadata(metadata)
    pq.write_table(table, target)
    return target


def _ragged() -> pa.Array:
    """20 rows whose lengths (3 and 5) add up to 80 = 20 x 4: the old reader re-cut them into 20 x 4."""
    rows = [[float(i)] * (3 if i % 2 else 5) for i in range(N)]
    return pa.array(rows, pa.list_(pa.float32()))


PARQUET_CASES = {
    "ragged-rows": (lambda: {"embedding": _ragged()}, "have different lengths (row 0 has 5, row 1 has 3)"),
    "null-row": (
        lambda: {
            "embedding": pa.array([[1.0] * D] * 5 + [None] + [[1.0] * D] * (N - 6), pa.list_(pa.float32()))
        },
        "column 'embedding' row 5 is null",
    ),
    "null-value": (
        lambda: {"embedding": pa.array([[1.0] * D] * 7 + [[1.0, None, 1.0, 1.0]] + [[1.0] * D] * (N - 8))},
        "column 'embedding' row 7 holds a null value",
    ),
    "text-values": (lambda: {"embedding": pa.array([["a"] * D] * N)}, "must be a list of numbers"),
    "null-label": (
        lambda: {
            "embedding": pa.array(_rows().tolist()),
            "label": pa.array([1] * 3 + [None] + [1] * (N - 4)),
        },
        "column 'label' row 3 is null",
    ),
    "text-label": (
        lambda: {"embedding": pa.array(_rows().tolist()), "label": pa.array(["cat"] * N)},
        "column 'label' must be whole numbers",
    ),
    "metadata-not-json": (
        lambda: {"embedding": pa.array(_rows().tolist()), "metadata": {"isdretrieve": b"{not json"}},
        "parquet metadata 'isdretrieve' is not valid JSON",
    ),
    "metadata-classes-not-a-list": (
        lambda: {
            "embedding": pa.array(_rows().tolist()),
            "metadata": {"isdretrieve": json.dumps({"classes": "cat,dog"})},
        },
        "metadata 'classes' must be a list of class names",
    ),
    "path-null": (
        lambda: {
            "embedding": pa.array(_rows().tolist()),
            "path": pa.array(["a"] * 4 + [None] + ["b"] * (N - 5)),
        },
        "path of row 4 is NoneType, not text",
    ),
}


@pytest.mark.parametrize("case", sorted(PARQUET_CASES))
def test_bad_parquet_is_one_line_and_builds_nothing(tmp_path, case):
    make, message = PARQUET_CASES[case]
    parts = make()
    path = _parquet(tmp_path / "e.parquet", parts.pop("embedding"), parts.pop("metadata", None), **parts)
    _refused(tmp_path, path, f"error: {path}: ")
    _refused(tmp_path, path, message)


# --------------------------------------------------------------------------- npy and HDF5 foreign inputs
def _npy_folder(root: Path, features: np.ndarray | None = None, **files: object) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    np.save(root / "features.npy", _rows() if features is None else features)
    for name, content in files.items():
        name = name.replace("_", ".")
        if isinstance(content, np.ndarray):
            np.save(root / name, content)
        else:
            (root / name).write_bytes(content if isinstance(content, bytes) else str(content).encode())
    return root


FOLDER_CASES = {
    "text-features": (
        lambda p: _npy_folder(p, np.array([["1.5"] * D] * N)),
        "embeddings must be numbers, got text (dtype <U3)",
    ),
    "text-labels": (
        lambda p: _npy_folder(p, labels_npy=np.array(["cat"] * N)),
        "labels must be whole numbers",
    ),
    "float-labels": (lambda p: _npy_folder(p, labels_npy=np.full(N, 0.5)), "labels must be whole numbers"),
    "labels-too-few": (lambda p: _npy_folder(p, labels_npy=np.zeros(N - 1, int)), "labels has shape [19]"),
    "huge-label": (
        lambda p: _npy_folder(p, labels_npy=np.array([0] * 9 + [10**12] + [0] * (N - 10))),
        "labels must be in [-1, 1048576], row 9 holds 1000000000000",
    ),
    "label-below-minus-one": (
        lambda p: _npy_folder(p, labels_npy=np.array([0] * 2 + [-7] + [0] * (N - 3))),
        "row 2 holds -7",
    ),
    "label-without-a-class-name": (
        lambda p: _npy_folder(
            p,
            labels_npy=np.array([0] * 4 + [2] + [0] * (N - 5)),
            meta_json=json.dumps({"classes": ["a", "b"]}),
        ),
        "labels must be in [-1, 1], row 4 holds 2",
    ),
    "meta-classes-not-a-list": (
        lambda p: _npy_folder(p, meta_json=json.dumps({"classes": 3})),
        "metadata 'classes' must be a list of class names",
    ),
    "meta-not-an-object": (lambda p: _npy_folder(p, meta_json="[1, 2]"), "must be a JSON object, got list"),
    "meta-fingerprint-a-number": (
        lambda p: _npy_folder(p, meta_json=json.dumps({"fingerprint": 7})),
        "metadata 'fingerprint' must be text",
    ),
    "meta-not-utf8": (lambda p: _npy_folder(p, meta_json=b'{"classes": ["\xff"]}'), "meta.json is not UTF-8"),
    "paths-not-utf8": (
        lambda p: _npy_folder(p, paths_txt=b"".join(b"a%d\n" % i for i in range(N - 1)) + b"caf\xe9\n"),
        "paths.txt is not UTF-8 text",
    ),
    "paths-too-few": (
        lambda p: _npy_folder(p, paths_txt="a\nb\n"),
        "paths has 2 entries for 20 embedding rows",
    ),
    "negative-index": (
        lambda p: _npy_folder(p, indices_npy=np.array([0] * 3 + [-1] + [0] * (N - 4))),
        "indices must be in [0,",
    ),
}


def _refused(tmp_path: Path, source: Path, message: str) -> None:
    """``build --embeddings source`` ends in one line holding ``message``, exit 2, and builds nothing."""
    result = invoke("build", "--embeddings", source, "--out", tmp_path / "idx", "--quiet")
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], result.output
    assert not (tmp_path / "idx").exists()


@pytest.mark.parametrize("case", sorted(FOLDER_CASES))
def test_bad_npy_folder_is_one_line_and_builds_nothing(tmp_path, case):
    make, message = FOLDER_CASES[case]
    _refused(tmp_path, make(tmp_path / "emb"), message)


def _h5(path: Path, **datasets: object) -> Path:
    with h5py.File(path, "w") as f:
        for name, value in datasets.items():
            f[name] = value
    return path


H5_CASES = {
    "string-features": (
        lambda p: _h5(p, features=np.array([[b"1"] * D] * N)),
        "embeddings must be numbers, got bytes",
    ),
    "variable-length-strings": (
        lambda p: _h5(p, features=np.array([["1.0"] * D] * N, dtype=h5py.string_dtype())),
        "embeddings must be numbers",
    ),
    "string-labels": (
        lambda p: _h5(p, features=_rows(), labels=np.array([b"cat"] * N)),
        "labels must be whole numbers, got bytes",
    ),
    "labels-of-another-shape": (
        lambda p: _h5(p, features=_rows(), labels=np.zeros((N, 2), int)),
        "labels has shape [20, 2]",
    ),
    "paths-not-utf8": (
        lambda p: _h5(p, features=_rows(), paths=np.array([b"ok"] * (N - 1) + [b"caf\xe9"])),
        "path of row 19",
    ),
}


@pytest.mark.parametrize("case", sorted(H5_CASES))
def test_bad_hdf5_is_one_line_and_builds_nothing(tmp_path, case):
    make, message = H5_CASES[case]
    _refused(tmp_path, make(tmp_path / "emb.h5"), message)


def test_a_labels_file_of_text_or_huge_values_is_refused(tmp_path):
    source = _npy_folder(tmp_path / "emb")
    np.save(tmp_path / "labels.npy", np.array(["a"] * N))
    (tmp_path / "huge.txt").write_text("".join(f"{10**20 if i == 3 else 1}\n" for i in range(N)))
    for labels, message in (
        (tmp_path / "labels.npy", "labels must be one integer a row"),
        (tmp_path / "huge.txt", "labels"),
    ):
        result = invoke(
            "build", "--embeddings", source, "--labels", labels, "--out", tmp_path / "i", "--quiet"
        )
        assert result.exit_code == 2 and message in result.output, result.output
        assert len(result.output.strip().splitlines()) == 1 and "Traceback" not in result.output


# ------------------------------------------------------------------------------------ no lost index
def _digest(folder: Path) -> dict[str, str]:
    return {
        p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()
    }


@pytest.fixture
def finished(tmp_path) -> Path:
    """A finished Flat index over 300 rows at tmp_path/idx."""
    x = np.random.default_rng(1).standard_normal((300, D)).astype(np.float32)
    np.save(tmp_path / "good.npy", x)
    result = invoke("build", "--embeddings", tmp_path / "good.npy", "--out", tmp_path / "idx", "--quiet")
    assert result.exit_code == 0, result.output
    return tmp_path / "idx"


def _bad_nan(tmp_path: Path) -> list[object]:
    x = _rows(300)
    x[250] = np.nan  # found only after 250 good rows have been written
    np.save(tmp_path / "bad.npy", x)
    return ["--embeddings", tmp_path / "bad.npy"]


def _bad_ragged(tmp_path: Path) -> list[object]:
    return ["--embeddings", _parquet(tmp_path / "bad.parquet", _ragged())]


def _bad_factory(tmp_path: Path) -> list[object]:
    np.save(tmp_path / "ok.npy", _rows(300))
    return ["--embeddings", tmp_path / "ok.npy", "--index", "IVF4096,Flat"]  # cannot train on 300 rows


def _bad_labels(tmp_path: Path) -> list[object]:
    np.save(tmp_path / "ok.npy", _rows(300))
    np.save(tmp_path / "labels.npy", np.arange(299))
    return ["--embeddings", tmp_path / "ok.npy", "--labels", tmp_path / "labels.npy"]


@pytest.mark.parametrize("bad", [_bad_nan, _bad_ragged, _bad_factory, _bad_labels])
def test_a_refused_or_failed_build_leaves_the_finished_index_untouched(tmp_path, finished, bad):
    before = _digest(finished)
    with SearchIndex.open(finished) as index:
        expected = index.search(index.bank.features(0, 5), 3)
    result = invoke("build", *bad(tmp_path), "--out", finished, "--quiet")
    assert result.exit_code == 2, result.output
    assert len(result.output.strip().splitlines()) == 1 and "Traceback" not in result.output
    assert _digest(finished) == before  # nothing changed, and no staged file is left behind
    with SearchIndex.open(finished) as index:
        np.testing.assert_array_equal(index.search(index.bank.features(0, 5), 3)[1], expected[1])


def test_the_python_api_keeps_the_index_too(tmp_path, finished):
    before = _digest(finished)
    bad = _rows(300)
    bad[17] = 0.0
    with pytest.raises(EmbeddingsError, match="row 17 is all zeros"):
        build_index(bad, finished)
    with pytest.raises(IsdError):
        build_index_from_embeddings(_bad_ragged(tmp_path)[1], finished)
    assert _digest(finished) == before
    manifest = build_index(_rows(300), finished)  # a good rebuild replaces it
    assert manifest.count == 300 and _digest(finished) != before
    assert not [p for p in finished.iterdir() if p.name.startswith(".")]
