"""The search page and its script and style, and the API docs (Swagger UI) with their assets, all served
from the package: both render without any network access."""

from __future__ import annotations

from importlib import resources

from fastapi import FastAPI
from fastapi.responses import Response

HTML, JS, CSS = "text/html; charset=utf-8", "text/javascript; charset=utf-8", "text/css; charset=utf-8"
PAGE_FILES = {
    "/": ("index.html", HTML),
    "/static/app.js": ("app.js", JS),
    "/static/app.css": ("app.css", CSS),
}
DOCS_FILES = {
    "/docs": ("docs.html", HTML),
    "/docs/docs.js": ("docs.js", JS),
    "/docs/swagger-ui-bundle.js": ("docs/swagger-ui-bundle.js", JS),
    "/docs/swagger-ui.css": ("docs/swagger-ui.css", CSS),
    "/docs/favicon.png": ("docs/favicon.png", "image/png"),
}


def static_file(name: str) -> bytes:
    return resources.files("isdretrieve.serve").joinpath("static", *name.split("/")).read_bytes()


def add_page(app: FastAPI, files: dict[str, tuple[str, str]] = PAGE_FILES) -> None:
    """Routes for the page's files (left out of the API docs)."""
    for route, (name, media_type) in files.items():
        content = static_file(name)

        def page(content: bytes = content, media_type: str = media_type) -> Response:
            return Response(content, media_type=media_type, headers={"cache-control": "no-cache"})

        app.add_api_route(route, page, methods=["GET"], include_in_schema=False)


def add_docs(app: FastAPI) -> None:
    """``/docs``: Swagger UI over ``/openapi.json``, its script and style from the package."""
    add_page(app, DOCS_FILES)
