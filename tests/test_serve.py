"""``isd-index serve`` on real indices through a real uvicorn server on loopback: every JSON route against
the library, every bad input and security case (each a 4xx with a one-line JSON error, the server still
serving), the token, and concurrent image queries merged into shared encoder forwards."""

from __future__ import annotations

import io
import json
import struct
import threading
import time
import zlib
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest
import torch
from click.testing import CliRunner
from conftest import build_test_index
from PIL import Image
from serving import CLASS_PAYLOAD, PAYLOAD, hostile_folder, index_with_pairs, serving

from isdretrieve.cli.index import main as index_cli
from isdretrieve.data.open import open_dataset
from isdretrieve.files.bank import FeatureBank
from isdretrieve.files.pairs import Pairs
from isdretrieve.mine.audit import audit_pairs
from isdretrieve.retrieve.pictures import THUMB, fit, tensor_to_pil
from isdretrieve.retrieve.retriever import Retriever
from isdretrieve.serve.batcher import EncodeBatcher
from isdretrieve.serve.security import PAGE_POLICY, check_bind, is_loopback

TOKEN = "correct-horse-battery-staple"


@pytest.fixture(scope="module")
def indices(tmp_path_factory, digits_test_index):
    """{"digits": the digits test index with pairs.h5 and its audit, "hostile": a folder index whose class
    and file names carry HTML}."""
    root = tmp_path_factory.mktemp("served")
    digits = index_with_pairs(digits_test_index, root / "digits")
    hostile = build_test_index(root, f"folder:{hostile_folder(root / 'data')}", name="hostile")
    return {"digits": digits, "hostile": hostile}


@pytest.fixture(scope="module")
def server(indices):
    with serving(list(indices.values())) as running:
        yield running


@pytest.fixture(scope="module")
def client(server):
    with httpx.Client(base_url=server.url, timeout=60) as c:
        yield c


@pytest.fixture(scope="module")
def strict(indices):
    """A server that wants a token (bound to loopback all the same) and has small upload caps."""
    settings = {"token": TOKEN, "max_upload_bytes": 20_000, "max_pixels": 100_000, "max_files": 2}
    with serving([indices["digits"]], **settings) as running:
        yield running


@pytest.fixture(scope="module")
def digits():
    return open_dataset("digits", split="test")


def _png(image: Image.Image | torch.Tensor) -> bytes:
    picture = tensor_to_pil(image) if isinstance(image, torch.Tensor) else image
    buffer = io.BytesIO()
    picture.save(buffer, format="PNG")
    return buffer.getvalue()


def _bomb(width: int, height: int) -> bytes:
    """A 1x1 PNG whose header claims ``width`` x ``height`` pixels (a decompression bomb's header)."""
    data = bytearray(_png(Image.new("RGB", (1, 1))))
    ihdr = struct.pack(">II", width, height) + data[24:29]
    data[16:29] = ihdr
    data[29:33] = struct.pack(">I", zlib.crc32(b"IHDR" + ihdr))
    return bytes(data)


def _one_line_error(response: httpx.Response, status: int, *words: str) -> str:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    body = response.json()
    assert list(body) == ["error"] and "\n" not in body["error"] and body["error"], body
    for word in words:
        assert word in body["error"], body
    return body["error"]


# ----------------------------------------------------------------------------------------------- routes
def test_indices_info_manifest_and_docs(client, indices):
    listed = client.get("/api/indices").json()
    assert [one["name"] for one in listed] == ["digits", "hostile"]
    digits = listed[0]
    assert digits["rows"] == 450 and digits["dim"] == 256 and digits["classes"] == [str(d) for d in range(10)]
    assert digits["pairs"] == ["pairs"] and digits["image_search"] and listed[1]["pairs"] == []
    assert listed[1]["classes"] == [CLASS_PAYLOAD, "plain"]  # names travel as data; the page escapes them
    info = client.get("/api/indices/digits").json()
    assert info["data_spec"] == "digits,split=test" and info["device"] == "cpu"
    manifest = client.get("/api/indices/digits/manifest").json()
    on_disk = json.loads((indices["digits"] / "manifest.json").read_text())
    assert (
        manifest["factory"] == on_disk["factory"] == "Flat" and manifest["count"] == on_disk["count"] == 450
    )
    docs = client.get("/docs")
    assert docs.status_code == 200 and "swagger" in docs.text.lower()
    routes = client.get("/openapi.json").json()["paths"]
    assert (
        "/api/indices/{name}/search/images" in routes and "/api/indices/{name}/rows/{row}/thumb.png" in routes
    )
    page = client.get("/")
    assert (
        page.status_code == 200
        and '<script src="/static/app.js"' in page.text
        and "<script>" not in page.text
    )
    assert client.get("/static/app.js").headers["content-type"].startswith("text/javascript")


