"""Milvus as the search backend, against real Milvus engines: milvus-lite embedded (a ``.db`` file), and
the same code path through a ``milvus-lite server`` process on 127.0.0.1 that the tests start and stop,
reached by URI and token as a cluster is. Banks come from a random-init small CNN over the digits.

Shown here: building (from a checkpoint and from a bank), resuming after a kill, held-out recall measured
through Milvus, label filters, ``Retriever``, ``isd-knn`` equal to FAISS ``Flat`` on the same bank,
``isd-index neighbours``, ``mine --approximate``, the service answering from a Milvus-backed index,
attaching a collection filled from the parquet export, and every refusal as one line with exit code 2.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from click.testing import CliRunner
from conftest import random_encoder
from serving import serving

from isdretrieve.bank.export import export_bank
from isdretrieve.cli.index import main as index_cli
from isdretrieve.cli.knn import main as knn_cli
from isdretrieve.errors import IsdError
from isdretrieve.files.pairs import MiningParams
from isdretrieve.index.backend import LabelFilter
from isdretrieve.index.milvus.build import milvus_plan
from isdretrieve.index.milvus.connect import pymilvus_module
from isdretrieve.index.milvus.params import milvus_index
from isdretrieve.index.open import open_index
from isdretrieve.index.plan import choose_index
from isdretrieve.retrieve.retriever import Retriever

REPO = Path(__file__).resolve().parents[1]
TOKEN_ENV, TOKEN = "ISD_TEST_MILVUS_TOKEN", "root:not-a-real-secret-7f3a"


def _milvus_installed() -> None:
    """Skip without the ``milvus`` extra; with ISD_REQUIRE_MILVUS set (CI) that is a failure."""
    try:
        import milvus_lite  # noqa: F401
        import pymilvus  # noqa: F401
    except ImportError:
        if os.environ.get("ISD_REQUIRE_MILVUS", "") not in ("", "0"):
            pytest.fail("ISD_REQUIRE_MILVUS is set but pymilvus / milvus-lite are not installed")
        pytest.skip("needs the milvus extra: pip install 'isdretrieve[milvus]'")


@pytest.fixture(autouse=True)
def _needs_milvus():
    _milvus_installed()


def invoke(cli, *args, env: dict[str, str] | None = None):
    return CliRunner().invoke(cli, [str(a) for a in args], env=env)


def one_error_line(result) -> str:
    """The one line a failed command prints (exit code 2, no traceback)."""
    lines = result.output.strip().splitlines()
    assert result.exit_code == 2 and len(lines) == 1 and lines[0].startswith("error: "), result.output
    assert "Traceback" not in result.output
    return lines[0]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --------------------------------------------------------------------------------------- engines
@pytest.fixture(scope="module")
def milvus_server(tmp_path_factory):
    """``milvus-lite server`` in its own process on 127.0.0.1 (a free port), stopped after the module."""
    _milvus_installed()
    port, data = free_port(), tmp_path_factory.mktemp("milvus-server")
    command = [sys.executable, "-m", "milvus_lite", "server", "--data-dir", str(data)]
    process = subprocess.Popen(
        [*command, "--host", "127.0.0.1", "--port", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 60
    while True:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                break
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            pytest.fail(f"milvus-lite server did not start (exit code {process.poll()})")
        time.sleep(0.2)
    yield f"http://127.0.0.1:{port}"
    process.terminate()
    try:
        process.wait(timeout=20)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    """A random-init encoder, the FAISS Flat index over its digits train bank, and its test bank."""
    root = tmp_path_factory.mktemp("digits-milvus")
    encoder = random_encoder(root / "encoder.pt")
    built = invoke(
        index_cli, "build", "--checkpoint", encoder, "--data", "digits", "--out", root / "flat",
        "--index", "Flat", "--workers", "0", "--quiet",
    )  # fmt: skip
    assert built.exit_code == 0, built.output
    test_bank = export_bank(encoder, "digits,split=test", root / "test.h5", workers=0).path
    return {"root": root, "encoder": encoder, "flat": root / "flat", "test": test_bank}


@pytest.fixture(scope="module")
def lite_index(digits):
    """The digits train split built from the checkpoint into an embedded milvus-lite file (auto plan)."""
    out = digits["root"] / "lite"
    built = invoke(
        index_cli, "build", "--checkpoint", digits["encoder"], "--data", "digits", "--out", out,
        "--backend", "milvus", "--milvus-uri", out / "bank.db", "--workers", "0", "--quiet", "--json",
    )  # fmt: skip
    assert built.exit_code == 0, built.output
    return out, json.loads(built.output)


# ----------------------------------------------------------------------------------- the mapping
def test_factory_strings_map_to_milvus_indices():
    """One mapping from our factory strings (the planner's among them) to Milvus index kinds."""
    assert milvus_index("Flat").index_params() == {"index_type": "FLAT", "metric_type": "IP", "params": {}}
    hnsw = milvus_index("HNSW32")
    assert (hnsw.index_type, hnsw.build, hnsw.knob) == ("HNSW", {"M": 32, "efConstruction": 40}, "ef")
    assert hnsw.knob_values(11)[0] == 16 and milvus_index("HNSW8").knob_values(40)[0] == 40
    assert milvus_index("HNSW16,SQ8").build == {"M": 16, "efConstruction": 40, "sq_type": "SQ8"}
    ivf = milvus_index("IVF1024,SQ8")
    assert (ivf.index_type, ivf.build, ivf.knob_values(10)[-1]) == ("IVF_SQ8", {"nlist": 1024}, 1024)
    assert milvus_index("IVF64,Flat").index_type == "IVF_FLAT"
    assert milvus_index("IVF4096_HNSW32,SQ8").build == {"nlist": 4096}
    assert milvus_index("IVF256,PQ32").build == {"nlist": 256, "m": 32, "nbits": 8}
    for n, dim, budget in ((10_000, 256, 2**30), (1_500_000, 256, 2**30), (5_000_000, 256, 2**30)):
        plan = choose_index(n, dim, memory_budget=budget)
        assert milvus_index(plan.factory).index_type in ("FLAT", "HNSW", "IVF_FLAT", "IVF_SQ8", "IVF_PQ")
    billion, why = milvus_plan(10**9, 256, "auto", 512 * 2**30)  # FAISS: IVF65536,SQ8 over the whole bank
    assert billion == "IVF4096,SQ8" and "per Milvus segment of up to 1,048,576 rows" in why
    assert milvus_plan(10**9, 256, "IVF256,Flat", None) == ("IVF256,Flat", "given")
    for refused in ("OPQ16,IVF64,PQ16", "IVF64,Flat,RFlat", "LSH", "IVF64_HNSW32,Flat", "PCA64,Flat"):
        with pytest.raises(IsdError, match="has no Milvus equivalent"):
            milvus_index(refused)


# ------------------------------------------------------------------------------ embedded (lite)
def test_embedded_build_records_backend_and_recall(lite_index, digits):
    out, manifest = lite_index
    assert manifest["backend"] == "milvus" and manifest["factory"] == "Flat"  # auto, on 1,347 rows
    assert manifest["milvus"]["uri"] == "bank.db" and manifest["milvus"]["collection"] == "isd_lite"
    assert manifest["milvus"]["index_type"] == "FLAT" and manifest["milvus"]["token_env"] is None
    assert manifest["recall"] == 1.0 and manifest["recall_queries"] == 1000  # measured through Milvus
    assert manifest["recall_protocol"].startswith("held-out") and manifest["count"] == 1347
    assert not (out / "index.faiss").exists() and (out / "encoder.pt").is_file()
    recall = invoke(index_cli, "recall", out, "--json")
    assert recall.exit_code == 0 and json.loads(recall.output)["backend"] == "milvus", recall.output
    assert json.loads(recall.output)["recall"] == 1.0
    info = invoke(index_cli, "info", out, "--json")
    assert info.exit_code == 0 and json.loads(info.output)["milvus"]["uri"] == "bank.db"


def test_isd_knn_through_milvus_equals_faiss_flat(lite_index, digits):
    """isd-knn over the Milvus FLAT collection and over FAISS Flat, same bank: the same accuracies."""
    results = {}
    for name, train in (("milvus", lite_index[0]), ("faiss", digits["flat"])):
        ran = invoke(knn_cli, "--train", train, "--test", digits["test"], "-k", "1", "-k", "20", "--json")
        assert ran.exit_code == 0, ran.output
        results[name] = json.loads(ran.output)
    assert results["milvus"]["backend"] == "milvus" and results["faiss"]["backend"] == "faiss"
    assert results["milvus"]["results"] == results["faiss"]["results"]
    assert results["faiss"]["results"][0]["top1"] > 0.5  # a real k-NN, not chance


def test_retriever_and_filters_over_milvus_equal_faiss(lite_index, digits):
    with Retriever.open(lite_index[0]) as milvus, Retriever.open(digits["flat"]) as flat:
        assert milvus.index.backend == "milvus" and len(milvus.index) == len(flat.index) == 1347
        x = flat.index.bank.features(0, 25)
        for labels in (None, 3, [2, 8]):
            a, b = milvus.search_vectors(x, k=10, labels=labels), flat.search_vectors(x, k=10, labels=labels)
            assert [[h.row for h in q] for q in a] == [[h.row for h in q] for q in b]
            got = np.array([[h.score for h in q] for q in a])
            assert np.allclose(got, [[h.score for h in q] for q in b], atol=1e-5)
        kept = {h.label for q in milvus.search_vectors(x, k=10, labels=[2, 8]) for h in q}
        assert kept == {2, 8}
        assert [h.row for h in milvus.neighbours([5], k=4)[0].hits] == [
            h.row for h in flat.neighbours([5], k=4)[0].hits
        ]
        scores, rows = milvus.index.search(x[:2], 5, filter=LabelFilter.of(99))  # a class no row has
        assert (rows == -1).all()
        assert milvus.search(flat.index.bank.features(0, 1), k=1)[0][0].row == 0  # via the image path's call
    report = invoke(index_cli, "neighbours", lite_index[0], "--query", "0,7", "-k", "3", "--out",
                    digits["root"] / "report", "--json")  # fmt: skip
    assert report.exit_code == 0, report.output
    assert len(json.loads(report.output)["results"][0]["hits"]) == 3


# -------------------------------------------------------------------------- server on 127.0.0.1
# A child process that builds into a Milvus server in blocks of 200 rows and SIGKILLs itself after the
# third block was inserted but before it was confirmed. argv: the isd-index arguments.
KILLED_BUILD = """
import os, signal, sys
from isdretrieve.index.milvus import collection, fill

fill.block_rows_for = lambda dim: 200
real = collection.BankCollection.set_properties

def set_properties(self, values):
    if int(values.get(collection.ROWS_DONE, 0)) >= 600:
        os.kill(os.getpid(), signal.SIGKILL)
    return real(self, values)

collection.BankCollection.set_properties = set_properties
from isdretrieve.cli.index import main
main(sys.argv[1:])
"""


@pytest.fixture(scope="module")
def server_index(milvus_server, digits):
    """The digits train bank built into the server as IVF16,SQ8 (token from a variable): killed after
    the third insert, then rerun. Returns the directory and what was seen."""
    out = digits["root"] / "served"
    args = [
        "build", "--bank", digits["flat"] / "bank.h5", "--out", out, "--backend", "milvus",
        "--milvus-uri", milvus_server, "--collection", "digits_resume", "--milvus-token", TOKEN_ENV,
        "--index", "IVF16,SQ8", "--recall-target", "0.9",
    ]  # fmt: skip
    env = {**os.environ, TOKEN_ENV: TOKEN, "PYTHONPATH": str(REPO)}
    killed = subprocess.run(
        [sys.executable, "-c", KILLED_BUILD, *map(str, args), "--quiet"],
        env=env,
        capture_output=True,
        text=True,
    )
    seen: dict[str, object] = {
        "killed": killed.returncode,
        "before": _rows_in(milvus_server, "digits_resume"),
    }
    from isdretrieve.index.milvus.collection import BankCollection

    calls, real_insert = [], BankCollection.insert

    def insert(self, columns, replace):
        calls.append((int(columns[0][0]), len(columns[0]), replace))
        return real_insert(self, columns, replace)

    BankCollection.insert = insert
    try:
        rerun = invoke(index_cli, *args, "--json", env={TOKEN_ENV: TOKEN})
    finally:
        BankCollection.insert = real_insert
    seen.update(calls=calls, output=rerun.output, stdout=rerun.stdout, exit_code=rerun.exit_code)
    return out, seen


def _rows_in(uri: str, name: str) -> int:
    """Rows a collection holds, counted by a plain pymilvus client (flushed first)."""
    from pymilvus import Collection, connections

    pymilvus_module()  # its deprecation notes quieted
    connections.connect("count", uri=uri, token=TOKEN)
    try:
        collection = Collection(name, using="count")
        collection.flush()
        return collection.num_entities
    finally:
        connections.disconnect("count")


def test_build_resumes_after_a_kill(server_index, milvus_server, monkeypatch):
    out, seen = server_index
    monkeypatch.setenv(TOKEN_ENV, TOKEN)  # the index directory reads its token where its manifest says
    assert seen["killed"] == -signal.SIGKILL
    assert seen["before"] == 600  # three blocks landed, two confirmed
    assert seen["exit_code"] == 0, seen["output"]
    calls = seen["calls"]
    assert calls[0] == (400, 200, True)  # the unconfirmed block again, as an upsert
    assert all(not replace for _, _, replace in calls[1:]) and calls[-1][0] + calls[-1][1] == 1347
    manifest = json.loads(seen["stdout"])  # progress lines went to stderr
    assert "rows 400..600 of 1,347 inserted" in seen["output"]
    with open_index(out) as index:
        assert index.collection.count() == 1347  # no row twice
        assert index.recall() == pytest.approx(manifest["recall"], abs=0.02)
    assert manifest["recall"] >= 0.9 and manifest["params"]["nprobe"] >= 1  # tuned through Milvus
    assert manifest["milvus"]["uri"] == milvus_server and manifest["milvus"]["token_env"] == TOKEN_ENV
    assert manifest["milvus"]["index_type"] == "IVF_SQ8" and manifest["milvus"]["build_params"] == {
        "nlist": 16
    }
    for text in (seen["output"], (out / "manifest.json").read_text()):
        assert TOKEN not in text and "not-a-real-secret" not in text


def test_service_and_mining_over_a_milvus_index(server_index, digits, tmp_path, monkeypatch):
    """``serve`` answers a search (with the class filter) from the Milvus-backed index, and mining
    through it records the backend and its recall."""
    from isdretrieve.mine.mining import mine_pairs

    monkeypatch.setenv(TOKEN_ENV, TOKEN)
    out = server_index[0]
    with serving([out]) as running, httpx.Client(base_url=running.url, timeout=60) as client:
        x = Retriever.open(digits["flat"]).index.bank.features(0, 3).tolist()
        answer = client.post("/api/indices/served/search/vectors?k=5&label=3&label=4", json={"vectors": x})
        assert answer.status_code == 200, answer.text
        hits = [h for result in answer.json()["results"] for h in result["hits"]]
        assert len(hits) == 15 and {h["label"] for h in hits} <= {3, 4}
        near = client.get("/api/indices/served/rows/0/neighbours?k=4&label=0")
        assert near.status_code == 200 and {h["label"] for h in near.json()["results"][0]["hits"]} == {0}
        bad = client.post("/api/indices/served/search/vectors?label=cat", json={"vectors": x})
        assert bad.status_code == 422 and len(bad.json()["error"].splitlines()) == 1, bad.text
        info = client.get("/api/indices/served/manifest").json()
        assert info["backend"] == "milvus" and TOKEN not in json.dumps(info)
    pairs = mine_pairs(out / "bank.h5", tmp_path / "pairs.h5", MiningParams(k=5), index=out)
    assert pairs.attrs["index_backend"] == "milvus" and pairs.attrs["search_recall"] > 0.8


def test_another_bank_is_refused(server_index, milvus_server, digits):
    """A rerun with another bank into a collection that holds one: refused, the collection untouched."""
    result = invoke(
        index_cli, "build", "--bank", digits["test"], "--out", digits["root"] / "other", "--backend",
        "milvus", "--milvus-uri", milvus_server, "--collection", "digits_resume", "--milvus-token", TOKEN_ENV,
        "--quiet", env={TOKEN_ENV: TOKEN},
    )  # fmt: skip
    assert "holds another bank" in one_error_line(result)
    assert _rows_in(milvus_server, "digits_resume") == 1347


def test_a_milvus_that_is_down_or_refuses_is_one_line(server_index, milvus_server, digits, tmp_path):
    bank, dead = digits["flat"] / "bank.h5", f"http://127.0.0.1:{free_port()}"
    common = ["build", "--bank", bank, "--backend", "milvus", "--quiet"]
    down = invoke(index_cli, *common, "--out", tmp_path / "a", "--milvus-uri", dead)
    assert f"Milvus at {dead} (connecting)" in one_error_line(down)
    assert not (tmp_path / "a").exists()  # nothing written
    refused = invoke(
        index_cli, *common, "--out", tmp_path / "b", "--milvus-uri", milvus_server, "--collection", "pq",
        "--index", "IVF16,PQ8", "--milvus-token", TOKEN_ENV, env={TOKEN_ENV: TOKEN},
    )  # fmt: skip
    assert "IVF_PQ" in one_error_line(refused)  # milvus-lite has no PQ (a cluster does)
    unset = invoke(index_cli, *common, "--out", tmp_path / "c", "--milvus-uri", milvus_server,
                   "--milvus-token", "ISD_NOT_SET_ANYWHERE")  # fmt: skip
    assert "ISD_NOT_SET_ANYWHERE is not set" in one_error_line(unset)
    secret = invoke(index_cli, *common, "--out", tmp_path / "d", "--milvus-uri", "http://root:pw@127.0.0.1:1")
    assert "pw" not in one_error_line(secret) and "credentials" in secret.output
    moved = tmp_path / "moved"  # an index directory whose server is gone
    shutil.copytree(server_index[0], moved)
    manifest = json.loads((moved / "manifest.json").read_text())
    manifest["milvus"]["uri"] = dead
    (moved / "manifest.json").write_text(json.dumps(manifest))
    gone = invoke(index_cli, "recall", moved, env={TOKEN_ENV: TOKEN})
    assert f"Milvus at {dead}" in one_error_line(gone) and TOKEN not in gone.output


def test_attach_a_collection_filled_from_the_parquet_export(milvus_server, digits, tmp_path, monkeypatch):
    """The parquet export's columns are the collection's fields: filled from that file (as a bulk import
    would; milvus-lite has no bulk import), ``isd-index attach`` writes a working index directory, and a
    collection whose rows are not the bank's is refused."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from pymilvus import Collection, connections

    from isdretrieve.files.bank import FeatureBank
    from isdretrieve.index.milvus.collection import bank_schema

    exported = invoke(index_cli, "export", "--bank", digits["test"], "--format", "parquet", "--out",
                      tmp_path / "test.parquet")  # fmt: skip
    assert exported.exit_code == 0, exported.output
    table = pq.read_table(tmp_path / "test.parquet")
    schema = bank_schema(256, 64)
    # the arrow type pymilvus's BulkWriter writes for each field type (pymilvus.bulk_writer.constants)
    arrow = {"INT64": pa.int64(), "VARCHAR": pa.string(), "FLOAT_VECTOR": pa.list_(pa.float32())}
    for field in schema.fields:
        assert table.schema.field(field.name).type == arrow[field.dtype.name], field.name
    connections.connect("fill", uri=milvus_server, token=TOKEN)
    columns = [table.column(f.name).to_pylist() for f in schema.fields]
    Collection("imported", schema, using="fill").insert(columns)
    shuffled = [columns[0], columns[1][1:] + columns[1][:1], *columns[2:]]
    Collection("shuffled", schema, using="fill").insert(shuffled)
    connections.disconnect("fill")
    monkeypatch.setenv(TOKEN_ENV, TOKEN)
    common = ["attach", "--bank", digits["test"], "--milvus-uri", milvus_server, "--milvus-token", TOKEN_ENV]
    common.append("--quiet")
    attached = invoke(index_cli, *common, "--collection", "imported", "--out", tmp_path / "att", "--json")
    assert attached.exit_code == 0, attached.output
    assert json.loads(attached.output)["recall"] == 1.0  # auto on 450 rows: FLAT, measured
    with Retriever.open(tmp_path / "att") as r, FeatureBank.open(digits["test"]) as bank:
        assert [h.row for h in r.search_vectors(bank.features(9, 10), k=3)[0]][0] == 9
    wrong = invoke(index_cli, *common, "--collection", "shuffled", "--out", tmp_path / "bad")
    assert "differs from the bank's" in one_error_line(wrong)
    again = invoke(index_cli, *common, "--collection", "digits_resume", "--out", tmp_path / "bad2")
    assert "holds another bank" in one_error_line(again)
