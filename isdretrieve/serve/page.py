"""The search page and its script and style, and the API docs (Swagger UI) with their assets, all served
from installed packages (Swagger UI's from ``fastapi-offline``, part of the ``serve`` extra): both
render without any network access."""

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
}
SWAGGER_FILES = {
    "/docs/swagger-ui-bundle.js": ("swagger-ui-bundle.js", JS),
    "/docs/swagger-ui.css": ("swagger-ui.css", CSS),
    "/docs/favicon.png": ("favicon.png", "image/png"),
}


def static_file(name: str) -> bytes:
    return resources.files("isdretrieve.serve").joinpath("static", name).read_bytes()


def swagger_file(name: str) -> bytes:
    """A file of Swagger UI (5.x, which reads OpenAPI 3.1) as the ``fastapi-offline`` package installs it."""
    return resources.files("fastapi_offline").joinpath("static", name).read_bytes()


def add_page(app: FastAPI, files: dict[str, tuple[str, str]] = PAGE_FILES, read=static_file) -> None:
    """Routes for the page's files (left out of the API docs)."""
    for route, (name, media_type) in files.items():
        content = read(name)

        def page(content: bytes = content, media_type: str = media_type) -> Response:
            return Response(content, media_type=media_type, headers={"cache-control": "no-cache"})

        app.add_api_route(route, page, methods=["GET"], include_in_schema=False)


def add_docs(app: FastAPI) -> None:
    """``/docs``: Swagger UI over ``/openapi.json``, its script and style from the package."""
    add_page(app, DOCS_FILES)
    add_page(app, SWAGGER_FILES, read=swagger_file)