def test_image_search_equals_the_retriever(client, indices, digits):
    retriever = Retriever.open(indices["digits"], device="cpu")
    files = [("files", (f"q{i}.png", _png(digits[i][0]))) for i in range(3)]
    response = client.post("/api/indices/digits/search/images", params={"k": 5}, files=files)
    assert response.status_code == 200, response.text
    results = response.json()["results"]
    expected = retriever.search(digits.load_all()[:3], k=5)
    assert [r["query"]["file"] for r in results] == ["q0.png", "q1.png", "q2.png"]
    for i, (result, hits) in enumerate(zip(results, expected, strict=True)):
        assert [h["row"] for h in result["hits"]] == [h.row for h in hits]
        assert np.allclose([h["score"] for h in result["hits"]], [h.score for h in hits], atol=1e-5)
        assert result["hits"][0]["index"] == i and result["hits"][0]["score"] == pytest.approx(1.0, abs=1e-4)
        first = result["hits"][0]
        assert first["label"] == int(digits.labels[i]) and first["class"] == str(int(digits.labels[i]))
        assert first["other_class"] is None  # an upload has no label


def test_row_neighbours_and_vector_search(client, indices):
    retriever = Retriever.open(indices["digits"], device="cpu")
    body = client.get("/api/indices/digits/rows/5/neighbours", params={"k": 4}).json()["results"][0]
    expected = retriever.neighbours([5], k=4)[0]
    assert body["query"]["row"] == 5 and body["query"]["label"] == expected.query.label
    assert [h["row"] for h in body["hits"]] == [h.row for h in expected.hits] and 5 not in [
        h["row"] for h in body["hits"]
    ]
    assert [h["other_class"] for h in body["hits"]] == [h.label_differs for h in expected.hits]
    assert all(h["other_class"] == (h["label"] != body["query"]["label"]) for h in body["hits"])
    with FeatureBank.open(indices["digits"] / "bank.h5") as bank:
        vector = bank.features(7, 8)[0]
    found = client.post(
        "/api/indices/digits/search/vectors", params={"k": 3}, json={"vectors": [vector.tolist()]}
    )
    hits = found.json()["results"][0]["hits"]
    assert hits[0]["row"] == 7 and [h["row"] for h in hits] == [
        h.row for h in retriever.search(vector, k=3)[0]
    ]


def test_random_rows_class_filter_and_thumbnails(client, indices, digits):
    sample = client.get("/api/indices/digits/rows", params={"n": 12, "seed": 3}).json()["rows"]
    retriever = Retriever.open(indices["digits"], device="cpu")
    assert [r["row"] for r in sample] == retriever.sample_rows(12, seed=3)
    threes = client.get("/api/indices/digits/rows", params={"n": 500, "label": 3}).json()["rows"]
    assert len(threes) == int((digits.labels == 3).sum()) and {r["class"] for r in threes} == {"3"}
    thumb = client.get(sample[0]["thumb"])
    assert thumb.status_code == 200 and thumb.headers["content-type"] == "image/png"
    picture = np.asarray(Image.open(io.BytesIO(thumb.content)).convert("RGB"))
    expected = np.asarray(fit(tensor_to_pil(digits[sample[0]["index"]][0]), THUMB))
    assert picture.shape == (THUMB, THUMB, 3) and np.array_equal(
        picture, expected
    )  # from the in-memory data set
    hostile = client.get("/api/indices/hostile/rows", params={"n": 50}).json()["rows"]
    payload = next(r for r in hostile if r["path"] == f"{CLASS_PAYLOAD}/{PAYLOAD}.png")
    assert payload["class"] == CLASS_PAYLOAD and client.get(payload["thumb"]).status_code == 200  # files too


