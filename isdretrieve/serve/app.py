"""The HTTP search service: a FastAPI app over opened :class:`~isdretrieve.retrieval.Retriever` s.

    app = create_app(open_indices(["indices/digits-test"]), ServeSettings())
    uvicorn.run(app, host="127.0.0.1", port=8000)

JSON routes under ``/api`` (listed with their parameters at ``/docs``), the web page at ``/``. Indices are
named by their directory's name; a bank row's picture is addressed by (index name, row) only, and pairs
files by their name among those found in the index directory, so no request names a file. Every error
is a JSON body ``{"error": "one line"}`` with a 4xx (bad input) or 5xx status, and the server keeps
serving. Image queries are decoded on the request's thread and encoded through an
:class:`~isdretrieve.serve.batcher.EncodeBatcher`, so concurrent requests share forwards.
"""

from __future__ import annotations

import io
import logging
import threading
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from importlib import resources
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import quote

from fastapi import FastAPI, File, Query, Request, UploadFile
from fastapi import Path as RoutePath
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from PIL import Image
from pydantic import BaseModel, Field
from starlette.exceptions import HTTPException

from isdretrieve.audit import audit_paths, load_audit
from isdretrieve.data.uploads import ImageTooLarge, NotAnImage, decode_untrusted
from isdretrieve.errors import IsdError
from isdretrieve.mining import Pairs, find_pairs
from isdretrieve.neighbours import Neighbour, label_differs
from isdretrieve.neighbours_report import THUMB, fit
from isdretrieve.retrieval import BankRow, Hit, Retriever
from isdretrieve.serve.batcher import EncodeBatcher
from isdretrieve.serve.security import Guard

log = logging.getLogger("isdretrieve.serve")
MAX_K = 1000  # per query; the bank's size bounds it further
MAX_SAMPLE = 500  # random rows per request
Row = Annotated[int, RoutePath(ge=0, description="A bank row (0-based).")]
K = Annotated[int, Query(ge=1, le=MAX_K, description="Neighbours per query.")]


@dataclass(frozen=True)
class ServeSettings:
    """Limits and the token. ``max_upload_bytes`` and ``max_pixels`` apply to each uploaded image."""

    token: str | None = None
    max_upload_bytes: int = 8 << 20
    max_pixels: int = 40_000_000
    max_files: int = 16
    max_batch: int = 64

    @property
    def max_body(self) -> int:
        """The largest request body: ``max_files`` images at the cap plus room for the form's fields."""
        return self.max_files * self.max_upload_bytes + (64 << 10)


@dataclass
class ServedIndex:
    """One index as served: its name, retriever, encoder batcher (None without encoder.pt), pairs files."""

    name: str
    retriever: Retriever
    batcher: EncodeBatcher | None
    pairs_files: dict[str, Path]
    _pairs: dict[str, Pairs] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def pairs(self, name: str) -> Pairs:
        if name not in self.pairs_files:
            raise HTTPException(404, f"index {self.name!r} has no pairs file {name!r}")
        with self._lock:
            if name not in self._pairs:
                self._pairs[name] = Pairs.open(self.pairs_files[name])
            return self._pairs[name]


class VectorQuery(BaseModel):
    vectors: list[list[float]] = Field(min_length=1, max_length=256, description="Feature vectors [Q, D].")


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


def _serve(name: str, retriever: Retriever, settings: ServeSettings) -> ServedIndex:
    batcher = None
    if retriever.has_encoder:
        retriever.prepare(Image.new("RGB", (8, 8)))  # loads and checks the encoder now, not at a query
        batcher = EncodeBatcher(retriever.encode, max_batch=settings.max_batch)
    pairs = {path.stem: path for path in find_pairs(retriever.index_dir, retriever.index.bank.fingerprint)}
    return ServedIndex(name, retriever, batcher, pairs)


# ---------------------------------------------------------------------------------------------- JSON
def _thumb_url(name: str, row: int) -> str:
    return f"/api/indices/{quote(name, safe='')}/rows/{row}/thumb.png"


def _row_json(served: ServedIndex, row: BankRow) -> dict[str, Any]:
    r = served.retriever
    return {
        "row": row.row,
        "index": row.index,
        "label": row.label,
        "class": r.class_name(row.label),
        "path": row.path,
        "thumb": _thumb_url(served.name, row.row),
    }


def _hit_json(served: ServedIndex, hit: Hit | Neighbour) -> dict[str, Any]:
    """A Hit or Neighbour as JSON; ``other_class`` is None where the query's label or this one is unknown
    (always for a Hit: uploads and vectors have no label)."""
    row = _row_json(served, BankRow(hit.row, hit.index, hit.label, hit.path))
    other = hit.label_differs if isinstance(hit, Neighbour) else None
    return {**row, "score": round(float(hit.score), 6), "other_class": other}


