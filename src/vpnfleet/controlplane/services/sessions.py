"""VPN sessions: recorded as pods report them, ended by their pods, killed as state.

A kill marks live sessions (`kill_reason`) instead of sending a one-off command: the mark is
in every snapshot, so a pod whose agent was restarting when the kill was asked for still
learns it. The session stays live until its pod closes it, which keeps its bytes and real end
time; meanwhile it no longer counts toward the user's session limit.
"""

from __future__ import annotations

from collections.abc import Sequence

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from vpnfleet.controlplane import fleetstate
from vpnfleet.controlplane.errors import Problem, not_found
from vpnfleet.controlplane.models import User, VpnSession, utcnow
from vpnfleet.controlplane.services.journal import Journal
from vpnfleet.wire import SessionClose, SessionOpen, SessionReport, SessionVerdict

ADMIN_KILL = "disconnected by an administrator"
REPLACED = "replaced by a new connection from the same address"


def _live(db: Session, user: User) -> list[VpnSession]:
    return list(
        db.scalars(
            select(VpnSession)
            .where(VpnSession.user_id == user.id, VpnSession.ended_at.is_(None))
            .order_by(VpnSession.id)
        )
    )


def _mark_killed(journal: Journal, rows: Sequence[VpnSession], reason: str) -> None:
    now = utcnow()
    for row in rows:
        if row.kill_reason is None:  # the first reason stands; asking again re-sends it
            row.kill_reason = reason
            row.kill_requested_at = now
        journal.upsert(fleetstate.session_state(row))


def open_session(db: Session, journal: Journal, body: SessionOpen) -> SessionVerdict:
    """Record a session (idempotent by uid) and say whether it may stay.

    Sessions already marked to end do not count toward the limit. The same device
    reconnecting (same public address) replaces its old sessions: OpenVPN may keep those
    until a ping timeout, and they must not lock the user out meanwhile; they are marked
    killed, and their pods close them.
    """
    existing = db.scalar(select(VpnSession).where(VpnSession.uid == body.uid))
    if existing is not None:
        return SessionVerdict(uid=body.uid, session_id=existing.id, allowed=True)
    user = db.scalar(select(User).where(User.name == body.user).with_for_update())
    if user is None:
        raise not_found("user", body.user)
    if body.started_at.tzinfo is None:
        raise Problem(422, "Invalid request", "started_at: needs a time zone")
    staying = [r for r in _live(db, user) if r.kill_reason is None]
    replaced = [r for r in staying if body.real_ip and r.real_ip == body.real_ip]
    allowed, reason = True, None
    if not user.enabled:
        allowed, reason = False, "user is disabled"
    elif len(staying) - len(replaced) >= user.max_sessions:
        allowed, reason = False, f"session limit reached ({user.max_sessions})"
    row = VpnSession(
        uid=body.uid,
        user_id=user.id,
        user_name=user.name,
        pod_name=body.pod,
        mode=body.mode,
        tunnel_ip=body.tunnel_ip,
        real_ip=body.real_ip,
        real_port=body.real_port,
        client_id=body.client_id,
        started_at=body.started_at,
    )
    if not allowed:
        # Kept for the audit trail, closed at once; the agent disconnects the client.
        row.ended_at = body.started_at
        row.end_reason = f"refused: {reason}"
    try:
        with db.begin_nested():
            db.add(row)
            db.flush()
    except IntegrityError:
        # The same uid delivered twice at once: the other delivery recorded it.
        again = db.scalar(select(VpnSession).where(VpnSession.uid == body.uid))
        if again is None:
            raise
        return SessionVerdict(uid=body.uid, session_id=again.id, allowed=True)
    if allowed:
        journal.upsert(fleetstate.session_state(row))
        _mark_killed(journal, replaced, REPLACED)
        db.flush()
    return SessionVerdict(uid=body.uid, session_id=row.id, allowed=allowed, reason=reason)


def close_session(db: Session, journal: Journal, body: SessionClose) -> bool:
    """Close a session with its pod's bytes and reason, killed or not; False if it was
    already closed or is unknown (closing twice is not an error)."""
    if body.ended_at.tzinfo is None:
        raise Problem(422, "Invalid request", "ended_at: needs a time zone")
    row = db.scalar(select(VpnSession).where(VpnSession.uid == body.uid))
    if row is None or row.ended_at is not None:
        return False
    row.ended_at = max(body.ended_at, row.started_at)
    row.bytes_in = body.bytes_in
    row.bytes_out = body.bytes_out
    row.end_reason = body.reason
    db.flush()
    journal.delete(fleetstate.session_key(row))
    return True


def report_sessions(db: Session, journal: Journal, body: SessionReport) -> int:
    """Level-triggered repair: close this pod's sessions that the pod no longer has."""
    live = set(body.live)
    stale = [
        s
        for s in db.scalars(
            select(VpnSession)
            .where(VpnSession.pod_name == body.pod, VpnSession.ended_at.is_(None))
            .order_by(VpnSession.id)
        )
        if s.uid not in live
    ]
    now = utcnow()
    for s in stale:
        s.ended_at = max(now, s.started_at)
        s.end_reason = "not live on pod (reconciled)"
        journal.delete(fleetstate.session_key(s))
    db.flush()
    return len(stale)


def kill_user_sessions(db: Session, journal: Journal, user: User, reason: str = ADMIN_KILL) -> int:
    """Mark every live session of `user` to end; returns how many there are."""
    live = _live(db, user)
    _mark_killed(journal, live, reason)
    db.flush()
    journal.audit("session.kill", user.name, None, {"sessions": [s.uid for s in live]})
    return len(live)
