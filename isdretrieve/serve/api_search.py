"""Search routes: neighbours of uploaded images and of feature vectors."""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated, Any

from fastapi import APIRouter, Depends, File, Query, UploadFile
from pydantic import BaseModel, Field
from starlette.exceptions import HTTPException

from isdretrieve.data.uploads import decode_untrusted
from isdretrieve.serve.payloads import hit_json
from isdretrieve.serve.state import MAX_K, ServedIndex, ServeSettings, served_index, settings_of

if TYPE_CHECKING:
    import torch

router = APIRouter()
Index = Annotated[ServedIndex, Depends(served_index)]
Settings = Annotated[ServeSettings, Depends(settings_of)]
K = Annotated[int, Query(ge=1, le=MAX_K, description="Neighbours per query.")]


class VectorQuery(BaseModel):
    vectors: list[list[float]] = Field(min_length=1, max_length=256, description="Feature vectors [Q, D].")


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
) -> dict[str, Any]:
    features = encode_uploads(one, settings, files)
    results = one.retriever.search(features, k)
    return {
        "results": [
            {"query": {"file": upload.filename or f"image {n}"}, "hits": [hit_json(one, h) for h in hits]}
            for n, (upload, hits) in enumerate(zip(files, results, strict=True))
        ]
    }


@router.post("/api/indices/{name}/search/vectors", summary="Neighbours of feature vectors")
def search_vectors(one: Index, query: VectorQuery, k: K = 10) -> dict[str, Any]:
    results = one.retriever.search_vectors(query.vectors, k)
    return {"results": [{"hits": [hit_json(one, h) for h in hits]} for hits in results]}