def test_pairs_and_their_audit(client, indices):
    listed = client.get("/api/indices/digits/pairs").json()
    pairs = Pairs.open(indices["digits"] / "pairs.h5")
    assert listed[0]["name"] == "pairs" and listed[0]["pairs"] == pairs.num_pairs and listed[0]["audit"]
    row = int(np.flatnonzero(pairs.counts > 0)[0])
    body = client.get(f"/api/indices/digits/pairs/pairs/rows/{row}").json()
    rows, sims = pairs.positives(row)
    assert body["anchor"]["row"] == row and [p["row"] for p in body["positives"]] == rows.tolist()
    assert np.allclose([p["similarity"] for p in body["positives"]], sims, atol=1e-5)
    audit = client.get("/api/indices/digits/pairs/pairs/audit").json()
    with FeatureBank.open(indices["digits"] / "bank.h5") as bank:
        expected = audit_pairs(pairs, bank.labels(), bank.classes)
    assert audit["chosen"]["precision"] == pytest.approx(expected.chosen.precision)
    assert len(audit["per_class"]) == 10


# ------------------------------------------------------------------------------------ bad input, security
BAD_INPUT_IDS = [
    "non-image",
    "empty-upload",
    "decompression-bomb",
    "no-files-field",
    "row-past-the-bank",
    "negative-row",
    "row-not-a-number",
    "row-path-traversal",
    "k-zero",
    "k-over-max",
    "k-over-bank",
    "sample-zero",
    "vector-length",
    "vector-nan",
    "vectors-not-a-list",
    "body-not-json",
    "unknown-index",
    "pairs-path-traversal",
    "pairs-backslash-name",
    "pairs-not-a-pairs-file",
    "no-pairs-in-index",
    "unknown-route",
    "wrong-method",
]


@pytest.mark.parametrize(
    ("method", "path", "kwargs", "status", "words"),
    [
        (
            "post",
            "/api/indices/digits/search/images",
            {"files": {"files": ("a.png", b"not an image")}},
            415,
            ["not an image"],
        ),
        ("post", "/api/indices/digits/search/images", {"files": {"files": ("a.png", b"")}}, 415, ["empty"]),
        (
            "post",
            "/api/indices/digits/search/images",
            {"files": {"files": ("a.png", _bomb(50_000, 50_000))}},
            413,
            ["decompression bomb"],
        ),
        ("post", "/api/indices/digits/search/images", {"data": {"x": "1"}}, 422, ["files"]),
        ("get", "/api/indices/digits/rows/450/neighbours", {}, 400, ["unknown bank row 450"]),
        ("get", "/api/indices/digits/rows/-1", {}, 422, ["row"]),
        ("get", "/api/indices/digits/rows/abc/thumb.png", {}, 422, ["row"]),
        ("get", "/api/indices/digits/rows/..%2F..%2Fetc%2Fpasswd/thumb.png", {}, 404, ["Not Found"]),
        ("get", "/api/indices/digits/rows/5/neighbours?k=0", {}, 422, ["k"]),
        ("get", "/api/indices/digits/rows/5/neighbours?k=5000", {}, 422, ["k"]),
        ("get", "/api/indices/digits/rows/5/neighbours?k=450", {}, 400, ["k must be between 1 and 449"]),
        ("get", "/api/indices/digits/rows?n=0", {}, 422, ["n"]),
        (
            "post",
            "/api/indices/digits/search/vectors",
            {"json": {"vectors": [[0.5] * 5]}},
            400,
            ["256 numbers"],
        ),
        (
            "post",
            "/api/indices/digits/search/vectors",
            {
                "content": '{"vectors": [[NaN' + ", 0.5" * 255 + "]]}",
                "headers": {"content-type": "application/json"},
            },
            400,
            ["finite"],
        ),
        ("post", "/api/indices/digits/search/vectors", {"json": {"vectors": "x"}}, 422, ["vectors"]),
        (
            "post",
            "/api/indices/digits/search/vectors",
            {"content": b"{not json", "headers": {"content-type": "application/json"}},
            422,
            ["request body is not valid JSON: Expecting property name"],
        ),
        ("get", "/api/indices/nope/rows/1", {}, 404, ["unknown index 'nope'"]),
        ("get", "/api/indices/digits/pairs/..%2Fbank/audit", {}, 404, ["Not Found"]),
        ("get", "/api/indices/digits/pairs/..%5Cbank.h5/audit", {}, 404, ["no pairs file"]),
        ("get", "/api/indices/digits/pairs/bank/rows/0", {}, 404, ["no pairs file 'bank'"]),
        ("get", "/api/indices/hostile/pairs/pairs/audit", {}, 404, ["no pairs file"]),
        ("get", "/no/such/route", {}, 404, ["Not Found"]),
        ("delete", "/api/indices", {}, 405, ["Method Not Allowed"]),
    ],
    ids=BAD_INPUT_IDS,
)
def test_bad_input_is_a_one_line_4xx_and_the_server_keeps_serving(
    client, method, path, kwargs, status, words
):
    _one_line_error(client.request(method.upper(), path, **kwargs), status, *words)
    assert client.get("/api/indices").status_code == 200


