"""Rendering console pages: the Jinja2 templates, the headers every console response carries.

Templates autoescape everything; no page holds inline script or style, so the CSP below can
forbid both (the one script, static/console.js, only adds confirmations and refresh).
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import jinja2
from fastapi import Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from vpnfleet import __version__
from vpnfleet.controlplane.console.signin import Caller

HERE = Path(__file__).parent
PREFIX = "/console"

CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; "
    "connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
)
HEADERS = {
    "content-security-policy": CSP,
    "x-content-type-options": "nosniff",
    "x-frame-options": "DENY",
    "referrer-policy": "same-origin",
    "cross-origin-opener-policy": "same-origin",
    "cross-origin-resource-policy": "same-origin",
    "permissions-policy": "camera=(), microphone=(), geolocation=(), payment=()",
}


def _when(value: dt.datetime | None) -> str:
    if value is None:
        return "-"
    return value.astimezone(dt.UTC).strftime("%Y-%m-%d %H:%M:%S")


def _ago(value: dt.datetime | None) -> str:
    if value is None:
        return "never"
    seconds = int((dt.datetime.now(dt.UTC) - value).total_seconds())
    if seconds < 120:
        return f"{max(seconds, 0)} s ago"
    if seconds < 7200:
        return f"{seconds // 60} min ago"
    if seconds < 172800:
        return f"{seconds // 3600} h ago"
    return f"{seconds // 86400} d ago"


ENV = jinja2.Environment(
    loader=jinja2.FileSystemLoader(HERE / "templates"),
    autoescape=True,
    undefined=jinja2.StrictUndefined,
    trim_blocks=True,
    lstrip_blocks=True,
)
ENV.filters["when"] = _when
ENV.filters["ago"] = _ago
ENV.globals["version"] = __version__


def page(
    request: Request,
    template: str,
    caller: Caller | None,
    status: int = 200,
    **context: Any,
) -> HTMLResponse:
    """A rendered page (the caller's name, role and CSRF token are in every template)."""
    body = ENV.get_template(template).render(
        request=request, me=caller, path=request.url.path, **context
    )
    return HTMLResponse(body, status_code=status)


def redirect(path: str, **query: str | None) -> RedirectResponse:
    """A 303 to a console path (after a POST: the browser then GETs it)."""
    given = {k: v for k, v in query.items() if v}
    return RedirectResponse(path + (f"?{urlencode(given)}" if given else ""), status_code=303)


def error_page(request: Request, status: int, title: str, detail: str) -> Response:
    """Errors under /console as a page (errors.py calls this instead of problem+json)."""
    caller = getattr(request.state, "console_caller", None)
    response = page(request, "error.html", caller, status=status, title=title, detail=detail)
    if status == 429:
        response.headers["retry-after"] = "60"
    return response


class ConsoleHeaders:
    """ASGI middleware: the security headers on every response under /console."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not scope["path"].startswith(PREFIX):
            await self.app(scope, receive, send)
            return
        static = scope["path"].startswith(PREFIX + "/static/")
        https = scope.get("scheme") == "https"

        async def with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                present = {k.lower() for k, _ in headers}
                for name, value in HEADERS.items():
                    if name.encode() not in present:
                        headers.append((name.encode(), value.encode()))
                if not static:
                    headers.append((b"cache-control", b"no-store"))
                if https:
                    headers.append((b"strict-transport-security", b"max-age=31536000"))
                message["headers"] = headers
            await send(message)

        await self.app(scope, receive, with_headers)
