"""Every error as a JSON body ``{"error": "one line"}``: 4xx for bad input, 5xx otherwise (503 for an index
whose files are damaged)."""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from isdretrieve.errors import DamagedFile, ImageTooLarge, IsdError, NotAnImage

log = logging.getLogger("isdretrieve.serve")


def error_response(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": " ".join(message.split()) or "error"}, status_code=status)


def validation_message(exc: RequestValidationError) -> str:
    """FastAPI's validation errors (at most three) as one line."""
    parts = []
    for error in exc.errors()[:3]:
        if error.get("type") == "json_invalid":
            reason = error.get("ctx", {}).get("error", "")
            parts.append(
                f"request body is not valid JSON: {reason}" if reason else "request body is not valid JSON"
            )
            continue
        where = ".".join(str(p) for p in error.get("loc", ()) if p not in ("query", "path", "body"))
        parts.append(f"{where}: {error.get('msg', 'invalid')}" if where else str(error.get("msg", "invalid")))
    return "; ".join(parts) or "invalid request"


def install_error_handlers(app: FastAPI) -> None:
    """Map HTTP, validation, user and unexpected errors to one-line JSON answers."""

    async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
        return error_response(exc.status_code, str(exc.detail))

    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        return error_response(422, validation_message(exc))

    async def user_error(request: Request, exc: IsdError) -> JSONResponse:
        if isinstance(exc, DamagedFile):  # an index file changed under the service: not bad input
            log.error("damaged index file serving %s: %s", request.url.path, exc)
            return error_response(503, str(exc))
        status = 413 if isinstance(exc, ImageTooLarge) else 415 if isinstance(exc, NotAnImage) else 400
        return error_response(status, str(exc))

    async def server_error(request: Request, exc: Exception) -> JSONResponse:
        log.exception("error serving %s", request.url.path)
        return error_response(500, f"internal error ({type(exc).__name__})")

    app.add_exception_handler(HTTPException, http_error)
    app.add_exception_handler(RequestValidationError, validation_error)
    app.add_exception_handler(IsdError, user_error)
    app.add_exception_handler(Exception, server_error)