def test_upload_caps_in_bytes_pixels_and_files(strict, digits):
    headers = {"Authorization": f"Bearer {TOKEN}"}
    with httpx.Client(base_url=strict.url, headers=headers, timeout=60) as c:
        url = "/api/indices/digits/search/images"
        noise = np.random.default_rng(0).integers(0, 256, size=(120, 120, 3), dtype=np.uint8)
        big = _png(Image.fromarray(noise))  # ~43 kB: over the 20,000-byte cap, the body under its cap
        _one_line_error(c.post(url, files={"files": ("big.png", big)}), 413, "20,000-byte")
        wide = _png(Image.new("RGB", (1000, 1000), (9, 9, 9)))  # small file, 1 M pixels > 100,000
        assert len(wide) < 20_000
        _one_line_error(c.post(url, files={"files": ("wide.png", wide)}), 413, "1000 x 1000", "100,000-pixel")
        three = [("files", (f"{i}.png", _png(digits[i][0]))) for i in range(3)]
        _one_line_error(c.post(url, files=three), 413, "at most 2 images")
        _one_line_error(
            c.post(url, content=b"x" * 200_000, headers={"content-type": "image/png"}),
            413,
            "request body over",
        )

        def chunks():  # no Content-Length: the body is counted as it arrives
            yield b'--b\r\nContent-Disposition: form-data; name="files"; filename="a.png"\r\n\r\n'
            for _ in range(20):
                yield b"y" * 10_000

        form = {"content-type": "multipart/form-data; boundary=b"}
        _one_line_error(c.post(url, content=chunks(), headers=form), 413, "request body over")
        ok = c.post(url, files={"files": ("0.png", _png(digits[0][0]))})
        assert ok.status_code == 200 and ok.json()["results"][0]["hits"][0]["index"] == 0


def test_token_on_api_routes(strict):
    with httpx.Client(base_url=strict.url, timeout=60) as c:
        _one_line_error(c.get("/api/indices"), 401, "token is required")
        _one_line_error(
            c.get("/api/indices", headers={"Authorization": "Bearer wrong-token"}), 401, "wrong token"
        )
        _one_line_error(c.get("/api/indices/digits/rows/0/thumb.png"), 401, "token")
        assert c.get("/api/indices", headers={"Authorization": f"Bearer {TOKEN}"}).status_code == 200
        assert c.get("/api/indices", headers={"Cookie": f"isd_token={TOKEN}"}).status_code == 200
        assert c.get("/").status_code == 200 and c.get("/static/app.js").status_code == 200  # no data there


