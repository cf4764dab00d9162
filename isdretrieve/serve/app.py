"""The HTTP search service: a FastAPI app over opened :class:`~isdretrieve.retrieve.retriever.Retriever` s.

    app = create_app(open_indices(["indices/digits-test"]), ServeSettings())
    uvicorn.run(app, host="127.0.0.1", port=8000)

JSON routes under ``/api`` (listed with their parameters at ``/docs``; one router a topic: indices,
search, rows, pairs), the web page at ``/``. Indices are named by their directory's name; a bank row's
picture is addressed by (index name, row) only, and pairs files by their name among those found in the
index directory, so no request names a file. Every error is a JSON body ``{"error": "one line"}`` with a
4xx (bad input) or 5xx status, and the server keeps serving. Image queries are decoded on the request's
thread and encoded through an :class:`~isdretrieve.serve.batcher.EncodeBatcher`, so concurrent requests
share forwards.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

from fastapi import FastAPI
from PIL import Image

from isdretrieve.errors import IsdError
from isdretrieve.files.pairs import find_pairs
from isdretrieve.retrieve.retriever import Retriever
from isdretrieve.serve import api_embed, api_indices, api_map, api_pairs, api_rows, api_search
from isdretrieve.serve.batcher import EncodeBatcher
from isdretrieve.serve.errors import install_error_handlers
from isdretrieve.serve.page import add_page
from isdretrieve.serve.security import Guard
from isdretrieve.serve.state import ServedIndex, ServeSettings


def index_names(index_dirs: Sequence[str | Path]) -> dict[str, Path]:
    """A name per index directory: its folder name, with ``-2``, ``-3`` ... where two share one."""
    names: dict[str, Path] = {}
    for directory in index_dirs:
        path = Path(directory)
        base = path.resolve().name or "index"
        name, n = base, 1
        while name in names:
            n += 1
            name = f"{base}-{n}"
        names[name] = path
    return names


def open_indices(index_dirs: Sequence[str | Path], *, device: str = "auto") -> dict[str, Retriever]:
    """Open each index directory as a Retriever, named by :func:`index_names`."""
    return {name: Retriever.open(path, device=device) for name, path in index_names(index_dirs).items()}


def serve_index(name: str, retriever: Retriever, settings: ServeSettings) -> ServedIndex:
    """An index ready to serve: its encoder loaded and checked now (not at the first query), its pairs."""
    batcher = None
    if retriever.has_encoder:
        retriever.prepare(Image.new("RGB", (8, 8)))  # loads and checks the encoder
        batcher = EncodeBatcher(retriever.encode, max_batch=settings.max_batch)
    pairs = {path.stem: path for path in find_pairs(retriever.index_dir, retriever.index.bank.fingerprint)}
    return ServedIndex(name, retriever, batcher, pairs)


def create_app(retrievers: Mapping[str, Retriever], settings: ServeSettings | None = None) -> Guard:
    """The service over ``retrievers`` (name -> opened Retriever) as an ASGI app: the FastAPI app
    (``.app``; its ``state.served`` holds each :class:`ServedIndex`) inside its :class:`Guard`."""
    settings = settings or ServeSettings()
    if not retrievers:
        raise IsdError("no index to serve")
    app = FastAPI(
        title="isdretrieve search",
        summary="Nearest-neighbour search over ISD-family feature banks.",
        version="1",
        redoc_url=None,
    )
    app.state.served = {name: serve_index(name, r, settings) for name, r in retrievers.items()}
    app.state.settings = settings
    install_error_handlers(app)
    add_page(app)
    for routes in (api_indices, api_search, api_rows, api_pairs, api_embed, api_map):
        app.include_router(routes.router)
    return Guard(app, token=settings.token, max_body=settings.max_body)
