"""Self-service for VPN users: sign in with a one-time link, see one's devices and sessions,
add a device (its own certificate) and download its profile or import it into OpenVPN
Connect, remove a device.

A user's browser session is a console session row with ``user_id`` (cookie ``vpnfleet_me``,
the same flags, lifetime and CSRF rules as operators', signin.py); it ends when the user is
disabled or deleted. Actions go to the admin audit log as ``self:NAME``."""

from __future__ import annotations

import datetime as dt
import hmac
import secrets
from dataclasses import dataclass
from typing import Annotated
from urllib.parse import quote

from fastapi import APIRouter, Depends, Request
from fastapi.responses import RedirectResponse, Response
from sqlalchemy import delete, select
from sqlalchemy.orm import Session

from vpnfleet.controlplane import auth, pki
from vpnfleet.controlplane.console import signin
from vpnfleet.controlplane.console.render import error_page, page, redirect
from vpnfleet.controlplane.console.signin import Actor, Form, need
from vpnfleet.controlplane.errors import Problem
from vpnfleet.controlplane.models import ConsoleSession, User, VpnSession
from vpnfleet.controlplane.routers.users import profile_download
from vpnfleet.controlplane.routing import WriteThroughRoute
from vpnfleet.controlplane.services import consolesso, devices, userlinks, users
from vpnfleet.controlplane.services.journal import Journal
from vpnfleet.controlplane.state import DB, State

router = APIRouter(route_class=WriteThroughRoute, prefix="/console", include_in_schema=False)

COOKIE = "vpnfleet_me"
SSO_COOKIE = "vpnfleet_me_sso"  # binds a single sign-on to the browser that started it
RECENT_SESSIONS = 20


@dataclass(frozen=True)
class Person:
    """The VPN user signed in to the self-service pages."""

    user_id: int
    name: str
    csrf: str
    session_id: int

    @property
    def principal(self) -> auth.Principal:
        return self_principal(self.name)


def self_principal(name: str) -> auth.Principal:
    """A VPN user acting on their own page, as the admin audit log names them."""
    return auth.Principal(token_id=0, name=f"self:{name}", role="user")


def _current(db: Session, request: Request) -> Person | None:
    token = request.cookies.get(signin.cookie_name(request, COOKIE))
    if not token or len(token) > 200:
        return None
    row = db.execute(
        select(ConsoleSession, User)
        .join(User, User.id == ConsoleSession.user_id)
        .where(ConsoleSession.token_hash == signin.digest(token))
    ).first()
    if row is None:
        return None
    session, user = row
    now = dt.datetime.now(dt.UTC)
    if session.expires_at <= now or session.last_seen_at + signin.IDLE <= now or not user.enabled:
        db.delete(session)
        db.flush()
        return None
    if now - session.last_seen_at >= signin.TOUCH_EVERY:
        session.last_seen_at = now
    return Person(user.id, user.name, session.csrf, session.id)


def person(request: Request, db: DB) -> Person:
    found = _current(db, request)
    if found is None:
        raise Problem(
            401, "Signed out", "your sign-in link was used or has ended: ask for a new one"
        )
    return found


def acting_person(request: Request, db: DB, form: Form) -> Person:
    if not signin.same_site(request):
        raise Problem(403, "Forbidden", "cross-site form posts are refused")
    found = person(request, db)
    if not hmac.compare_digest(form.get("csrf", "").encode(), found.csrf.encode()):
        raise Problem(403, "Forbidden", "the form's CSRF token is missing or wrong: reload")
    return found


Me = Annotated[Person, Depends(person)]
ActingMe = Annotated[Person, Depends(acting_person)]


# --- an operator hands out the link ---------------------------------------------------------


@router.post("/users/{name}/sign-in-link")
def make_sign_in_link(request: Request, name: str, db: DB, me: Actor) -> Response:
    """A one-time link that signs the user in to their self-service page (shown once)."""
    need(me, "operator")
    journal = Journal(db, me.principal)
    user = users.get_user(db, name)
    token, expires = userlinks.make(db, journal, user, userlinks.SIGN_IN)
    journal.commit()
    url = str(request.base_url).rstrip("/") + f"/console/me/enter/{token}"
    return page(request, "link.html", me, user=name, url=url, expires=expires)


# --- the user's side -------------------------------------------------------------------------


@router.get("/me/enter/{token}")
def enter_form(request: Request, token: str, db: DB) -> Response:
    """Ask before using the link: mail scanners that open links must not spend it."""
    usable = userlinks.peek(db, token, userlinks.SIGN_IN)
    status = 200 if usable else 410
    sso = consolesso.configured(db)
    return page(request, "me_enter.html", None, status=status, usable=usable, token=token, sso=sso)


@router.post("/me/enter/{token}")
def enter(request: Request, token: str, db: DB) -> Response:
    if not signin.same_site(request):
        raise Problem(403, "Forbidden", "cross-site form posts are refused")
    user, _link = userlinks.redeem(db, token, userlinks.SIGN_IN)
    return _signed_in(request, db, user)


def _signed_in(request: Request, db: Session, user: User) -> Response:
    """A new self-service session for ``user``: its cookie, and on to their page."""
    now = dt.datetime.now(dt.UTC)
    cookie = secrets.token_urlsafe(32)
    db.add(
        ConsoleSession(
            token_hash=signin.digest(cookie),
            user_id=user.id,
            csrf=secrets.token_urlsafe(32),
            created_at=now,
            expires_at=now + signin.LIFETIME,
            last_seen_at=now,
            client_ip=signin.client_ip(request)[:64],
        )
    )
    db.flush()
    response = redirect("/console/me/")
    response.set_cookie(
        signin.cookie_name(request, COOKIE),
        cookie,
        max_age=int(signin.LIFETIME.total_seconds()),
        path="/",
        secure=signin.secure(request),
        httponly=True,
        samesite="strict" if request.method == "POST" else "lax",
    )
    return response


