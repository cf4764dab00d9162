"""The service's embedding route and map page, through a real uvicorn server on loopback, against the
library (``Retriever.embed``); and an index directory that holds only ``encoder.safetensors``."""

from __future__ import annotations

import io
import shutil

import httpx
import numpy as np
import pytest
from PIL import Image
from serving import serving

from isdretrieve.data.open import open_dataset
from isdretrieve.models.checkpoints import convert_checkpoint
from isdretrieve.retrieve.pictures import tensor_to_pil
from isdretrieve.retrieve.retriever import Retriever


def _png(index: int) -> bytes:
    buffer = io.BytesIO()
    tensor_to_pil(open_dataset("digits", split="test")[index][0]).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def served(digits_test_index):
    with (
        serving([digits_test_index], max_files=3, max_upload_bytes=20_000) as running,
        httpx.Client(base_url=running.url, timeout=120) as client,
    ):
        yield client


def _files(*indices: int) -> list[tuple[str, tuple[str, bytes, str]]]:
    return [("files", (f"{i}.png", _png(i), "image/png")) for i in indices]


def test_embed_route_gives_the_library_rows_as_json_and_raw(served, digits_test_index):
    with Retriever.open(digits_test_index, device="cpu") as retriever:
        expected = retriever.embed(
            [tensor_to_pil(open_dataset("digits", split="test")[i][0]) for i in (3, 7)]
        )
        bank_rows = retriever.index.bank.features(3, 8)
    assert expected.dtype == np.float32 and expected.shape == (2, 256)
    np.testing.assert_allclose(np.linalg.norm(expected, axis=1), 1.0, rtol=1e-5)
    np.testing.assert_allclose(expected, bank_rows[[0, 4]], atol=1e-5)  # the bank's own rows, re-embedded

    answer = served.post("/api/indices/index/embed", files=_files(3, 7))
    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert (body["count"], body["dim"], body["files"]) == (2, 256, ["3.png", "7.png"])
    as_json = np.array(body["embeddings"], dtype=np.float32)
    np.testing.assert_array_equal(as_json, expected)  # float32 values survive JSON exactly

    raw = served.post("/api/indices/index/embed?format=raw", files=_files(3, 7))
    assert raw.headers["content-type"] == "application/octet-stream"
    assert raw.headers["x-embedding-shape"] == "2,256" and raw.headers["x-embedding-dtype"] == "<f4"
    np.testing.assert_array_equal(np.frombuffer(raw.content, dtype="<f4").reshape(2, 256), expected)

    by_accept = served.post(
        "/api/indices/index/embed", files=_files(3), headers={"Accept": "application/octet-stream"}
    )
    alone = np.frombuffer(by_accept.content, dtype="<f4")
    np.testing.assert_allclose(alone, expected[0], atol=1e-6)  # a batch of one: the same up to BLAS order
    json_first = served.post(
        "/api/indices/index/embed",
        files=_files(3),
        headers={"Accept": "application/json, application/octet-stream"},
    )
    assert json_first.json()["count"] == 1


@pytest.mark.parametrize(
    ("case", "status", "words"),
    [
        ("too-many", 413, ["at most 3 images a request, got 4"]),
        ("too-big", 413, ["image upload is over the 20,000-byte limit"]),
        ("not-an-image", 415, ["the upload is not an image"]),
        ("bad-format", 422, ["format"]),
        ("unknown-index", 404, ["unknown index 'nope'"]),
    ],
)
def test_embed_bad_input_is_a_one_line_4xx_and_the_server_keeps_serving(served, case, status, words):
    big = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (200, 200, 3), dtype=np.uint8)).save(big, "PNG")
    url, files = "/api/indices/index/embed", _files(1)
    if case == "too-many":
        files = _files(1, 2, 3, 4)
    elif case == "too-big":
        files = [("files", ("big.png", big.getvalue(), "image/png"))]
    elif case == "not-an-image":
        files = [("files", ("x.png", b"not an image at all", "image/png"))]
    elif case == "bad-format":
        url += "?format=npy"
    else:
        url = "/api/indices/nope/embed"
    answer = served.post(url, files=files)
    assert answer.status_code == status, answer.text
    error = answer.json()["error"]
    assert "\n" not in error and all(word in error for word in words), error
    assert served.post("/api/indices/index/embed", files=_files(1)).status_code == 200


def test_map_page_and_picture(served):
    page = served.get("/api/indices/index/map?rows=120")
    assert page.status_code == 200 and "map.png?rows=120" in page.text and "<script" not in page.text
    picture = served.get("/api/indices/index/map.png?rows=120")
    assert picture.status_code == 200 and picture.headers["content-type"] == "image/png"
    image = Image.open(io.BytesIO(picture.content))
    assert image.size == (750, 600)
    colours = {c for _, c in image.convert("RGB").getcolors(1 << 20)}
    assert len([c for c in colours if max(c) - min(c) > 60]) >= 10  # one hue per class at least
    assert served.get("/api/indices/index/map.png?rows=120").content == picture.content  # cached
    assert served.get("/api/indices/index/map.png?rows=1").status_code == 422


def test_an_index_with_only_safetensors_embeds_images(digits_test_index, tmp_path):
    index = tmp_path / "index"
    shutil.copytree(digits_test_index, index)
    convert_checkpoint(index / "encoder.pt", index)
    (index / "encoder.pt").unlink()
    with Retriever.open(digits_test_index, device="cpu") as pt, Retriever.open(index, device="cpu") as st:
        assert st.encoder_path == index / "encoder.safetensors"
        image = tensor_to_pil(open_dataset("digits", split="test")[5][0])
        np.testing.assert_array_equal(st.embed([image]), pt.embed([image]))
