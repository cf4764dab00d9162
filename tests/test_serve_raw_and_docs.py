"""The service's lean path and its docs, on a real uvicorn server on loopback: one image as the raw request
body (the same hits as a multipart upload and as the Retriever, the same caps and one-line errors), the
warm-up search each index answers before the port opens, and ``/docs`` rendered by headless Chromium with
every request off this machine refused (Swagger UI is served from the package)."""

from __future__ import annotations

import io
import os

import httpx
import numpy as np
import pytest
from PIL import Image
from serving import serving

from isdretrieve.bank.arrays import write_bank
from isdretrieve.data.open import open_dataset
from isdretrieve.index.build import build_index
from isdretrieve.retrieve.pictures import tensor_to_pil
from isdretrieve.retrieve.retriever import Retriever

ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--disable-sync"]  # fmt: skip


@pytest.fixture(scope="module")
def vectors_only(tmp_path_factory):
    """An index without encoder.pt (vector search only)."""
    root = tmp_path_factory.mktemp("vec")
    x = np.random.default_rng(0).standard_normal((200, 8)).astype(np.float32)
    build_index(write_bank(root / "bank.h5", x, labels=np.zeros(200, int), fingerprint="v"), root / "vectors")
    return root / "vectors"


@pytest.fixture(scope="module")
def server(digits_test_index, vectors_only):
    with serving([digits_test_index, vectors_only], max_upload_bytes=30_000, max_pixels=200_000) as running:
        yield running


@pytest.fixture(scope="module")
def client(server):
    with httpx.Client(base_url=server.url, timeout=60) as c:
        yield c


def _png(i: int) -> bytes:
    buffer = io.BytesIO()
    tensor_to_pil(open_dataset("digits", split="test")[i][0]).save(buffer, format="PNG")
    return buffer.getvalue()


def test_each_index_was_searched_once_before_the_first_request(server, client):
    # the warm-up's own search is the only forward so far: the encoder is loaded and has run
    stats = client.get(f"/api/indices/{server.name_of_digits}").json()["batcher"]
    assert (stats["forwards"], stats["images"], stats["jobs"]) == (1, 1, 1)


@pytest.fixture(scope="module", autouse=True)
def _names(server, digits_test_index):
    server.name_of_digits = digits_test_index.resolve().name


def test_a_raw_body_finds_what_multipart_and_the_retriever_find(server, client, digits_test_index):
    name = server.name_of_digits
    with Retriever.open(digits_test_index, device="cpu") as retriever:
        for i in (0, 17, 101):
            data = _png(i)
            raw = client.post(
                f"/api/indices/{name}/search/image", params={"k": 5, "file": "q.png"}, content=data
            )
            assert raw.status_code == 200 and raw.headers["content-type"] == "application/json", raw.text
            multipart = client.post(
                f"/api/indices/{name}/search/images", params={"k": 5}, files={"files": ("q.png", data)}
            )
            assert raw.json() == multipart.json()
            expected = retriever.search(Image.open(io.BytesIO(data)), k=5)[0]
            hits = raw.json()["results"][0]["hits"]
            assert [h["row"] for h in hits] == [h.row for h in expected] and hits[0]["index"] == i
            assert raw.json()["results"][0]["query"] == {"file": "q.png"}
            assert hits[0]["score"] == pytest.approx(expected[0].score, abs=1e-5)


@pytest.mark.parametrize(
    ("body", "status", "words"),
    [
        (b"", 415, "empty"),
        (b"not an image at all", 415, "not an image"),
        (b"\x89PNG\r\n\x1a\n" + b"\0" * 50, 415, "not an image"),
        (bytes(40_000), 413, "30,000-byte limit"),
    ],
)
def test_bad_raw_bodies_are_one_line_4xx(server, client, body, status, words):
    answer = client.post(f"/api/indices/{server.name_of_digits}/search/image", content=body)
    assert answer.status_code == status and list(answer.json()) == ["error"], answer.text
    assert words in answer.json()["error"] and "\n" not in answer.json()["error"]
    assert (
        client.post(f"/api/indices/{server.name_of_digits}/search/image", content=_png(3)).status_code == 200
    )