@router.get("/me/sso")
def sso_start(request: Request, db: DB) -> Response:
    """Sign in with the company's IdP (the one VPN single sign-on uses). A cookie binds the
    login to this browser; the callback needs it (SameSite=Lax: it comes back from the IdP)."""
    browser = secrets.token_urlsafe(32)
    response = RedirectResponse(consolesso.start(db, browser), status_code=302)
    response.set_cookie(
        signin.cookie_name(request, SSO_COOKIE),
        browser,
        max_age=int(consolesso.LIFETIME.total_seconds()),
        path="/",
        secure=signin.secure(request),
        httponly=True,
        samesite="lax",
    )
    return response


def sso_finished(
    request: Request, db: Session, sealer: pki.Sealer, state: str, code: str | None,
    error: str | None,
) -> Response:  # fmt: skip
    """The IdP's callback for a console login (routers/sso.py tells it from a VPN login).
    Served at /sso/callback, outside /console: errors are shown as a console page here."""
    browser = request.cookies.get(signin.cookie_name(request, SSO_COOKIE))
    try:
        user = consolesso.finish(db, sealer, state, code, error, browser)
    except Problem as problem:
        return error_page(request, problem.status, problem.title, problem.detail)
    response = _signed_in(request, db, user)
    response.delete_cookie(signin.cookie_name(request, SSO_COOKIE), path="/")
    return response


@router.get("/me/")
def my_page(request: Request, db: DB, notice: str | None = None) -> Response:
    me = _current(db, request)
    if me is None:  # not signed in: how to sign in
        sso = consolesso.configured(db)
        return page(request, "me_enter.html", None, status=401, usable=False, token="", sso=sso)
    user = db.get(User, me.user_id)
    assert user is not None
    recent = db.scalars(
        select(VpnSession)
        .where(VpnSession.user_id == user.id)
        .order_by(VpnSession.started_at.desc(), VpnSession.id.desc())
        .limit(RECENT_SESSIONS)
    ).all()
    return page(
        request,
        "me.html",
        None,
        person=me,
        user=users.user_out(db, user),
        devices=devices.devices(db, user),
        sessions=recent,
        max_devices=devices.MAX_DEVICES,
        notice=notice,
    )


def _user(db: Session, me: Person) -> User:
    user = db.get(User, me.user_id)
    if user is None:
        raise Problem(401, "Signed out", "your VPN account no longer exists")
    return user


@router.post("/me/devices")
def add_device(db: DB, me: ActingMe, form: Form, state: State) -> Response:
    user = _user(db, me)
    journal = Journal(db, me.principal)
    cert = devices.add_device(db, journal, state.sealer, user, form.get("device", ""))
    journal.commit()
    return redirect(
        "/console/me/", notice=f"added {cert.device}: download its profile or import it below"
    )


@router.post("/me/devices/{serial}/profile")
def device_profile(serial: str, db: DB, me: ActingMe, state: State) -> Response:
    user = _user(db, me)
    cert = devices.get_device(db, user, serial)
    journal = Journal(db, me.principal)
    return profile_download(db, journal, state, user, cert, _file_name(user, cert.device))


def _file_name(user: User, device: str | None) -> str:
    label = "".join(c if c.isalnum() or c in "-_" else "-" for c in (device or "profile"))
    return f"{user.name}-{label.strip('-')[:40] or 'device'}.ovpn"


@router.post("/me/devices/{serial}/import-link")
def import_link(request: Request, serial: str, db: DB, me: ActingMe) -> Response:
    """An ``openvpn://import-profile/...`` link for OpenVPN Connect: one download, 10 min."""
    user = _user(db, me)
    cert = devices.get_device(db, user, serial)
    if cert.revoked_at is not None:
        raise Problem(409, "Conflict", "this device was removed: add it again")
    journal = Journal(db, me.principal)
    token, expires = userlinks.make(db, journal, user, userlinks.PROFILE, cert)
    journal.commit()
    url = str(request.base_url).rstrip("/") + f"/console/me/import/{token}"
    return page(
        request,
        "me_import.html",
        None,
        person=me,
        device=cert.device,
        url=url,
        connect_url="openvpn://import-profile/" + quote(url, safe=":/"),
        expires=expires,
    )


@router.get("/me/import/{token}")
def import_profile(token: str, db: DB, state: State) -> Response:
    """The profile behind an import link (the link is the credential: once, 10 minutes)."""
    user, link = userlinks.redeem(db, token, userlinks.PROFILE)
    cert = devices.get_device_by_id(db, user, link.certificate_id)
    journal = Journal(db, self_principal(user.name))
    return profile_download(db, journal, state, user, cert, _file_name(user, cert.device))


@router.post("/me/devices/{serial}/revoke")
def revoke_device(serial: str, db: DB, me: ActingMe) -> Response:
    user = _user(db, me)
    cert = devices.get_device(db, user, serial)
    journal = Journal(db, me.principal)
    devices.revoke_device(db, journal, user, cert)
    journal.commit()
    return redirect("/console/me/", notice=f"removed {cert.device}: it can no longer connect")


@router.post("/me/logout")
def logout(request: Request, db: DB, me: ActingMe) -> Response:
    db.execute(delete(ConsoleSession).where(ConsoleSession.id == me.session_id))
    sso = consolesso.configured(db)
    response = page(
        request, "me_enter.html", None, usable=False, token="", signed_out=True, sso=sso
    )
    response.delete_cookie(signin.cookie_name(request, COOKIE), path="/")
    return response
