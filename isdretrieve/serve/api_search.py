"""Search routes: neighbours of uploaded images (one image as the raw request body, or several as a
multipart form) and of feature vectors. Answers are encoded straight to JSON bytes
(:func:`~isdretrieve.serve.payloads.json_response`), not through FastAPI's validating serializer."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, File, Query, Request, UploadFile
from fastapi.responses import Response
from pydantic import BaseModel, Field
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException

from isdretrieve.data.uploads import decode_untrusted
from isdretrieve.serve.payloads import hit_json, json_response
from isdretrieve.serve.state import MAX_K, ServedIndex, ServeSettings, served_index, settings_of

router = APIRouter()
Index = Annotated[ServedIndex, Depends(served_index)]
Settings = Annotated[ServeSettings, Depends(settings_of)]
K = Annotated[int, Query(ge=1, le=MAX_K, description="Neighbours per query.")]


class VectorQuery(BaseModel):
    vectors: list[list[float]] = Field(min_length=1, max_length=256, description="Feature vectors [Q, D].")


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
) -> Response:
    if one.batcher is None:
        raise HTTPException(400, f"index {one.name!r} has no encoder.pt: search it with feature vectors")
    data = await request.body()
    return await run_in_threadpool(_search_bytes, one, settings, data, k, file)


def _search_bytes(one: ServedIndex, settings: ServeSettings, data: bytes, k: int, file: str) -> Response:
    image = decode_untrusted(data, max_bytes=settings.max_upload_bytes, max_pixels=settings.max_pixels)
    hits = one.retriever.search(one.batcher.encode(one.retriever.prepare([image])), k)[0]
    return json_response({"results": [{"query": {"file": file}, "hits": [hit_json(one, h) for h in hits]}]})


@router.post("/api/indices/{name}/search/images", summary="Neighbours of uploaded images")
def search_images(
    one: Index,
    settings: Settings,
    files: Annotated[list[UploadFile], File(description="Image files.")],
    k: K = 10,
) -> Response:
    if one.batcher is None:
        raise HTTPException(400, f"index {one.name!r} has no encoder.pt: search it with feature vectors")
    if len(files) > settings.max_files:
        raise HTTPException(413, f"at most {settings.max_files} images a request, got {len(files)}")
    cap = settings.max_upload_bytes
    images = [
        decode_untrusted(upload.file.read(cap + 1), max_bytes=cap, max_pixels=settings.max_pixels)
        for upload in files
    ]
    features = one.batcher.encode(one.retriever.prepare(images))
    results = one.retriever.search(features, k)
    return json_response(
        {
            "results": [
                {"query": {"file": upload.filename or f"image {n}"}, "hits": [hit_json(one, h) for h in hits]}
                for n, (upload, hits) in enumerate(zip(files, results, strict=True))
            ]
        }
    )


@router.post("/api/indices/{name}/search/vectors", summary="Neighbours of feature vectors")
def search_vectors(one: Index, query: VectorQuery, k: K = 10) -> Response:
    results = one.retriever.search_vectors(query.vectors, k)
    return json_response({"results": [{"hits": [hit_json(one, h) for h in hits]} for hits in results]})
