"""Audit reads: the admin log and VPN sessions."""

from __future__ import annotations

import datetime as dt

from fastapi import APIRouter
from sqlalchemy import Select, select

from vpnfleet.controlplane.errors import bad_request
from vpnfleet.controlplane.models import AdminAudit, DeniedAttempt, VpnSession
from vpnfleet.controlplane.pagination import LINK_HEADER, Keyset, PageParams
from vpnfleet.controlplane.routing import WriteThroughRoute
from vpnfleet.controlplane.schemas import AdminAuditOut, SessionOut
from vpnfleet.controlplane.state import DB, Auditor

router = APIRouter(route_class=WriteThroughRoute, prefix="/api/v1", tags=["audit"])

# Newest first; the id breaks ties between rows of the same time.
ADMIN_LOG = Keyset("audit-admin", (AdminAudit.id,), ("int",), descending=True)
SESSIONS = Keyset(
    "sessions", (VpnSession.started_at, VpnSession.id), ("time", "int"), descending=True
)
DENIED = Keyset(
    "audit-denied", (DeniedAttempt.first_at, DeniedAttempt.id), ("time", "int"), descending=True
)


def _aware(value: dt.datetime | None, name: str) -> dt.datetime | None:
    if value is None:
        return None
    if value.tzinfo is None:
        raise bad_request(f"{name} needs a time zone, e.g. 2026-01-31T12:00:00Z")
    try:
        return value.astimezone(dt.UTC)
    except OverflowError:
        raise bad_request(f"{name} is out of range once converted to UTC") from None


def session_out(s: VpnSession) -> SessionOut:
    return SessionOut(
        id=s.id,
        user=s.user_name,
        pod=s.pod_name,
        mode=s.mode,
        tunnel_ip=s.tunnel_ip,
        real_ip=s.real_ip,
        real_port=s.real_port,
        started_at=s.started_at,
        ended_at=s.ended_at,
        bytes_in=s.bytes_in,
        bytes_out=s.bytes_out,
        end_reason=s.end_reason,
        kill_reason=s.kill_reason,
        kill_requested_at=s.kill_requested_at,
    )


@router.get("/audit/admin", response_model=list[AdminAuditOut], responses=LINK_HEADER)
def admin_log(
    db: DB,
    _who: Auditor,
    page: PageParams,
    actor: str | None = None,
    action: str | None = None,
    since: dt.datetime | None = None,
    until: dt.datetime | None = None,
) -> list[AdminAuditOut]:
    """The admin log, newest first, a page at a time."""
    query = select(AdminAudit)
    if actor:
        query = query.where(AdminAudit.actor == actor)
    if action:
        query = query.where(AdminAudit.action.startswith(action))
    if (since := _aware(since, "since")) is not None:
        query = query.where(AdminAudit.at >= since)
    if (until := _aware(until, "until")) is not None:
        query = query.where(AdminAudit.at <= until)
    return [
        AdminAuditOut(
            id=r.id,
            at=r.at,
            actor=r.actor,
            role=r.role,
            action=r.action,
            target=r.target,
            before=r.before,
            after=r.after,
            revision=r.revision,
        )
        for r in page.rows(ADMIN_LOG, db.scalars(page.query(ADMIN_LOG, query)).all(), _by_id)
    ]


def _by_id(row: AdminAudit) -> tuple[int]:
    return (row.id,)


@router.get("/sessions", response_model=list[SessionOut], responses=LINK_HEADER)
def list_sessions(
    db: DB,
    _who: Auditor,
    page: PageParams,
    user: str | None = None,
    pod: str | None = None,
    active: bool | None = None,
    since: dt.datetime | None = None,
    until: dt.datetime | None = None,
) -> list[SessionOut]:
    """Sessions, newest first, a page at a time."""
    query = select(VpnSession)
    if user:
        query = query.where(VpnSession.user_name == user)
    if pod:
        query = query.where(VpnSession.pod_name == pod)
    if active is True:
        query = query.where(VpnSession.ended_at.is_(None))
    elif active is False:
        query = query.where(VpnSession.ended_at.is_not(None))
    if (since := _aware(since, "since")) is not None:
        query = query.where((VpnSession.ended_at.is_(None)) | (VpnSession.ended_at >= since))
    if (until := _aware(until, "until")) is not None:
        query = query.where(VpnSession.started_at <= until)
    found = db.scalars(page.query(SESSIONS, query)).all()
    return [session_out(s) for s in page.rows(SESSIONS, found, lambda s: (s.started_at, s.id))]


@router.get("/audit/denied", responses=LINK_HEADER)
def denied_attempts(
    db: DB,
    _who: Auditor,
    page: PageParams,
    user: str | None = None,
    since: dt.datetime | None = None,
    until: dt.datetime | None = None,
) -> list[dict[str, object]]:
    """Traffic that no grant allowed, newest first, a page at a time."""
    query = denied_query(user, since, until)
    return [
        denied_out(r)
        for r in page.rows(
            DENIED, db.scalars(page.query(DENIED, query)).all(), lambda r: (r.first_at, r.id)
        )
    ]


def denied_query(
    user: str | None, since: dt.datetime | None, until: dt.datetime | None
) -> Select[DeniedAttempt]:
    """The denied-attempt rows matching the filters (the API's list and the console's)."""
    query = select(DeniedAttempt)
    if user:
        query = query.where(DeniedAttempt.user_name == user)
    if (since := _aware(since, "since")) is not None:
        query = query.where(DeniedAttempt.last_at >= since)
    if (until := _aware(until, "until")) is not None:
        query = query.where(DeniedAttempt.first_at <= until)
    return query


def denied_out(r: DeniedAttempt) -> dict[str, object]:
    return {
        "pod": r.pod_name,
        "user": r.user_name,
        "session_uid": r.session_uid,
        "src": r.src,
        "dst": r.dst,
        "proto": r.proto,
        "dport": r.dport,
        "first_at": r.first_at,
        "last_at": r.last_at,
        "count": r.count,
        "overflow": r.overflow,
    }
