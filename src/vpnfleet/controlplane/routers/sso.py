"""VPN single sign-on logins (docs/sso.md).

The agent endpoints take a pod's own credential: a pod registers its waiting connections and
asks for the decisions of its own logins only. The browser endpoints take no token: the login
URL's random id and the OAuth state are what bind a browser to one waiting connection, and
each is used once (services/sso.py). Their answers are short HTML pages for a person.
"""

from __future__ import annotations

import asyncio
import contextlib
import html
import time
from typing import Annotated

import anyio.to_thread
from fastapi import APIRouter, Query, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response

from vpnfleet.controlplane.auth import Principal
from vpnfleet.controlplane.console import selfservice
from vpnfleet.controlplane.routing import WriteThroughRoute
from vpnfleet.controlplane.schemas import SsoDecision, SsoDecisions, SsoLoginIn, SsoLoginOut
from vpnfleet.controlplane.services import consolesso, sso
from vpnfleet.controlplane.ssobell import MAX_WAIT
from vpnfleet.controlplane.state import DB, AppState, PodCaller, PodPoller, State

router = APIRouter(route_class=WriteThroughRoute, tags=["sso"])


@router.post("/api/v1/agent/sso-logins", response_model=SsoLoginOut, status_code=201)
def register_login(body: SsoLoginIn, db: DB, who: PodCaller) -> SsoLoginOut:
    """A connection on the calling pod waits for its user's single sign-on login: the short
    URL to send the client (WEB_AUTH) and how long the login may take. 409 without an IdP."""
    return sso.register(db, who, body)


@router.get("/api/v1/agent/sso-decisions", response_model=SsoDecisions)
async def login_decisions(
    request: Request,
    app: State,
    who: PodPoller,
    wait: Annotated[
        float,
        Query(
            ge=0,
            le=MAX_WAIT,
            description="seconds to wait for a decision when none is there yet (a long poll)",
        ),
    ] = 0,
) -> SsoDecisions:
    """The calling pod's logins decided since it last asked (each decision handed out once).

    With `wait`, the answer comes as soon as one is decided on any replica, or empty after
    `wait` seconds; the wait holds no database session (controlplane/ssobell.py)."""
    assert who.pod is not None
    deadline = time.monotonic() + wait
    with app.bell.listen(who.pod) as rung:
        while True:
            rung.clear()
            async with app.db_slots():
                if await request.is_disconnected():
                    # The agent gave up (its timeout, a restart): nobody would read them, so
                    # the decisions stay for its next poll.
                    return SsoDecisions(decisions=[])
                got = await anyio.to_thread.run_sync(_take_decisions, app, who)
            left = deadline - time.monotonic()
            if got or left <= 0 or app.bell.closing:
                return SsoDecisions(decisions=got)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(rung.wait(), left)


def _take_decisions(app: AppState, who: Principal) -> list[SsoDecision]:
    with app.factory() as db, db.begin():
        return sso.decisions(db, who)


def _page(status: int, title: str, message: str) -> HTMLResponse:
    body = (
        "<!doctype html><html><head><meta charset=utf-8><title>vpnfleet</title></head><body>"
        f"<h1>{html.escape(title)}</h1><p>{html.escape(message)}</p></body></html>"
    )
    return HTMLResponse(body, status_code=status, headers={"Cache-Control": "no-store"})


@router.get("/sso/login/{login_id}", include_in_schema=False)
def open_login(login_id: str, db: DB) -> Response:
    """The URL the VPN client opens: on to the IdP with this login's state (once)."""
    try:
        url = sso.start(db, login_id[:64])
    except sso.LoginRefused as exc:
        return _page(exc.status, "VPN login", exc.message)
    return RedirectResponse(url, status_code=302, headers={"Cache-Control": "no-store"})


@router.get("/sso/callback", include_in_schema=False)
def login_callback(
    request: Request,
    db: DB,
    app: State,
    oauth_state: Annotated[str | None, Query(alias="state", max_length=200)] = None,
    code: Annotated[str | None, Query(max_length=2000)] = None,
    error: Annotated[str | None, Query(max_length=200)] = None,
) -> Response:
    """Where the IdP sends the browser back: the login is decided here, once."""
    if oauth_state and consolesso.owns(db, oauth_state):
        # A VPN user signing in to the self-service pages (controlplane/console).
        return selfservice.sso_finished(request, db, app.sealer, oauth_state, code, error)
    try:
        browser = request.client.host if request.client else None
        outcome = sso.callback(db, app.sealer, oauth_state, code, error, browser)
    except sso.LoginRefused as exc:
        return _page(exc.status, "VPN login", exc.message)
    app.bell.ring(outcome.pod)  # committed: the pod's long poll collects it now
    return _page(200 if outcome.admitted else 403, "VPN login", outcome.message)