def _summary(served: ServedIndex) -> dict[str, Any]:
    r = served.retriever
    return {
        "name": served.name,
        "rows": len(r.index),
        "dim": r.dim,
        "factory": r.index.manifest.factory,
        "classes": r.classes,
        "image_search": served.batcher is not None,
        "pairs": sorted(served.pairs_files),
    }


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": " ".join(message.split()) or "error"}, status_code=status)


def _validation_message(exc: RequestValidationError) -> str:
    parts = []
    for error in exc.errors()[:3]:
        if error.get("type") == "json_invalid":
            reason = error.get("ctx", {}).get("error", "")
            parts.append(
                f"request body is not valid JSON: {reason}" if reason else "request body is not valid JSON"
            )
            continue
        where = ".".join(str(p) for p in error.get("loc", ()) if p not in ("query", "path", "body"))
        parts.append(f"{where}: {error.get('msg', 'invalid')}" if where else str(error.get("msg", "invalid")))
    return "; ".join(parts) or "invalid request"


def _install_error_handlers(app: FastAPI) -> None:
    async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
        return _error(exc.status_code, str(exc.detail))

    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        return _error(422, _validation_message(exc))

    async def user_error(request: Request, exc: IsdError) -> JSONResponse:
        status = 413 if isinstance(exc, ImageTooLarge) else 415 if isinstance(exc, NotAnImage) else 400
        return _error(status, str(exc))

    async def server_error(request: Request, exc: Exception) -> JSONResponse:
        log.exception("error serving %s", request.url.path)
        return _error(500, f"internal error ({type(exc).__name__})")

    app.add_exception_handler(HTTPException, http_error)
    app.add_exception_handler(RequestValidationError, validation_error)
    app.add_exception_handler(IsdError, user_error)
    app.add_exception_handler(Exception, server_error)


# --------------------------------------------------------------------------------------------- page
def _static(name: str) -> bytes:
    return resources.files("isdretrieve.serve").joinpath("static", name).read_bytes()


def _add_page(app: FastAPI) -> None:
    files = {
        "/": ("index.html", "text/html; charset=utf-8"),
        "/static/app.js": ("app.js", "text/javascript; charset=utf-8"),
        "/static/app.css": ("app.css", "text/css; charset=utf-8"),
    }
    for route, (name, media_type) in files.items():
        content = _static(name)

        def page(content: bytes = content, media_type: str = media_type) -> Response:
            return Response(content, media_type=media_type, headers={"cache-control": "no-cache"})

        app.add_api_route(route, page, methods=["GET"], include_in_schema=False)


