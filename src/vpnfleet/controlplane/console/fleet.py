"""The fleet overview and the live sessions."""

from __future__ import annotations

import datetime as dt
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import Response
from sqlalchemy import func, select

from vpnfleet.controlplane import certs, changelog, pki
from vpnfleet.controlplane.console import paging
from vpnfleet.controlplane.console.render import page
from vpnfleet.controlplane.console.signin import Viewer, need
from vpnfleet.controlplane.models import Pod, User, VpnSession
from vpnfleet.controlplane.routers.audit import SESSIONS
from vpnfleet.controlplane.routers.fleet import pod_out
from vpnfleet.controlplane.routing import WriteThroughRoute
from vpnfleet.controlplane.state import ReadDB
from vpnfleet.core.fleetstatus import assess

router = APIRouter(route_class=WriteThroughRoute, prefix="/console", include_in_schema=False)

MAX_PODS = 1_000  # the overview lists every pod; fleets are hundreds at most


@router.get("/")
def overview(request: Request, db: ReadDB, me: Viewer, notice: str | None = None) -> Response:
    need(me, "operator", "auditor")
    revision = changelog.current_revision(db)
    pods: list[dict[str, Any]] = [
        pod_out(p).model_dump(mode="json")
        for p in db.scalars(select(Pod).order_by(Pod.name).limit(MAX_PODS))
    ]
    ca = pki.cert_info(certs.ca_cert_pem(db))
    report = assess(
        revision, pods, {"ca": {"not_after": ca.not_after.isoformat()}}, dt.datetime.now(dt.UTC)
    )
    live = db.scalar(
        select(func.count()).select_from(VpnSession).where(VpnSession.ended_at.is_(None))
    )
    counts = {
        "users": db.scalar(select(func.count()).select_from(User)) or 0,
        "disabled": db.scalar(select(func.count()).select_from(User).where(~User.enabled)) or 0,
        "sessions": live or 0,
    }
    return page(request, "overview.html", me, report=report, counts=counts, notice=notice)


@router.get("/sessions")
def live_sessions(
    request: Request,
    db: ReadDB,
    me: Viewer,
    user: str | None = None,
    pod: str | None = None,
    ended: bool = False,
    cursor: str | None = None,
    notice: str | None = None,
) -> Response:
    need(me, "operator", "auditor")
    query = select(VpnSession)
    query = query.where(
        VpnSession.ended_at.is_not(None) if ended else VpnSession.ended_at.is_(None)
    )
    if user:
        query = query.where(VpnSession.user_name == user.strip())
    if pod:
        query = query.where(VpnSession.pod_name == pod.strip())
    rows = db.scalars(paging.query(SESSIONS, query, cursor)).all()
    filters = {"user": user, "pod": pod, "ended": "true" if ended else None}
    listing = paging.listing(
        SESSIONS, rows, lambda s: (s.started_at, s.id), request.url.path, filters
    )
    return page(
        request,
        "sessions.html",
        me,
        listing=listing,
        user=user or "",
        pod=pod or "",
        ended=ended,
        notice=notice,
    )
