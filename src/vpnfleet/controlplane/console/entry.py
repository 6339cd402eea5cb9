"""Signing in and out of the console."""

from __future__ import annotations

import secrets

from fastapi import APIRouter, Request
from fastapi.responses import Response

from vpnfleet.controlplane import changelog
from vpnfleet.controlplane.console import signin
from vpnfleet.controlplane.console.render import page, redirect
from vpnfleet.controlplane.console.signin import Actor, Form
from vpnfleet.controlplane.errors import Problem
from vpnfleet.controlplane.routing import WriteThroughRoute
from vpnfleet.controlplane.state import DB

router = APIRouter(route_class=WriteThroughRoute, prefix="/console", include_in_schema=False)

LOGIN_FORM_AGE = 3600


def _login_page(
    request: Request, next_path: str, name: str, error: str | None, status: int
) -> Response:
    token = secrets.token_urlsafe(24)
    response = page(
        request,
        "login.html",
        None,
        status=status,
        login_csrf=token,
        next=next_path,
        name=name,
        error=error,
    )
    response.set_cookie(
        signin.cookie_name(request, signin.LOGIN_COOKIE),
        token,
        max_age=LOGIN_FORM_AGE,
        path="/",
        secure=signin.secure(request),
        httponly=True,
        samesite="strict",
    )
    return response


@router.get("/login")
def login_form(request: Request, db: DB, next: str | None = None) -> Response:
    if signin.current(db, request) is not None:
        return redirect(signin.safe_next(next))
    return _login_page(request, signin.safe_next(next), "", None, 200)


@router.post("/login")
def login(request: Request, db: DB, form: Form) -> Response:
    signin.check_login_form(request, form)
    state = request.app.state.vpnfleet
    name = form.get("name", "").strip()[:64]
    next_path = signin.safe_next(form.get("next"))
    try:
        done = signin.sign_in(
            db, state.console_throttle, name, form.get("password", ""), signin.client_ip(request)
        )
    except Problem as problem:
        if problem.status not in (401, 429):
            raise
        db.rollback()
        return _login_page(request, next_path, name, problem.detail, problem.status)
    ip = signin.client_ip(request)
    changelog.audit(db, done.caller.principal, "console.sign-in", name, None, {"ip": ip}, None)
    response = redirect(next_path)
    response.set_cookie(
        signin.cookie_name(request),
        done.token,
        max_age=int(signin.LIFETIME.total_seconds()),
        path="/",
        secure=signin.secure(request),
        httponly=True,
        samesite="strict",
    )
    response.delete_cookie(signin.cookie_name(request, signin.LOGIN_COOKIE), path="/")
    return response


@router.post("/logout")
def logout(request: Request, db: DB, me: Actor) -> Response:
    signin.sign_out(db, me)
    response = redirect("/console/login")
    response.delete_cookie(
        signin.cookie_name(request), path="/", secure=signin.secure(request), httponly=True
    )
    return response
