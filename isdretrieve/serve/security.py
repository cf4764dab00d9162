"""The service's guard: the bind/token rule, a bearer token on ``/api``, a Host check on loopback, a body
cap, and the security headers on every response (a pure ASGI middleware, so it covers errors too).

- Bound to a loopback address the service may run without a token; then only requests whose ``Host`` is
  a loopback name are answered (a web page elsewhere cannot reach it by DNS rebinding).
- Bound to any other address it needs a token (:func:`check_bind`); every ``/api`` request must carry it
  as ``Authorization: Bearer TOKEN`` or as the ``isd_token`` cookie (what the page sets), compared in
  constant time. The page, its script and the OpenAPI docs hold no data and need no token.
- A request body over ``max_body`` bytes is answered 413 without being read further.
"""

from __future__ import annotations

import hmac
import ipaddress
import json
from collections.abc import Awaitable, Callable, MutableMapping
from http.cookies import CookieError, SimpleCookie
from typing import Any
from urllib.parse import unquote

from isdretrieve.errors import BindError

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

TOKEN_ENV = "ISD_SERVE_TOKEN"
TOKEN_COOKIE = "isd_token"
MIN_TOKEN_LENGTH = 16
# the page: its own script and style files only, pictures from the service (or a dropped file's blob:)
PAGE_POLICY = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' blob:; connect-src 'self'; "
    "base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
# the API docs: Swagger UI's script and style from the package (it sets inline styles), the schema from here
DOCS_POLICY = (
    "default-src 'none'; script-src 'self'; style-src 'self' 'unsafe-inline'; img-src 'self' data:; "
    "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)


def is_loopback(host: str) -> bool:
    """Whether ``host`` (an address or a name) is this machine only: 127.0.0.0/8, ::1, localhost."""
    name = host.strip().strip("[]").lower()
    if name == "localhost" or name.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def check_bind(host: str, token: str | None) -> None:
    """Refuse to listen on a non-loopback ``host`` without a token, and any token under 16 characters."""
    if token is not None and len(token) < MIN_TOKEN_LENGTH:
        raise BindError(f"the token must have at least {MIN_TOKEN_LENGTH} characters")
    if token is None and not is_loopback(host):
        raise BindError(
            f"refusing to serve on {host} without a token: give --token or set {TOKEN_ENV} "
            "(or bind to 127.0.0.1)"
        )


def _host_name(value: str) -> str:
    """The name part of a Host header: ``[::1]:8000`` -> ``::1``, ``localhost:8000`` -> ``localhost``."""
    if value.startswith("["):
        return value[1 : value.find("]")] if "]" in value else value
    return value.rsplit(":", 1)[0] if value.count(":") == 1 else value


def _error_body(message: str) -> bytes:
    return json.dumps({"error": message}).encode()


class Guard:
    """ASGI middleware: security headers on every response, the token on ``/api``, the Host check when
    running without a token, and the body cap."""

    def __init__(self, app: Callable[..., Awaitable[None]], *, token: str | None, max_body: int) -> None:
        self.app, self.token, self.max_body = app, token, max_body

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {key.decode("latin-1").lower(): value.decode("latin-1") for key, value in scope["headers"]}
        docs = scope["path"] == "/docs" or scope["path"].startswith("/docs/")
        policy = DOCS_POLICY if docs else PAGE_POLICY
        extra = [
            (b"content-security-policy", policy.encode()),
            (b"x-content-type-options", b"nosniff"),
            (b"x-frame-options", b"DENY"),
            (b"referrer-policy", b"no-referrer"),
        ]

        async def send_secured(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []), *extra]
            await send(message)

        refusal = self._refusal(scope["path"], headers)
        if refusal is not None:
            await self._reply(send_secured, *refusal)
            return
        await self._capped(scope, receive, send_secured)

    def _refusal(self, path: str, headers: dict[str, str]) -> tuple[int, str] | None:
        """(status, message) when the request is refused before the app sees it."""
        if self.token is None and not is_loopback(_host_name(headers.get("host", ""))):
            return 403, "this service answers loopback host names only (start it with a token to go beyond)"
        if self.token is not None and (path == "/api" or path.startswith("/api/")):
            given = self._given_token(headers)
            if given is None:
                return 401, "a token is required: send 'Authorization: Bearer TOKEN'"
            if not hmac.compare_digest(given.encode(), self.token.encode()):
                return 401, "wrong token"
        length = headers.get("content-length", "")
        if length.isdigit() and int(length) > self.max_body:
            return 413, f"request body over the {self.max_body:,}-byte limit"
        return None

    @staticmethod
    def _given_token(headers: dict[str, str]) -> str | None:
        scheme, _, value = headers.get("authorization", "").partition(" ")
        if scheme.lower() == "bearer" and value.strip():
            return value.strip()
        try:
            cookie = SimpleCookie(headers.get("cookie", ""))
        except CookieError:
            return None
        return unquote(cookie[TOKEN_COOKIE].value) if TOKEN_COOKIE in cookie else None

    async def _capped(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Run the app with the body counted; past the cap it sees a disconnect and the client a 413.
        An exception the app lets out after answering (Starlette re-raises a 500 it has sent) ends here,
        so the connection is closed cleanly; one before any answer becomes a JSON 500."""
        received, over, started = 0, False, False

        async def counted() -> Message:
            nonlocal received, over
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_body:
                    over = True
                    return {"type": "http.disconnect"}
            return message

        async def send_unless_over(message: Message) -> None:
            nonlocal started
            if not over:
                started = started or message["type"] == "http.response.start"
                await send(message)

        try:
            await self.app(scope, counted, send_unless_over)
        except Exception as exc:
            if not over:
                if not started:
                    await self._reply(send, 500, f"internal error ({type(exc).__name__})")
                return  # else answered (and logged) already
        if over:
            await self._reply(send, 413, f"request body over the {self.max_body:,}-byte limit")

    @staticmethod
    async def _reply(send: Send, status: int, message: str) -> None:
        body = _error_body(message)
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})
