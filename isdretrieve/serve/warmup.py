"""Start-up warm-up: each index answers one search through the whole app before the port opens.

The app's lifespan (which uvicorn runs before it listens) sends one in-process request per index: an image
search through the raw-bytes route where the index has an encoder, else a vector search with its first
bank row. That loads and runs the encoder, touches the index, and warms the routing, the thread pool and
the JSON encoding, so the first request a client sends is as fast as the hundredth.
"""

from __future__ import annotations

import io
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any
from urllib.parse import quote

from fastapi import FastAPI
from PIL import Image

from isdretrieve.errors import IsdError
from isdretrieve.serve.state import ServedIndex


@asynccontextmanager
async def warm_up(app: FastAPI) -> AsyncIterator[None]:
    """The lifespan: one search per healthy index, then serve; a warm-up that fails stops the start."""
    for served in app.state.served.values():
        if not served.damage:
            await _search_once(app, served)
    yield


def _request(served: ServedIndex) -> tuple[str, str, bytes, str]:
    """(path, query string, body, content type) of one search of ``served``."""
    name = quote(served.name, safe="")
    if served.batcher is not None:
        side = served.retriever.encoder.header.image_size
        buffer = io.BytesIO()
        Image.new("RGB", (side, side), (120, 130, 140)).save(buffer, format="PNG")
        return f"/api/indices/{name}/search/image", "k=1", buffer.getvalue(), "image/png"
    vector = served.retriever.index.bank.features(0, 1)[0].tolist()
    body = json.dumps({"vectors": [vector]}).encode()
    return f"/api/indices/{name}/search/vectors", "k=1", body, "application/json"


async def _search_once(app: FastAPI, served: ServedIndex) -> None:
    path, query, body, content_type = _request(served)
    scope: dict[str, Any] = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": query.encode(),
        "root_path": "",
        "headers": [(b"host", b"127.0.0.1"), (b"content-type", content_type.encode())],
        "client": ("127.0.0.1", 0),
        "server": ("127.0.0.1", 0),
        "app": app,
    }
    sent = [{"type": "http.request", "body": body, "more_body": False}]
    answer: dict[str, Any] = {}

    async def receive() -> dict[str, Any]:
        return sent.pop() if sent else {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.start":
            answer["status"] = message["status"]
        elif message["type"] == "http.response.body":
            answer["body"] = answer.get("body", b"") + message.get("body", b"")

    await app(scope, receive, send)
    if answer.get("status") != 200:
        raise IsdError(f"index {served.name!r} failed its start-up search: {answer.get('body', b'')[:200]!r}")
