"""``/api/indices``: the served indices, one index's details and its manifest."""

from __future__ import annotations

from dataclasses import asdict
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request

from isdretrieve.serve.payloads import summary_json
from isdretrieve.serve.state import ServedIndex, served_index

router = APIRouter()
Index = Annotated[ServedIndex, Depends(served_index)]


@router.get("/api/indices", summary="The served indices")
def list_indices(request: Request) -> list[dict[str, Any]]:
    return [summary_json(one) for one in request.app.state.served.values()]


@router.get("/api/indices/{name}", summary="One index: size, classes, data, encoder batching")
def index_info(one: Index) -> dict[str, Any]:
    bank = one.retriever.index.bank
    return {
        **summary_json(one),
        "data_spec": bank.data_spec,
        "transform": bank.transform,
        "device": str(one.retriever.device),
        "batcher": asdict(one.batcher.stats) if one.batcher else None,
    }


@router.get("/api/indices/{name}/manifest", summary="The index's manifest.json")
def manifest(one: Index) -> dict[str, Any]:
    return asdict(one.retriever.index.manifest)