def test_security_headers_and_loopback_host_check(client):
    for path in ("/", "/static/app.js", "/api/indices", "/api/indices/digits/rows/0/thumb.png", "/nope"):
        response = client.get(path)
        assert response.headers["content-security-policy"] == PAGE_POLICY, path
        assert response.headers["x-content-type-options"] == "nosniff", path
    assert "script-src 'self';" in PAGE_POLICY and "unsafe-inline" not in PAGE_POLICY
    # without a token only loopback Host names are answered (DNS rebinding)
    _one_line_error(client.get("/api/indices", headers={"Host": "evil.example:80"}), 403, "loopback")
    assert client.get("/api/indices", headers={"Host": "localhost"}).status_code == 200


def test_cli_refuses_to_bind_beyond_loopback_without_a_token(indices, monkeypatch):
    monkeypatch.delenv("ISD_SERVE_TOKEN", raising=False)
    runner = CliRunner()
    result = runner.invoke(index_cli, ["serve", str(indices["digits"]), "--host", "0.0.0.0"])
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert result.output.strip().splitlines() == [
        "error: refusing to serve on 0.0.0.0 without a token: give --token or set ISD_SERVE_TOKEN "
        "(or bind to 127.0.0.1)"
    ]
    short = runner.invoke(index_cli, ["serve", str(indices["digits"]), "--host", "::", "--token", "abc"])
    assert short.exit_code == 2 and "at least 16 characters" in short.output
    bad_port = runner.invoke(index_cli, ["serve", str(indices["digits"]), "--port", "70000"])
    assert bad_port.exit_code == 2 and "70000" in bad_port.output
    check_bind("0.0.0.0", TOKEN)  # with a token it may
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("192.168.1.2") and not is_loopback("example.com")


def test_row_pictures_come_from_the_data_set_only(indices, tmp_path, monkeypatch):
    """With its data folder gone, a row has no picture, even where its bank path names a readable file."""
    import shutil

    data = indices["hostile"].parent / "data"
    moved = tmp_path / "moved"
    retriever = Retriever.open(indices["hostile"], device="cpu")
    shutil.copytree(data, moved)
    shutil.rmtree(data)
    try:
        monkeypatch.chdir(moved)  # the rows' relative paths now name files here
        row = retriever.row(0)
        assert (moved / row.path).is_file() and retriever.row_image(0) is None
    finally:
        shutil.copytree(moved, data)


# --------------------------------------------------------------------------------------------- batching
def test_batcher_merges_waiting_jobs_into_one_forward():
    release, calls = threading.Event(), []

    def encode(x: torch.Tensor) -> torch.Tensor:
        calls.append(len(x))
        release.wait(10)
        return x.float().flatten(1)[:, :2]

    batcher = EncodeBatcher(encode, max_batch=8)
    results: dict[int, float] = {}

    def call(i: int) -> None:
        results[i] = batcher.encode(torch.full((1, 3, 2, 2), i, dtype=torch.uint8))[0, 0].item()

    first = threading.Thread(target=call, args=(100,))
    first.start()
    while not calls:  # the first forward runs on the first caller's thread
        time.sleep(0.001)
    waiting = [threading.Thread(target=call, args=(i,)) for i in range(10)]
    for thread in waiting:
        thread.start()
    while len(batcher._queue) < 10:  # all ten queued behind the running forward
        time.sleep(0.001)
    release.set()
    for thread in [first, *waiting]:
        thread.join(10)
    assert results == {i: float(i) for i in [100, *range(10)]}  # each caller gets its own features
    assert calls == [1, 8, 2] and batcher.stats.forwards == 3 and batcher.stats.most_jobs == 8
    assert batcher.stats.jobs == batcher.stats.images == 11


def test_batcher_passes_an_encoder_error_to_its_callers_and_keeps_running():
    def encode(x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] == 3:
            raise RuntimeError("boom")
        return x.float().flatten(1)

    batcher = EncodeBatcher(encode)
    with pytest.raises(RuntimeError, match="boom"):
        batcher.encode(torch.zeros(3, 3, 1, 1, dtype=torch.uint8))
    assert batcher.encode(torch.ones(1, 3, 1, 1, dtype=torch.uint8)).shape == (1, 3)


