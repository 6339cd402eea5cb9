"""The web console: server-rendered pages for operators and auditors (docs/console.md).

Served by the control plane under ``/console``, with the API's services, roles and admin audit
log. Sign-in with a console account (signin.py); every action a form post with a CSRF token;
no page has inline script, and the CSP forbids it (render.py).
"""

from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.responses import RedirectResponse, Response
from fastapi.staticfiles import StaticFiles

from vpnfleet.controlplane.console import (
    access,
    accounts,
    admin,
    audit,
    entry,
    fleet,
    people,
    policypage,
    selfservice,
)
from vpnfleet.controlplane.console.render import HERE, ConsoleHeaders, error_page, redirect
from vpnfleet.controlplane.console.signin import NotSignedIn


def install(app: FastAPI) -> None:
    """Add the console's routes, static files, error pages and headers to the app."""
    app.state.html_errors = error_page
    # selfservice first: its /users/{name}/sign-in-link precedes people's /users/{name}/{action}
    for module in (entry, fleet, selfservice, people, access, audit, accounts, admin, policypage):
        app.include_router(module.router)
    app.mount("/console/static", StaticFiles(directory=HERE / "static"), name="console-static")

    @app.exception_handler(NotSignedIn)
    async def _sign_in_first(_req: Request, exc: NotSignedIn) -> Response:
        return redirect("/console/login", next=exc.next_path)

    @app.get("/console", include_in_schema=False)
    async def _slash() -> Response:
        return RedirectResponse("/console/", status_code=308)

    app.add_middleware(ConsoleHeaders)
