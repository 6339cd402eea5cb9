"""Audit reads: the admin log and VPN sessions."""

from __future__ import annotations

import datetime as dt

from fastapi import APIRouter, Query
from sqlalchemy import select

from vpnfleet.controlplane.errors import bad_request
from vpnfleet.controlplane.models import AdminAudit, DeniedAttempt, VpnSession
from vpnfleet.controlplane.schemas import AdminAuditOut, SessionOut
from vpnfleet.controlplane.state import DB, Auditor

router = APIRouter(prefix="/api/v1", tags=["audit"])

MAX_LIMIT = 10_000


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


@router.get("/audit/admin", response_model=list[AdminAuditOut])
def admin_log(
    db: DB,
    _who: Auditor,
    actor: str | None = None,
    action: str | None = None,
    since: dt.datetime | None = None,
    until: dt.datetime | None = None,
    limit: int = Query(default=100, ge=1, le=MAX_LIMIT),
) -> list[AdminAuditOut]:
    query = select(AdminAudit).order_by(AdminAudit.id.desc()).limit(limit)
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
        for r in db.scalars(query)
    ]


@router.get("/sessions", response_model=list[SessionOut])
def list_sessions(
    db: DB,
    _who: Auditor,
    user: str | None = None,
    pod: str | None = None,
    active: bool | None = None,
    since: dt.datetime | None = None,
    until: dt.datetime | None = None,
    limit: int = Query(default=500, ge=1, le=MAX_LIMIT),
) -> list[SessionOut]:
    query = select(VpnSession).order_by(VpnSession.started_at.desc()).limit(limit)
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
    return [session_out(s) for s in db.scalars(query)]


@router.get("/audit/denied")
def denied_attempts(
    db: DB,
    _who: Auditor,
    user: str | None = None,
    since: dt.datetime | None = None,
    until: dt.datetime | None = None,
    limit: int = Query(default=500, ge=1, le=MAX_LIMIT),
) -> list[dict[str, object]]:
    """Traffic that no grant allowed, newest first."""
    query = select(DeniedAttempt).order_by(DeniedAttempt.first_at.desc()).limit(limit)
    if user:
        query = query.where(DeniedAttempt.user_name == user)
    if (since := _aware(since, "since")) is not None:
        query = query.where(DeniedAttempt.last_at >= since)
    if (until := _aware(until, "until")) is not None:
        query = query.where(DeniedAttempt.first_at <= until)
    return [
        {
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
        for r in db.scalars(query)
    ]