def test_raw_route_limits_k_and_needs_an_encoder(server, client):
    answer = client.post(
        f"/api/indices/{server.name_of_digits}/search/image", params={"k": 0}, content=_png(1)
    )
    assert answer.status_code == 422 and "k" in answer.json()["error"]
    answer = client.post("/api/indices/vectors/search/image", content=_png(1))
    assert answer.status_code == 400 and "no encoder.pt" in answer.json()["error"]
    answer = client.post(
        "/api/indices/vectors/search/vectors", json={"vectors": [[1.0] * 8]}, params={"k": 2}
    )
    assert answer.status_code == 200 and len(answer.json()["results"][0]["hits"]) == 2


def test_the_openapi_document_describes_the_raw_route(client):
    route = client.get("/openapi.json").json()["paths"]["/api/indices/{name}/search/image"]["post"]
    assert "application/octet-stream" in route["requestBody"]["content"]


def test_docs_and_their_assets_come_from_the_service(client):
    page = client.get("/docs")
    assert page.status_code == 200 and "cdn" not in page.text and "<script>" not in page.text
    assert "script-src 'self'" in page.headers["content-security-policy"]
    for asset, kind in (
        ("swagger-ui-bundle.js", "javascript"),
        ("swagger-ui.css", "css"),
        ("docs.js", "javascript"),
    ):
        answer = client.get(f"/docs/{asset}")
        assert (
            answer.status_code == 200 and kind in answer.headers["content-type"] and len(answer.content) > 200
        )


def test_docs_render_offline_in_chromium(server, chromium_path):
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        if os.environ.get("ISD_REQUIRE_BROWSER", "") not in ("", "0"):
            pytest.fail("ISD_REQUIRE_BROWSER is set but playwright is not installed")
        pytest.skip("playwright is not installed")
    refused: list[str] = []

    def network_off(route):  # only this machine's server is reachable
        if route.request.url.startswith(server.url):
            route.continue_()
        else:
            refused.append(route.request.url)
            route.abort("internetdisconnected")

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium_path, args=ARGS)
        try:
            context = browser.new_context()
            context.route("**/*", network_off)
            page = context.new_page()
            errors: list[str] = []
            page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
            page.goto(server.url + "/docs")
            page.wait_for_selector(".swagger-ui .opblock-summary-path", timeout=30_000)
            paths = page.eval_on_selector_all(".opblock-summary-path", "els => els.map(e => e.textContent)")
            assert "/api/indices/{name}/search/image" in "".join(paths) and len(paths) >= 10
            title = page.text_content(".swagger-ui .title")
            assert title and "isdretrieve search" in title
            page.locator('[data-path="/api/indices/{name}/search/image"]').first.click()  # the route opens
            page.wait_for_selector("option[value='application/octet-stream']", state="attached")
        finally:
            browser.close()
    assert not refused, refused
    assert not [e for e in errors if "Content Security Policy" in e], errors


def test_concurrent_raw_searches_get_their_own_answers(server, client):
    from concurrent.futures import ThreadPoolExecutor

    name = server.name_of_digits
    before = client.get(f"/api/indices/{name}").json()["batcher"]
    queries = [3, 40, 77, 120, 200, 311, 402, 449] * 3

    def search(i: int) -> int:
        with httpx.Client(base_url=server.url, timeout=60) as own:
            answer = own.post(f"/api/indices/{name}/search/image", params={"k": 3}, content=_png(i))
        assert answer.status_code == 200, answer.text
        return answer.json()["results"][0]["hits"][0]["index"]

    with ThreadPoolExecutor(8) as pool:
        assert list(pool.map(search, queries)) == queries
    after = client.get(f"/api/indices/{name}").json()["batcher"]
    assert after["jobs"] - before["jobs"] == len(queries) == after["images"] - before["images"]
    assert after["forwards"] - before["forwards"] <= len(queries)
