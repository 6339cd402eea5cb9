"""Request intake: who may make the control plane read a body, and how large it may be.

FastAPI reads and parses a request's JSON body before it runs the route's dependencies, the
token check among them: without this middleware anybody who can reach the port could make the
server buffer and parse any amount of JSON. Here, before the application sees a request that
carries a body (a ``Content-Length`` above 0, or chunked):

- without a known, unrevoked bearer token it is answered 401 and its body is never read (the
  route checks the token's role again, as before);
- a declared length over the route's limit is answered 413 without reading;
- a body without a declared length is counted while the application reads it, and answered
  413 as soon as it passes the limit.

Limits: :data:`BULK_BODY` for the routes that take batches (:data:`BULK_PATHS`: an agent sends
at most 4 MiB of flow records per request; policy files; annotate batches), the server setting
``max_body_bytes`` (default 1 MiB, far above any object the API stores) for every other route.

The web console's form posts (``/console/...``) carry a session cookie rather than a bearer
token, and the sign-in form carries neither: their bodies are read up to :data:`CONSOLE_BODY`
(64 KiB, far above any console form) without a token, and the console checks the session and
CSRF token itself; the policy page (:data:`CONSOLE_BULK_PATHS`) takes :data:`BULK_BODY` when the
request's console cookie is a live operator session.

A URL holding a NUL character (``%00``) is answered 400: nothing the API names may hold one.

FastAPI's own ``max_body_size`` is not used: it answers ``text/plain`` rather than the API's
problem+json, and its app-wide layer sits outside every middleware, so it would answer an
oversized unauthenticated request before this one could say 401.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

import anyio.to_thread
from starlette.exceptions import HTTPException

from vpnfleet.controlplane.errors import PROBLEM

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

CONSOLE_PREFIX = "/console/"
CONSOLE_BODY = 64 << 10
CONSOLE_BULK_PATHS = frozenset({"/console/policy"})  # a policy file, as /api/v1/policy/*
BULK_BODY = 16 << 20
BULK_PATHS = frozenset(
    {
        "/api/v1/agent/sessions/report",
        "/api/v1/agent/denied",
        "/api/v1/agent/flows",
        "/api/v1/policy/apply",
        "/api/v1/policy/check",
        "/api/v1/audit/attribution",
    }
)


class _TooLarge(HTTPException):
    """Raised from ``receive`` when a body passes its limit while being read: an HTTP
    exception, so that FastAPI passes it on (it turns other errors met while reading a body
    into a 400) and the API's handler answers it as problem+json."""

    def __init__(self, limit: int) -> None:
        super().__init__(413, _too_large(None, limit))


class RequestIntake:
    """ASGI middleware enforcing the rules in the module docstring.

    ``known_token`` answers whether a bearer token is known and unrevoked (a database read,
    run in a worker thread).
    """

    def __init__(
        self,
        app: ASGIApp,
        known_token: Callable[[str], bool],
        max_body_bytes: int,
        known_console_session: Callable[[str], bool] | None = None,
        recently_known: Callable[[str], bool] | None = None,
    ) -> None:
        self.app = app
        self.known_token = known_token
        self.recently_known = recently_known  # memory only, asked first in the event loop
        self.known_console_session = known_console_session
        self.max_body_bytes = max_body_bytes

    def limit_for(self, path: str) -> int:
        return max(BULK_BODY, self.max_body_bytes) if path in BULK_PATHS else self.max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if "\x00" in scope["path"] or b"%00" in scope.get("query_string", b"").lower():
            # No name, time or filter holds one, and PostgreSQL refuses them in text.
            await _problem(send, 400, "Bad request", "the URL holds a NUL character (%00)")
            return
        length, chunked, token = _headers(scope)
        if length in (None, 0) and not chunked:
            await self.app(scope, receive, send)  # no body: nothing to guard
            return
        console = token is None and scope["path"].startswith(CONSOLE_PREFIX)
        if console:
            # Browsers carry a cookie, not a token: a small form, or a policy file from a
            # signed-in operator (checked here, before the body is read).
            limit = CONSOLE_BODY
            if scope["path"] in CONSOLE_BULK_PATHS and self.known_console_session is not None:
                cookie = _console_cookie(scope)
                check = self.known_console_session
                if cookie is not None and await anyio.to_thread.run_sync(check, cookie):
                    limit = BULK_BODY
        elif token is None or not (
            (self.recently_known is not None and self.recently_known(token))
            or await anyio.to_thread.run_sync(self.known_token, token)
        ):
            detail = "missing, unknown or revoked bearer token (checked before the body is read)"
            await _problem(send, 401, "Unauthorized", detail)
            return
        else:
            limit = self.limit_for(scope["path"])
        if length == -1:
            await _problem(send, 400, "Bad request", "the Content-Length header is not a number")
            return
        if length is not None and length > limit:
            await _problem(send, 413, "Request body too large", _too_large(length, limit))
            return
        received = 0
        started = False

        async def counted() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise _TooLarge(limit)
            return message

        async def tracked(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counted, tracked)
        except _TooLarge:
            if started:
                raise
            await _problem(send, 413, "Request body too large", _too_large(None, limit))


def _headers(scope: Scope) -> tuple[int | None, bool, str | None]:
    """(Content-Length, or -1 when it is not a number; chunked?; bearer token)."""
    length: int | None = None
    chunked = False
    token: str | None = None
    for key, value in scope.get("headers", ()):
        name = key.lower()
        if name == b"content-length":
            text = value.strip()
            length = int(text) if text.isdigit() else -1
        elif name == b"transfer-encoding":
            chunked = b"chunked" in value.lower()
        elif name == b"authorization":
            scheme, _, rest = value.decode("latin-1").partition(" ")
            rest = rest.strip()
            token = rest if scheme.lower() == "bearer" and rest else None
    return length, chunked, token


def _console_cookie(scope: Scope) -> str | None:
    """The console session cookie of a request (either name: plain or ``__Host-``)."""
    for key, value in scope.get("headers", ()):
        if key.lower() != b"cookie":
            continue
        text: str = bytes(value).decode("latin-1")
        for part in text.split(";"):
            name, _, cookie = part.strip().partition("=")
            if name in ("vpnfleet_console", "__Host-vpnfleet_console") and cookie:
                return cookie
    return None


def _too_large(size: int | None, limit: int) -> str:
    what = f"{size} bytes are" if size is not None else "the request body is"
    return f"{what} over this route's limit of {limit} bytes"


async def _problem(send: Send, status: int, title: str, detail: str) -> None:
    body = json.dumps(
        {"type": "about:blank", "title": title, "status": status, "detail": detail}
    ).encode()
    headers = [
        (b"content-type", PROBLEM.encode()),
        (b"content-length", str(len(body)).encode()),
        (b"connection", b"close"),
    ]
    if status == 401:
        headers.append((b"www-authenticate", b"Bearer"))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
