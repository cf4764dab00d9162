"""The search page and its script and style, served from the package."""

from __future__ import annotations

from importlib import resources

from fastapi import FastAPI
from fastapi.responses import Response

PAGE_FILES = {
    "/": ("index.html", "text/html; charset=utf-8"),
    "/static/app.js": ("app.js", "text/javascript; charset=utf-8"),
    "/static/app.css": ("app.css", "text/css; charset=utf-8"),
}


def static_file(name: str) -> bytes:
    return resources.files("isdretrieve.serve").joinpath("static", name).read_bytes()


def add_page(app: FastAPI) -> None:
    """Routes for the page's files (left out of the API docs)."""
    for route, (name, media_type) in PAGE_FILES.items():
        content = static_file(name)

        def page(content: bytes = content, media_type: str = media_type) -> Response:
            return Response(content, media_type=media_type, headers={"cache-control": "no-cache"})

        app.add_api_route(route, page, methods=["GET"], include_in_schema=False)
