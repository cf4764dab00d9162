"""The HTTP search service: a FastAPI app over opened :class:`~isdretrieve.retrieve.retriever.Retriever` s.

    app = create_app(open_indices(["indices/digits-test"]), ServeSettings())
    uvicorn.run(app, host="127.0.0.1", port=8000)

JSON routes under ``/api`` (listed with their parameters at ``/docs``; one router a topic: indices,
search, rows, pairs), the web page at ``/``. Indices are named by their directory's name; a bank row's
picture is addressed by (index name, row) only, and pairs files by their name among those found in the
index directory, so no request names a file. Every error is a JSON body ``{"error": "one line"}`` with a
4xx (bad input) or 5xx status, and the server keeps serving. An index whose files are damaged (sizes
other than its manifest recorded) is listed but answers 503 to every request, while the others serve.
Image queries are encoded through an :class:`~isdretrieve.serve.batcher.EncodeBatcher`, so concurrent
requests share forwards (a raw-body search runs on the event loop, multipart ones on worker threads).
Each index's encoder and search are warmed up (:mod:`isdretrieve.serve.warmup`) before the port opens.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

from fastapi import FastAPI
from PIL import Image

from isdretrieve.errors import BankError, IsdError
from isdretrieve.files.pairs import find_pairs
from isdretrieve.retrieve.retriever import Retriever
from isdretrieve.serve import api_embed, api_indices, api_map, api_pairs, api_rows, api_search
from isdretrieve.serve.batcher import EncodeBatcher
from isdretrieve.serve.errors import install_error_handlers
from isdretrieve.serve.page import add_docs, add_page
from isdretrieve.serve.security import Guard
from isdretrieve.serve.state import DamagedIndex, ServedIndex, ServeSettings
from isdretrieve.serve.warmup import warm_up


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


def open_indices(
    index_dirs: Sequence[str | Path], *, device: str = "auto"
) -> dict[str, Retriever | DamagedIndex]:
    """Open each index directory as a Retriever, named by :func:`index_names`; one whose files are
    damaged (or whose bank does not match it) becomes a :class:`DamagedIndex` (served as 503) instead of
    stopping the others."""
    opened: dict[str, Retriever | DamagedIndex] = {}
    for name, path in index_names(index_dirs).items():
        try:
            opened[name] = Retriever.open(path, device=device)
        except BankError as exc:  # a damaged file, or a bank that does not match its index
            opened[name] = DamagedIndex(path, str(exc))
    return opened


def serve_index(name: str, retriever: Retriever | DamagedIndex, settings: ServeSettings) -> ServedIndex:
    """An index ready to serve: its encoder loaded and checked now (not at the first query), its pairs."""
    if isinstance(retriever, DamagedIndex):
        return ServedIndex(name, None, None, {}, damage=retriever.error)  # type: ignore[arg-type]
    batcher = None
    if retriever.has_encoder:
        retriever.prepare(Image.new("RGB", (8, 8)))  # loads and checks the encoder
        batcher = EncodeBatcher(retriever.encode, max_batch=settings.max_batch)
    pairs = {path.stem: path for path in find_pairs(retriever.index_dir, retriever.index.bank.fingerprint)}
    return ServedIndex(name, retriever, batcher, pairs)


def create_app(
    retrievers: Mapping[str, Retriever | DamagedIndex], settings: ServeSettings | None = None
) -> Guard:
    """The service over ``retrievers`` (name -> opened Retriever, or a DamagedIndex) as an ASGI app: the
    FastAPI app (``.app``; its ``state.served`` holds each :class:`ServedIndex`) inside its :class:`Guard`."""
    settings = settings or ServeSettings()
    if not any(isinstance(r, Retriever) for r in retrievers.values()):
        found = next((r.error for r in retrievers.values() if isinstance(r, DamagedIndex)), "")
        raise IsdError(f"no index to serve{': ' + found if found else ''}")
    app = FastAPI(
        title="isdretrieve search",
        summary="Nearest-neighbour search over ISD-family feature banks.",
        version="1",
        redoc_url=None,
        docs_url=None,
        lifespan=warm_up,
    )
    app.state.served = {name: serve_index(name, r, settings) for name, r in retrievers.items()}
    app.state.settings = settings
    install_error_handlers(app)
    add_page(app)
    add_docs(app)
    for routes in (api_indices, api_search, api_rows, api_pairs, api_embed, api_map):
        app.include_router(routes.router)
    return Guard(app, token=settings.token, max_body=settings.max_body)
