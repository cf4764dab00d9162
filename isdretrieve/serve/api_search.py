"""Search routes: neighbours of uploaded images (one image as the raw request body, or several as a
multipart form) and of feature vectors, optionally of some classes only (``label``, repeatable). Answers
are encoded straight to JSON bytes (:func:`~isdretrieve.serve.payloads.json_response`), not through
FastAPI's validating serializer."""

from __future__ import annotations

import asyncio
from functools import partial
from typing import TYPE_CHECKING, Annotated

from fastapi import APIRouter, Depends, File, Query, Request, UploadFile
from fastapi.responses import Response
from pydantic import BaseModel, Field
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException

from isdretrieve.data.uploads import decode_untrusted
from isdretrieve.serve.payloads import hit_json, json_response
from isdretrieve.serve.state import MAX_K, ServedIndex, ServeSettings, served_index, settings_of

if TYPE_CHECKING:
    import torch

router = APIRouter()
Index = Annotated[ServedIndex, Depends(served_index)]
Settings = Annotated[ServeSettings, Depends(settings_of)]
K = Annotated[int, Query(ge=1, le=MAX_K, description="Neighbours per query.")]
Labels = Annotated[list[int] | None, Query(description="Only hits of these classes (repeatable).")]


class VectorQuery(BaseModel):
    vectors: list[list[float]] = Field(min_length=1, max_length=256, description="Feature vectors [Q, D].")


INLINE_BYTES = 256 << 10  # uploads up to this size are decoded on the event loop (a few ms at most)
JOIN_YIELDS = 3  # event-loop turns a raw-body search waits for requests already received to join it
RAW_BODY = {
    "requestBody": {
        "required": True,
        "description": "The image file's bytes (JPEG, PNG, WebP, GIF, BMP, TIFF or PPM), as they are.",
        "content": {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}},
    }
}


@router.post(
    "/api/indices/{name}/search/image",
    summary="Neighbours of one image sent as the raw request body",
    openapi_extra=RAW_BODY,
)
async def search_image(
    one: Index,
    settings: Settings,
    request: Request,
    k: K = 10,
    file: Annotated[str, Query(max_length=256, description="The query's name in the answer.")] = "upload",
    label: Labels = None,
) -> Response:
    """Runs on the event loop, without a thread hop (which costs more than the work on a busy machine):
    decode (a large upload on a worker thread), queue for the encoder, yield so that requests already
    received queue theirs too, then one forward for all of them, search, answer."""
    if one.batcher is None:
        raise HTTPException(400, f"index {one.name!r} has no encoder.pt: search it with feature vectors")
    data = await request.body()
    decode = partial(_decoded, one, settings, data)
    images = decode() if len(data) <= INLINE_BYTES else await run_in_threadpool(decode)
    job = one.batcher.submit(images)
    for _ in range(JOIN_YIELDS):
        await asyncio.sleep(0)
    hits = one.retriever.search(one.batcher.result(job), k, label)[0]
    return json_response({"results": [{"query": {"file": file}, "hits": [hit_json(one, h) for h in hits]}]})


def _decoded(one: ServedIndex, settings: ServeSettings, data: bytes) -> torch.Tensor:
    image = decode_untrusted(data, max_bytes=settings.max_upload_bytes, max_pixels=settings.max_pixels)
    return one.retriever.prepare([image])


def encode_uploads(one: ServedIndex, settings: ServeSettings, files: list[UploadFile]) -> torch.Tensor:
    """Uploaded images decoded under the service's limits (count, bytes, pixels) and embedded through
    the index's batcher: unit float32 rows [Q, D]; 400 for an index without an encoder."""
    if one.batcher is None:
        raise HTTPException(400, f"index {one.name!r} has no encoder.pt: search it with feature vectors")
    if len(files) > settings.max_files:
        raise HTTPException(413, f"at most {settings.max_files} images a request, got {len(files)}")
    cap = settings.max_upload_bytes
    images = [
        decode_untrusted(upload.file.read(cap + 1), max_bytes=cap, max_pixels=settings.max_pixels)
        for upload in files
    ]
    return one.batcher.encode(one.retriever.prepare(images))


@router.post("/api/indices/{name}/search/images", summary="Neighbours of uploaded images")
def search_images(
    one: Index,
    settings: Settings,
    files: Annotated[list[UploadFile], File(description="Image files.")],
    k: K = 10,
    label: Labels = None,
) -> Response:
    features = encode_uploads(one, settings, files)
    results = one.retriever.search(features, k, label)
    return json_response(
        {
            "results": [
                {"query": {"file": upload.filename or f"image {n}"}, "hits": [hit_json(one, h) for h in hits]}
                for n, (upload, hits) in enumerate(zip(files, results, strict=True))
            ]
        }
    )


@router.post("/api/indices/{name}/search/vectors", summary="Neighbours of feature vectors")
def search_vectors(one: Index, query: VectorQuery, k: K = 10, label: Labels = None) -> Response:
    results = one.retriever.search_vectors(query.vectors, k, label)
    return json_response({"results": [{"hits": [hit_json(one, h) for h in hits]} for hits in results]})