def test_concurrent_image_queries_get_their_own_results_from_shared_forwards(server, digits):
    """24 clients at once, each with another digit: every answer is its own image; forwards were shared
    (the encoder is slowed to 50 ms a forward so that requests surely overlap on a loaded machine)."""
    from isdretrieve.serve.state import ServedIndex

    served: ServedIndex = server.served["digits"]
    batcher = served.batcher
    original, before, jobs_before = batcher.encode_batch, batcher.stats.forwards, batcher.stats.jobs

    def slow(x: torch.Tensor) -> torch.Tensor:
        time.sleep(0.05)
        return original(x)

    batcher.encode_batch = slow
    images = [_png(digits[i][0]) for i in range(24)]

    def query(i: int) -> int:
        with httpx.Client(base_url=server.url, timeout=60) as c:
            body = c.post(
                "/api/indices/digits/search/images", params={"k": 1}, files={"files": ("q.png", images[i])}
            )
            assert body.status_code == 200, body.text
            return body.json()["results"][0]["hits"][0]["index"]

    try:
        with ThreadPoolExecutor(24) as pool:
            found = list(pool.map(query, range(24)))
    finally:
        batcher.encode_batch = original
    assert found == list(range(24))
    forwards = batcher.stats.forwards - before
    assert batcher.stats.jobs - jobs_before == 24 and forwards < 24 and batcher.stats.most_jobs > 1


def test_an_encoder_failure_is_a_json_500_and_the_server_keeps_serving(server, client, digits):
    batcher = server.served["digits"].batcher
    original = batcher.encode_batch

    def broken(x: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("simulated encoder failure")

    batcher.encode_batch = broken
    try:
        files = {"files": ("q.png", _png(digits[0][0]))}
        _one_line_error(client.post("/api/indices/digits/search/images", files=files), 500, "RuntimeError")
    finally:
        batcher.encode_batch = original
    again = client.post("/api/indices/digits/search/images", files={"files": ("q.png", _png(digits[0][0]))})
    assert again.status_code == 200 and again.json()["results"][0]["hits"][0]["index"] == 0


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_the_encoder_runs_on_the_gpu_when_there_is_one(indices, digits):
    with serving([indices["digits"]], device="auto") as running, httpx.Client(base_url=running.url) as c:
        assert c.get("/api/indices/digits").json()["device"].startswith("cuda")
        files = [("files", (f"{i}.png", _png(digits[i][0]))) for i in range(4)]
        hits = c.post("/api/indices/digits/search/images", files=files).json()["results"]
        assert [r["hits"][0]["index"] for r in hits] == [0, 1, 2, 3]


def test_the_console_command_serves_and_prints_its_address_as_json(indices):
    """``isd-index serve --json`` as a real process: one JSON line on stdout, then it answers on loopback,
    and SIGTERM stops it."""
    import os
    import signal
    import socket
    import subprocess
    import sys

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    code = "from isdretrieve.cli.index import main; main()"
    args = ["serve", str(indices["digits"]), "--port", str(port), "--device", "cpu", "--json"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    child = subprocess.Popen([sys.executable, "-c", code, *args], stdout=subprocess.PIPE, text=True, env=env)
    try:
        lines = [child.stdout.readline()]
        while lines[-1].rstrip() != "}":  # one (indented) JSON document, then the server runs
            assert lines[-1], "the command ended before printing its address"
            lines.append(child.stdout.readline())
        started = json.loads("".join(lines))
        assert started["url"] == f"http://127.0.0.1:{port}/" and list(started["indices"]) == ["digits"]
        deadline = time.monotonic() + 60
        while True:
            try:
                listed = httpx.get(f"{started['url']}api/indices", timeout=5)
                break
            except httpx.TransportError:
                assert time.monotonic() < deadline, "the server never answered"
                time.sleep(0.2)
        assert listed.status_code == 200 and "digits" in listed.text
    finally:
        child.send_signal(signal.SIGTERM)
        child.wait(timeout=30)
