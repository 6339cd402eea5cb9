"""Users: the list, a new user, one user's page and what an operator does to a user."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import Response
from sqlalchemy import select

from vpnfleet.controlplane.console import paging
from vpnfleet.controlplane.console.forms import names, number, validated
from vpnfleet.controlplane.console.render import page, redirect
from vpnfleet.controlplane.console.signin import Actor, Form, Viewer, need, safe_next
from vpnfleet.controlplane.errors import Problem, not_found
from vpnfleet.controlplane.models import Group, User, VpnSession
from vpnfleet.controlplane.routers.users import USERS, profile_download
from vpnfleet.controlplane.routing import WriteThroughRoute
from vpnfleet.controlplane.schemas import UserCreate
from vpnfleet.controlplane.services import devices, groups, sessions, users
from vpnfleet.controlplane.services.journal import Journal
from vpnfleet.controlplane.state import DB, ReadDB, State
from vpnfleet.core import netparse

router = APIRouter(route_class=WriteThroughRoute, prefix="/console", include_in_schema=False)

RECENT_SESSIONS = 20
MAX_GROUP_CHOICES = 500


def _escape_like(text: str) -> str:
    return text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")


@router.get("/users")
def user_list(
    request: Request,
    db: ReadDB,
    me: Viewer,
    q: str | None = None,
    cursor: str | None = None,
    notice: str | None = None,
) -> Response:
    need(me, "operator")
    query = select(User)
    if q and q.strip():
        query = query.where(User.name.like(_escape_like(q.strip()[:64]) + "%", escape="\\"))
    rows = db.scalars(paging.query(USERS, query, cursor)).all()
    listing = paging.listing(USERS, rows, lambda u: (u.name,), request.url.path, {"q": q})
    views = users.users_out(db, listing.rows)
    return page(request, "users.html", me, listing=listing, views=views, q=q or "", notice=notice)


@router.get("/new-user")
def new_user_form(request: Request, db: ReadDB, me: Viewer) -> Response:
    need(me, "operator")
    choices = db.scalars(select(Group.name).order_by(Group.name).limit(MAX_GROUP_CHOICES)).all()
    return page(request, "user_new.html", me, choices=choices, values={}, error=None)


@router.post("/new-user")
def create_user(request: Request, db: DB, me: Actor, form: Form, state: State) -> Response:
    need(me, "operator")
    body = validated(
        UserCreate,
        {
            "name": form.get("name", "").strip(),
            "email": form.get("email", "").strip() or None,
            "mode": form.get("mode", "nat"),
            "max_sessions": number(form, "max_sessions", 1),
            "groups": names(form.get("groups", "")),
        },
    )
    journal = Journal(db, me.principal)
    user = users.create_user(
        db,
        journal,
        state.sealer,
        name=body.name,
        email=body.email,
        mode=netparse.parse_mode(body.mode),
        enabled=True,
        max_sessions=body.max_sessions,
        groups=body.groups,
    )
    journal.commit()
    return redirect(f"/console/users/{user.name}", notice=f"created user {user.name}")


@router.get("/users/{name}")
def user_page(
    request: Request, name: str, db: ReadDB, me: Viewer, notice: str | None = None
) -> Response:
    need(me, "operator")
    user = users.get_user(db, name)
    view = users.user_out(db, user)
    recent = db.scalars(
        select(VpnSession)
        .where(VpnSession.user_name == name)
        .order_by(VpnSession.started_at.desc(), VpnSession.id.desc())
        .limit(RECENT_SESSIONS)
    ).all()
    choices = [
        g
        for g in db.scalars(select(Group.name).order_by(Group.name).limit(MAX_GROUP_CHOICES))
        if g not in view.groups
    ]
    return page(
        request,
        "user.html",
        me,
        user=view,
        sessions=recent,
        live=sum(1 for s in recent if s.ended_at is None),
        choices=choices,
        devices=devices.devices(db, user),
        notice=notice,
    )


@router.post("/users/{name}/profile")
def download_profile(name: str, db: DB, me: Actor, state: State) -> Response:
    """The user's .ovpn (it holds their private key: a POST with CSRF, in the audit log)."""
    need(me, "operator")
    return profile_download(db, Journal(db, me.principal), state, users.get_user(db, name))


@router.post("/users/{name}/devices/{serial}/revoke")
def revoke_device(name: str, serial: str, db: DB, me: Actor) -> Response:
    """Remove one of the user's own devices (a lost laptop): cut and refused at once."""
    need(me, "operator")
    user = users.get_user(db, name)
    cert = devices.get_device(db, user, serial)
    journal = Journal(db, me.principal)
    devices.revoke_device(db, journal, user, cert)
    journal.commit()
    return redirect(f"/console/users/{name}", notice=f"removed {name}'s device {cert.device}")


@router.post("/users/{name}/{action}")
def user_action(name: str, action: str, db: DB, me: Actor, form: Form, state: State) -> Response:
    """disable, enable, reissue, mode, join, leave, kill (its live sessions)."""
    need(me, "operator")
    user = users.get_user(db, name)
    journal = Journal(db, me.principal)
    back = f"/console/users/{name}"
    if action == "kill":
        killed = sessions.kill_user_sessions(db, journal, user, state.settings.pod_lease)
        notice = f"asked the pods to end {killed} session(s) of {name}"
        back = safe_next(form.get("back"), back)
    elif action == "disable":
        users.set_enabled(db, journal, user, False)
        notice = f"{name} is disabled; their sessions are cut"
    elif action == "enable":
        users.set_enabled(db, journal, user, True)
        notice = f"{name} is enabled"
    elif action == "reissue":
        users.reissue_cert(db, journal, state.sealer, user, "reissued from the console")
        notice = f"issued {name} a new certificate; the old one is revoked"
    elif action == "mode":
        try:
            mode = netparse.parse_mode(form.get("mode", ""))
        except ValueError as exc:
            raise Problem(422, "Invalid input", str(exc)) from None
        users.update_user(db, journal, user, {"mode": mode})
        notice = f"{name} is now in {mode} mode"
    elif action in ("join", "leave"):
        group = groups.get_group(db, form.get("group", "").strip())
        if action == "join":
            groups.add_member(db, journal, group, user)
            notice = f"{name} joined {group.name}"
        else:
            groups.remove_member(db, journal, group, user)
            notice = f"{name} left {group.name}"
    else:
        raise not_found("action", action)
    journal.commit()
    return redirect(back, notice=notice)
