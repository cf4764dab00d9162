"""Bank-row routes: a random sample, one row, its neighbours, its thumbnail."""

from __future__ import annotations

import io
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query
from fastapi import Path as RoutePath
from fastapi.responses import Response
from starlette.exceptions import HTTPException

from isdretrieve.retrieve.pictures import THUMB, fit
from isdretrieve.serve.payloads import hit_json, row_json
from isdretrieve.serve.state import MAX_K, MAX_SAMPLE, ServedIndex, served_index

router = APIRouter()
Index = Annotated[ServedIndex, Depends(served_index)]
Row = Annotated[int, RoutePath(ge=0, description="A bank row (0-based).")]
K = Annotated[int, Query(ge=1, le=MAX_K, description="Neighbours per query.")]


@router.get("/api/indices/{name}/rows", summary="A random sample of bank rows, optionally of one class")
def sample(
    one: Index,
    n: Annotated[int, Query(ge=1, le=MAX_SAMPLE)] = 24,
    seed: Annotated[int, Query(ge=0, lt=2**63)] = 0,
    label: Annotated[int | None, Query(ge=-1)] = None,
) -> dict[str, Any]:
    rows = one.retriever.sample_rows(n, seed=seed, label=label)
    return {"rows": [row_json(one, one.retriever.row(r)) for r in rows]}


@router.get("/api/indices/{name}/rows/{row}", summary="One bank row")
def row_info(one: Index, row: Row) -> dict[str, Any]:
    return row_json(one, one.retriever.row(row))


@router.get("/api/indices/{name}/rows/{row}/neighbours", summary="Neighbours of a bank row (itself left out)")
def row_neighbours(
    one: Index,
    row: Row,
    k: K = 10,
    label: Annotated[list[int] | None, Query(description="Only hits of these classes.")] = None,
) -> dict[str, Any]:
    result = one.retriever.neighbours([row], k, label)[0]
    query = row_json(one, one.retriever.row(row))
    return {"results": [{"query": query, "hits": [hit_json(one, h) for h in result.hits]}]}


@router.get(
    "/api/indices/{name}/rows/{row}/thumb.png",
    summary="A bank row's picture (PNG), from the bank's data set",
    response_class=Response,
    responses={200: {"content": {"image/png": {}}}},
)
def thumbnail(one: Index, row: Row) -> Response:
    picture = one.retriever.row_image(row)
    if picture is None:
        raise HTTPException(404, f"no picture of row {row}: the bank's data set is not readable here")
    buffer = io.BytesIO()
    fit(picture, THUMB).save(buffer, format="PNG")
    return Response(buffer.getvalue(), media_type="image/png", headers={"cache-control": "max-age=3600"})
