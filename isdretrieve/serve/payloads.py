"""The JSON shapes of the API: a bank row, a hit, an index summary; and the answer's encoding.

:func:`json_response` encodes an answer straight to bytes with :mod:`json`: FastAPI's validating
serializer took about 7x as long for a page of 10 hits (580 µs against 84 µs on the loaded 2-core VM);
orjson would take 5 µs, but a request's latency could not tell the difference (``benchmarks/README.md``).
"""

from __future__ import annotations

import json
from typing import Any
from urllib.parse import quote

from fastapi.responses import Response

from isdretrieve.retrieve.hits import BankRow, Hit
from isdretrieve.serve.state import ServedIndex


def thumb_url(name: str, row: int) -> str:
    return f"/api/indices/{quote(name, safe='')}/rows/{row}/thumb.png"


def row_json(served: ServedIndex, row: BankRow) -> dict[str, Any]:
    """A bank row: row, dataset index, label, class name, path and the URL of its thumbnail."""
    return {
        "row": row.row,
        "index": row.index,
        "label": row.label,
        "class": served.retriever.class_name(row.label),
        "path": row.path,
        "thumb": thumb_url(served.name, row.row),
    }


def hit_json(served: ServedIndex, hit: Hit) -> dict[str, Any]:
    """A hit: its row, ``score``, and ``other_class`` (None where the query's label or its own is
    unknown: always for uploads and vectors)."""
    return {**row_json(served, hit), "score": round(float(hit.score), 6), "other_class": hit.label_differs}


def summary_json(served: ServedIndex) -> dict[str, Any]:
    """What the page lists for an index: size, dimension, factory, classes, image search, pairs."""
    if served.damage:
        return {"name": served.name, "damaged": served.damage}
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


def json_bytes(payload: Any) -> bytes:
    """``payload`` (dicts, lists, str, int, float, bool, None) as compact UTF-8 JSON."""
    return json.dumps(payload, separators=(",", ":"), ensure_ascii=False).encode()


def json_response(payload: Any, status: int = 200) -> Response:
    """A JSON answer built without FastAPI's validating serializer."""
    return Response(json_bytes(payload), status_code=status, media_type="application/json")
