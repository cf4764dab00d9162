"""The map of an index's bank: a page and its PNG (UMAP, else PCA + t-SNE; coloured by class).

``GET /api/indices/{name}/map`` is the page (no script), ``GET /api/indices/{name}/map.png?rows=N`` the
picture of up to N rows (a sample drawn with seed 0). A picture is drawn once per index and size, on
the first request (that one waits for the layout: seconds to a minute), then served from memory.
"""

from __future__ import annotations

import html
import tempfile
import threading
from pathlib import Path
from typing import Annotated
from urllib.parse import quote

from fastapi import APIRouter, Query, Request
from fastapi.responses import HTMLResponse, Response

from isdretrieve.retrieve.map import map_png
from isdretrieve.serve.api_search import Index

router = APIRouter()
DEFAULT_ROWS, MAX_ROWS = 2000, 20000
CACHED = 8  # pictures kept in memory; the oldest is dropped first
_LOCK = threading.Lock()  # one layout at a time: they are CPU-bound
Rows = Annotated[
    int, Query(ge=2, le=MAX_ROWS, description="Bank rows mapped (a sample when the bank is larger).")
]


@router.get("/api/indices/{name}/map.png", summary="A 2-D map of the bank, coloured by class")
def map_picture(one: Index, request: Request, rows: Rows = DEFAULT_ROWS) -> Response:
    key = (one.name, rows)
    with _LOCK:
        cache: dict[tuple[str, int], bytes] | None = getattr(request.app.state, "maps", None)
        if cache is None:
            cache = request.app.state.maps = {}
        if key not in cache:
            with tempfile.TemporaryDirectory() as folder:
                path = Path(folder) / "map.png"
                map_png(one.retriever.index.bank.path, path, title=one.name, max_rows=rows)
                cache[key] = path.read_bytes()
            while len(cache) > CACHED:
                cache.pop(next(iter(cache)))
        picture = cache[key]
    return Response(picture, media_type="image/png", headers={"cache-control": "no-cache"})


@router.get("/api/indices/{name}/map", summary="A page with the map of the bank", response_class=HTMLResponse)
def map_page(one: Index, rows: Rows = DEFAULT_ROWS) -> HTMLResponse:
    total = len(one.retriever.index)
    shown = f"all {total:,} bank rows" if total <= rows else f"{rows:,} of {total:,} bank rows (a sample)"
    name = html.escape(one.name, quote=True)
    picture = f"/api/indices/{quote(one.name, safe='')}/map.png?rows={rows}"
    document = (
        '<!doctype html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>Map of {name}</title></head>\n<body>\n<h1>Map of {name}</h1>\n"
        f"<p>{shown} laid out in two dimensions, coloured by class. "
        '<a href="/">Back to the search</a></p>\n'
        f'<img src="{html.escape(picture, quote=True)}" alt="map of the bank {name}" width="750">\n'
        "</body></html>\n"
    )
    return HTMLResponse(document)
