"""Damaged index files: every file is size-checked against the manifest before it is read or memory-mapped
(no SIGBUS from a truncated ``index.ivfdata``), the commands say so in one line, the service answers 503
for that index and keeps serving the others (a real server process on loopback), and a damaged file in
``ondisk.partial/`` is made again on rerun instead of a traceback."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import warnings
from pathlib import Path

import httpx
import numpy as np
import pytest
from click.testing import CliRunner

from isdretrieve.bank.arrays import write_bank
from isdretrieve.cli.index import main as index_cli
from isdretrieve.errors import BankError, DamagedFile
from isdretrieve.index.build import build_index
from isdretrieve.index.partial_build import PARTIAL_DIR
from isdretrieve.index.search import SearchIndex

ROWS, DIM = 3000, 16


@pytest.fixture(scope="module")
def bank(tmp_path_factory) -> Path:
    rng = np.random.default_rng(0)
    centres = rng.standard_normal((20, DIM)).astype(np.float32)
    x = centres[rng.integers(0, 20, ROWS)] + 0.3 * rng.standard_normal((ROWS, DIM), dtype=np.float32)
    root = tmp_path_factory.mktemp("damaged")
    return write_bank(root / "bank.h5", x, labels=np.arange(ROWS) % 5, fingerprint="damaged-test")


@pytest.fixture(scope="module")
def built(tmp_path_factory, bank) -> dict[str, Path]:
    """A finished on-disk IVF index and a Flat index over the same bank (copied per test)."""
    root = tmp_path_factory.mktemp("built")
    build_index(bank, root / "ondisk", factory="IVF8,SQ8", on_disk=True, shard_rows=1000, queries=100)
    build_index(bank, root / "flat", factory="Flat")
    return {"ondisk": root / "ondisk", "flat": root / "flat"}


def _copy(built: dict[str, Path], kind: str, target: Path) -> Path:
    shutil.copytree(built[kind], target)
    return target


def _truncate(path: Path, keep: float = 0.5) -> None:
    os.truncate(path, int(path.stat().st_size * keep))


def _grow(path: Path) -> None:
    with open(path, "ab") as f:
        f.write(b"\0" * 4096)


DAMAGE = {
    "ivfdata-truncated": (
        "ondisk",
        lambda d: _truncate(d / "index.ivfdata"),
        "index.ivfdata is damaged (truncated",
    ),
    "ivfdata-to-one-byte": (
        "ondisk",
        lambda d: os.truncate(d / "index.ivfdata", 1),
        "index.ivfdata is damaged",
    ),
    "ivfdata-grown": (
        "ondisk",
        lambda d: _grow(d / "index.ivfdata"),
        "index.ivfdata is damaged (longer than built",
    ),
    "ivfdata-removed": ("ondisk", lambda d: (d / "index.ivfdata").unlink(), "index.ivfdata is missing"),
    "index-faiss-truncated": (
        "flat",
        lambda d: _truncate(d / "index.faiss"),
        "index.faiss is damaged (truncated",
    ),
    "bank-truncated": (
        "flat",
        lambda d: _truncate(d / "bank.h5", 0.9),
        "bank.h5",
    ),
}


@pytest.mark.parametrize("case", sorted(DAMAGE))
def test_a_damaged_index_is_refused_before_it_is_mapped(built, tmp_path, case):
    kind, damage, message = DAMAGE[case]
    directory = _copy(built, kind, tmp_path / "idx")
    damage(directory)
    with pytest.raises(BankError, match=message.replace("(", r"\(")) as raised:
        SearchIndex.open(directory)
    assert isinstance(raised.value, DamagedFile) or case == "bank-truncated"  # h5py refuses that one
    assert "truncated" in str(raised.value) or case in ("ivfdata-grown", "ivfdata-removed")
    report = tmp_path / "report"
    commands = (
        ["recall", directory],
        ["neighbours", directory, "--query", "0,1", "--out", report],
        ["info", directory],
    )
    for command in commands:
        result = CliRunner().invoke(index_cli, [str(a) for a in command])
        assert result.exit_code == 2, (command, result.output)
        lines = result.output.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], result.output


def test_recall_and_neighbours_on_a_truncated_ivfdata_in_a_fresh_process_end_in_one_line(built, tmp_path):
    """In its own process, where a SIGBUS would kill the command: exit code 2 and one line, no signal."""
    directory = _copy(built, "ondisk", tmp_path / "idx")
    _truncate(directory / "index.ivfdata")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    code = "from isdretrieve.cli.index import main; main()"
    neighbours = ["neighbours", str(directory), "--query", "0", "-k", "2", "--out", str(tmp_path / "r")]
    for args in (["recall", str(directory)], neighbours):
        done = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, env=env)
        assert done.returncode == 2, (done.returncode, done.stderr)
        assert done.stderr.strip().startswith("error: ") and "index.ivfdata is damaged" in done.stderr
        assert "Traceback" not in done.stderr and len(done.stderr.strip().splitlines()) == 1


def test_manifests_of_0_1_0_without_recorded_sizes_are_still_checked(built, tmp_path):
    """An older manifest has no file_bytes: index.faiss and index.ivfdata sizes come from index_bytes and
    ivfdata_bytes, which it has."""
    directory = _copy(built, "ondisk", tmp_path / "idx")
    manifest = json.loads((directory / "manifest.json").read_text())
    del manifest["file_bytes"]
    (directory / "manifest.json").write_text(json.dumps(manifest))
    with SearchIndex.open(directory) as index:
        assert index.search(index.bank.features(0, 2), 3)[1][:, 0].tolist() == [0, 1]
    _truncate(directory / "index.ivfdata")
    with pytest.raises(DamagedFile, match="index.ivfdata is damaged"):
        SearchIndex.open(directory)


def test_a_file_truncated_under_an_open_index_is_refused_at_the_next_search(built, tmp_path):
    directory = _copy(built, "ondisk", tmp_path / "idx")
    with SearchIndex.open(directory) as index:
        query = index.bank.features(0, 3)
        assert index.search(query, 5)[1][:, 0].tolist() == [0, 1, 2]
        _truncate(directory / "index.ivfdata")
        for _ in range(2):
            with pytest.raises(DamagedFile, match="index.ivfdata is damaged"):
                index.search(query, 5)


# ------------------------------------------------------------------------------- the service, for real
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _serve(dirs: list[Path]) -> tuple[subprocess.Popen, str]:
    port = _free_port()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    code = "from isdretrieve.cli.index import main; main()"
    args = ["serve", *map(str, dirs), "--port", str(port), "--device", "cpu"]
    child = subprocess.Popen([sys.executable, "-c", code, *args], stderr=subprocess.PIPE, text=True, env=env)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while True:
        assert child.poll() is None, child.stderr.read()
        try:
            if httpx.get(f"{url}/api/indices", timeout=5).status_code == 200:
                return child, url
        except httpx.TransportError:
            assert time.monotonic() < deadline, "the server never answered"
            time.sleep(0.2)


def _vector_search(url: str, name: str, vector: list[float]) -> httpx.Response:
    return httpx.post(f"{url}/api/indices/{name}/search/vectors", params={"k": 3}, json={"vectors": [vector]})


def test_the_service_answers_503_for_a_damaged_index_and_keeps_serving_the_others(built, bank, tmp_path):
    healthy = _copy(built, "flat", tmp_path / "healthy")
    broken_at_start = _copy(built, "ondisk", tmp_path / "broken")
    _truncate(broken_at_start / "index.ivfdata")
    broken_later = _copy(built, "ondisk", tmp_path / "later")
    grown = _copy(built, "flat", tmp_path / "grown")
    _grow(grown / "bank.h5")
    with SearchIndex.open(healthy) as index:
        vector = index.bank.features(7, 8)[0].tolist()
    child, url = _serve([healthy, broken_at_start, broken_later, grown])
    try:
        listed = {one["name"]: one for one in httpx.get(f"{url}/api/indices").json()}
        assert "index.ivfdata is damaged (truncated" in listed["broken"]["damaged"]
        assert "bank.h5 is damaged (longer than built" in listed["grown"]["damaged"]
        assert listed["healthy"]["rows"] == listed["later"]["rows"] == ROWS
        assert _vector_search(url, "later", vector).json()["results"][0]["hits"][0]["row"] == 7
        _truncate(broken_later / "index.ivfdata")  # damaged while it is served and mapped
        for name in ("broken", "later", "grown"):
            for answer in (_vector_search(url, name, vector), httpx.get(f"{url}/api/indices/{name}/rows/0")):
                if name == "later" and answer.request.method == "GET":
                    assert answer.status_code == 200  # a bank row needs no list: still answered
                    continue
                assert answer.status_code == 503, (name, answer.text)
                assert set(answer.json()) == {"error"} and "damaged" in answer.json()["error"]
                assert "\n" not in answer.json()["error"]
        for _ in range(3):  # the others keep serving, and the process is alive (no SIGBUS)
            hits = _vector_search(url, "healthy", vector).json()["results"][0]["hits"]
            assert hits[0]["row"] == 7
        assert child.poll() is None
    finally:
        child.send_signal(signal.SIGTERM)
        child.wait(timeout=30)
    assert child.returncode in (0, -signal.SIGTERM), child.returncode


def test_the_service_refuses_to_start_when_every_index_is_damaged(built, tmp_path):
    broken = _copy(built, "ondisk", tmp_path / "broken")
    _truncate(broken / "index.ivfdata")
    result = CliRunner().invoke(index_cli, ["serve", str(broken), "--port", str(_free_port())])
    assert result.exit_code == 2
    assert result.output.strip().splitlines()[-1].startswith("error: no index to serve: ")


# ----------------------------------------------------------------------------------- ondisk.partial
def _interrupted_build(bank: Path, out: Path, monkeypatch) -> None:
    from isdretrieve.index import ondisk

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")

    with monkeypatch.context() as patched:
        patched.setattr(ondisk, "merge_ondisk", full_disk)
        with pytest.raises(OSError, match="No space"):
            build_index(bank, out, factory="IVF8,SQ8", on_disk=True, shard_rows=1000, queries=100)
    assert sorted(p.name for p in (out / PARTIAL_DIR).iterdir())[:2] == ["build.json", "shard-00000.faiss"]


def _flip(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


PARTIAL_DAMAGE = {
    "shard-truncated": (lambda p: _truncate(p / "shard-00001.faiss"), 1),
    "shard-byte-flipped": (lambda p: _flip(p / "shard-00002.faiss"), 1),
    "shard-emptied": (lambda p: os.truncate(p / "shard-00000.faiss", 0), 1),
    "trained-truncated": (lambda p: _truncate(p / "trained.faiss"), 3),  # retrained: every shard again
    "build-json-garbage": (lambda p: (p / "build.json").write_text("{oops"), 3),  # a fresh start
}


@pytest.mark.parametrize("case", sorted(PARTIAL_DAMAGE))
def test_a_damaged_file_in_ondisk_partial_is_made_again(bank, built, tmp_path, monkeypatch, case):
    damage, refilled = PARTIAL_DAMAGE[case]
    out = tmp_path / "idx"
    _interrupted_build(bank, out, monkeypatch)
    damage(out / PARTIAL_DIR)
    from isdretrieve.index import ondisk

    cloned = []
    clone = ondisk.faiss.clone_index
    monkeypatch.setattr(ondisk.faiss, "clone_index", lambda i: cloned.append(1) or clone(i))
    with warnings.catch_warnings(record=True):
        warnings.simplefilter("always")
        manifest = build_index(bank, out, factory="IVF8,SQ8", on_disk=True, shard_rows=1000, queries=100)
    assert len(cloned) == refilled and manifest.shards == 3
    with SearchIndex.open(out) as index, SearchIndex.open(built["ondisk"]) as reference:
        query = index.bank.features(0, 20)
        np.testing.assert_array_equal(index.search(query, 5)[1], reference.search(query, 5)[1])
