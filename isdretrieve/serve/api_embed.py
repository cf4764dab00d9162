"""The embedding route: uploaded images in, the index encoder's unit float32 rows out.

The answer is JSON (``{"count", "dim", "fingerprint", "files", "embeddings"}``) or, with ``?format=raw``
or ``Accept: application/octet-stream``, the raw rows: Q x D little-endian float32 numbers, row after row
(``X-Embedding-Shape: Q,D``, ``X-Embedding-Dtype: <f4``). Uploads go through the same decoding and limits
as an image search (:func:`~isdretrieve.serve.api_search.encode_uploads`).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

import numpy as np
from fastapi import APIRouter, File, Header, Query, UploadFile
from fastapi.responses import Response

from isdretrieve.serve.api_search import Index, Settings, encode_uploads

router = APIRouter()
RAW = "application/octet-stream"


def wants_raw(form: str | None, accept: str | None) -> bool:
    """``?format=`` decides; without it, raw when the Accept header names octet-stream before JSON."""
    if form is not None:
        return form == "raw"
    types = [part.split(";")[0].strip().lower() for part in (accept or "").split(",")]
    for media in types:
        if media in (RAW, "application/json"):
            return media == RAW
    return False


@router.post("/api/indices/{name}/embed", summary="Embeddings of uploaded images", response_model=None)
def embed_images(
    one: Index,
    settings: Settings,
    files: Annotated[list[UploadFile], File(description="Image files.")],
    form: Annotated[
        Literal["json", "raw"] | None,
        Query(alias="format", description="json, or raw little-endian float32 rows (default: by Accept)."),
    ] = None,
    accept: Annotated[str | None, Header()] = None,
) -> dict[str, Any] | Response:
    rows = np.ascontiguousarray(encode_uploads(one, settings, files).numpy(), dtype="<f4")
    count, dim = rows.shape
    if wants_raw(form, accept):
        headers = {"X-Embedding-Shape": f"{count},{dim}", "X-Embedding-Dtype": "<f4"}
        return Response(rows.tobytes(), media_type=RAW, headers=headers)
    return {
        "count": count,
        "dim": dim,
        "fingerprint": one.retriever.index.bank.fingerprint,
        "files": [upload.filename or f"image {n}" for n, upload in enumerate(files)],
        "embeddings": rows.tolist(),
    }