# --------------------------------------------------------------------------------------------- app
def create_app(retrievers: Mapping[str, Retriever], settings: ServeSettings | None = None) -> Guard:
    """The service over ``retrievers`` (name -> opened Retriever) as an ASGI app: the FastAPI app
    (``.app``; its ``state.served`` holds each :class:`ServedIndex`) inside its :class:`Guard`."""
    settings = settings or ServeSettings()
    if not retrievers:
        raise IsdError("no index to serve")
    served = {name: _serve(name, r, settings) for name, r in retrievers.items()}

    app = FastAPI(
        title="isdretrieve search",
        summary="Nearest-neighbour search over ISD-family feature banks.",
        version="1",
        redoc_url=None,
    )
    app.state.served = served
    _install_error_handlers(app)
    _add_page(app)

    def get(name: str) -> ServedIndex:
        if name not in served:
            raise HTTPException(404, f"unknown index {name!r}: serving {', '.join(sorted(served))}")
        return served[name]

    @app.get("/api/indices", summary="The served indices")
    def list_indices() -> list[dict[str, Any]]:
        return [_summary(one) for one in served.values()]

    @app.get("/api/indices/{name}", summary="One index: size, classes, data, encoder batching")
    def index_info(name: str) -> dict[str, Any]:
        one = get(name)
        bank = one.retriever.index.bank
        stats = asdict(one.batcher.stats) if one.batcher else None
        return {
            **_summary(one),
            "data_spec": bank.data_spec,
            "transform": bank.transform,
            "device": str(one.retriever.device),
            "batcher": stats,
        }

    @app.get("/api/indices/{name}/manifest", summary="The index's manifest.json")
    def manifest(name: str) -> dict[str, Any]:
        return asdict(get(name).retriever.index.manifest)

    @app.post("/api/indices/{name}/search/images", summary="Neighbours of uploaded images")
    def search_images(
        name: str, files: Annotated[list[UploadFile], File(description="Image files.")], k: K = 10
    ) -> dict[str, Any]:
        one = get(name)
        if one.batcher is None:
            raise HTTPException(400, f"index {name!r} has no encoder.pt: search it with feature vectors")
        if len(files) > settings.max_files:
            raise HTTPException(413, f"at most {settings.max_files} images a request, got {len(files)}")
        cap = settings.max_upload_bytes
        images = [
            decode_untrusted(upload.file.read(cap + 1), max_bytes=cap, max_pixels=settings.max_pixels)
            for upload in files
        ]
        features = one.batcher.encode(one.retriever.prepare(images))
        results = one.retriever.search(features, k)
        return {
            "results": [
                {
                    "query": {"file": upload.filename or f"image {n}"},
                    "hits": [_hit_json(one, h) for h in hits],
                }
                for n, (upload, hits) in enumerate(zip(files, results, strict=True))
            ]
        }

    @app.post("/api/indices/{name}/search/vectors", summary="Neighbours of feature vectors")
    def search_vectors(name: str, query: VectorQuery, k: K = 10) -> dict[str, Any]:
        one = get(name)
        results = one.retriever.search_vectors(query.vectors, k)
        return {"results": [{"hits": [_hit_json(one, h) for h in hits]} for hits in results]}

    @app.get("/api/indices/{name}/rows", summary="A random sample of bank rows, optionally of one class")
    def sample(
        name: str,
        n: Annotated[int, Query(ge=1, le=MAX_SAMPLE)] = 24,
        seed: Annotated[int, Query(ge=0, lt=2**63)] = 0,
        label: Annotated[int | None, Query(ge=-1)] = None,
    ) -> dict[str, Any]:
        one = get(name)
        rows = one.retriever.sample_rows(n, seed=seed, label=label)
        return {"rows": [_row_json(one, one.retriever.row(r)) for r in rows]}

    @app.get("/api/indices/{name}/rows/{row}", summary="One bank row")
    def row_info(name: str, row: Row) -> dict[str, Any]:
        one = get(name)
        return _row_json(one, one.retriever.row(row))

    @app.get(
        "/api/indices/{name}/rows/{row}/neighbours", summary="Neighbours of a bank row (itself left out)"
    )
    def row_neighbours(name: str, row: Row, k: K = 10) -> dict[str, Any]:
        one = get(name)
        result = one.retriever.neighbours([row], k)[0]
        query = _row_json(one, one.retriever.row(row))
        return {"results": [{"query": query, "hits": [_hit_json(one, h) for h in result.hits]}]}

    @app.get(
        "/api/indices/{name}/rows/{row}/thumb.png",
        summary="A bank row's picture (PNG), from the bank's data set",
        response_class=Response,
        responses={200: {"content": {"image/png": {}}}},
    )
    def thumbnail(name: str, row: Row) -> Response:
        one = get(name)
        picture = one.retriever.row_image(row)
        if picture is None:
            raise HTTPException(404, f"no picture of row {row}: the bank's data set is not readable here")
        buffer = io.BytesIO()
        fit(picture, THUMB).save(buffer, format="PNG")
        return Response(buffer.getvalue(), media_type="image/png", headers={"cache-control": "max-age=3600"})

    @app.get("/api/indices/{name}/pairs", summary="Mined pairs files in the index directory")
    def pairs_list(name: str) -> list[dict[str, Any]]:
        one = get(name)
        out = []
        for pairs_name, path in sorted(one.pairs_files.items()):
            pairs = one.pairs(pairs_name)
            out.append(
                {
                    "name": pairs_name,
                    "rows": len(pairs),
                    "pairs": pairs.num_pairs,
                    "coverage": pairs.coverage,
                    "threshold": pairs.threshold,
                    "params": asdict(pairs.params),
                    "audit": audit_paths(path)[0].is_file(),
                }
            )
        return out

    @app.get("/api/indices/{name}/pairs/{pairs_name}/rows/{row}", summary="A row's mined positives")
    def pairs_of_row(name: str, pairs_name: str, row: Row) -> dict[str, Any]:
        one = get(name)
        pairs, anchor = one.pairs(pairs_name), one.retriever.row(row)
        rows, similarities = pairs.positives(anchor.row)
        positives = []
        for r, s in zip(rows.tolist(), similarities.tolist(), strict=True):
            found = one.retriever.row(r)
            other = label_differs(anchor.label, found.label)
            positives.append(
                {**_row_json(one, found), "similarity": round(float(s), 6), "other_class": other}
            )
        return {"anchor": _row_json(one, anchor), "positives": positives}

    @app.get("/api/indices/{name}/pairs/{pairs_name}/audit", summary="The label audit of a pairs file")
    def pairs_audit(name: str, pairs_name: str) -> dict[str, Any]:
        one = get(name)
        one.pairs(pairs_name)  # 404 for an unknown pairs name
        json_path = audit_paths(one.pairs_files[pairs_name])[0]
        if not json_path.is_file():
            raise HTTPException(404, f"pairs {pairs_name!r} have no audit (mine them with --audit)")
        return load_audit(json_path)

    return Guard(app, token=settings.token, max_body=settings.max_body)
