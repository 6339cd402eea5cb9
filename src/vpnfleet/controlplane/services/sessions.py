"""VPN sessions: recorded as pods report them, ended by their pods, killed as state.

A kill marks live sessions (`kill_reason`) instead of sending a one-off command: the mark is
in every snapshot, so a pod whose agent was restarting when the kill was asked for still
learns it. The session stays live until its pod closes it, which keeps its bytes and real end
time; meanwhile it no longer counts toward the user's session limit.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from sqlalchemy import ColumnElement, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from vpnfleet.controlplane import fleetstate
from vpnfleet.controlplane.errors import Problem, not_found
from vpnfleet.controlplane.models import GatewayLease, Pod, Pool, User, VpnSession, utcnow
from vpnfleet.controlplane.services import pods
from vpnfleet.controlplane.services.journal import Journal
from vpnfleet.wire import (
    OpenRecord,
    SessionBatch,
    SessionClose,
    SessionOpen,
    SessionReport,
    SessionResult,
    SessionVerdict,
)

ADMIN_KILL = "disconnected by an administrator"
REPLACED = "replaced by a new connection from the same address"
LEASE_EXPIRED = "pod lease expired (no heartbeat)"


@dataclass
class _Known:
    """What a batch of one pod's records looks up once instead of once per record: its pod
    and NAT pool, the users it touches (locked), its sessions by uid and those users' live
    sessions (both read after the lock, so current; kept current as the records apply), and
    which pods of those users' live sessions hold their lease."""

    pod: Pod
    pool: Pool | None  # the pod's NAT pool (looked up only when the batch opens sessions)
    users: dict[str, User]
    sessions: dict[str, VpnSession]
    live: dict[int, list[VpnSession]]  # by user id, in the order they were opened
    alive: dict[str, bool] = field(default_factory=dict)

    def live_of(self, user: User) -> list[VpnSession]:
        return [r for r in self.live.get(user.id, ()) if r.ended_at is None]


def _batch_sessions(
    db: Session, uids: Iterable[str], user_ids: Iterable[int]
) -> tuple[dict[str, VpnSession], dict[int, list[VpnSession]]]:
    """The sessions a batch names (by uid) and the live sessions of its users (by user id),
    in one statement (a batch has at most MAX_SESSION_BATCH records)."""
    wanted, users = set(uids), sorted(set(user_ids))
    cond: ColumnElement[bool] = VpnSession.uid.in_(sorted(wanted))
    if users:
        cond = cond | (VpnSession.user_id.in_(users) & VpnSession.ended_at.is_(None))
    stmt = select(VpnSession).where(cond).order_by(VpnSession.id)
    by_uid: dict[str, VpnSession] = {}
    live: dict[int, list[VpnSession]] = {}
    for row in db.scalars(stmt.execution_options(populate_existing=True)):
        if row.uid in wanted:
            by_uid[row.uid] = row
        if row.ended_at is None and row.user_id is not None:
            live.setdefault(row.user_id, []).append(row)
    return by_uid, live


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


def _wrong_address(
    db: Session, pod: Pod, user: User, body: SessionOpen, known: _Known | None = None
) -> str | None:
    """Why the pod's claimed tunnel address cannot be this session's, or None if it can.

    A gateway session must use the address the control plane leased to the user; a NAT
    session an address of its own pod's NAT pool. What a pod says is checked, not believed:
    gateway routes are built from these rows.
    """
    try:
        addr = ipaddress.IPv4Address(body.tunnel_ip)
    except ValueError:
        return f"tunnel_ip {body.tunnel_ip!r} is not an IPv4 address"
    if body.mode == "gateway":
        lease = db.scalar(select(GatewayLease).where(GatewayLease.user_id == user.id))
        if lease is None or lease.address != str(addr):
            have = lease.address if lease else "none"
            return f"tunnel_ip {addr} is not the gateway address leased to {user.name} ({have})"
        return None
    pool = known.pool if known is not None else pods.nat_pool_of(db, pod)
    if pool is None or addr not in ipaddress.IPv4Network(pool.cidr):
        where = pool.cidr if pool else "no NAT pool"
        return f"tunnel_ip {addr} is outside pod {pod.name}'s NAT pool ({where})"
    return None


def _drop_unheard(
    db: Session,
    journal: Journal,
    rows: Sequence[VpnSession],
    lease: dt.timedelta,
    reason: str = LEASE_EXPIRED,
    alive: dict[str, bool] | None = None,
) -> list[VpnSession]:
    """Close the sessions whose pod lost its lease (gone without a word); return the rest.

    The lease sweeper does the same every few seconds; doing it here too means a user whose
    pod died can connect elsewhere as soon as the lease has run out, not a sweep later.
    `alive`: pods already looked at in this transaction (a batch), by name; filled here.
    """
    if not rows:
        return []
    alive = {} if alive is None else alive
    names = {r.pod_name for r in rows}
    unknown = names - alive.keys()
    if unknown:
        now = utcnow()
        for p in db.scalars(select(Pod).where(Pod.name.in_(unknown))):
            alive[p.name] = pods.alive(p, lease, now)
        for name in unknown - alive.keys():
            alive[name] = False  # its row is gone: forgotten
    dead = {name for name in names if not alive[name]}
    for name in sorted(dead):
        pods.close_pod_sessions(
            db, journal, name, reason, [r.uid for r in rows if r.pod_name == name]
        )
    return [r for r in rows if r.pod_name not in dead]


def open_session(
    db: Session,
    journal: Journal,
    body: SessionOpen,
    lease: dt.timedelta,
    known: _Known | None = None,
) -> SessionVerdict:
    """Record a session (idempotent by uid) and say whether it may stay.

    Only the caller's own pod may open sessions on it, and the tunnel address must be one the
    control plane gave (see `_wrong_address`). Sessions already marked to end do not count
    toward the limit, nor do sessions on pods whose lease expired. The same device
    reconnecting (same public address) replaces its old sessions: OpenVPN may keep those
    until a ping timeout, and they must not lock the user out meanwhile; they are marked
    killed, and their pods close them. `known`: what a batch looked up for all its records.
    A refusal by Problem (4xx) comes before anything is written (see `apply_batch`).
    """
    if known is not None and known.pod.name == body.pod:
        pod = known.pod
        existing = known.sessions.get(body.uid)
    else:
        known = None
        pod = pods.own_pod(db, journal.who, body.pod)
        existing = db.scalar(select(VpnSession).where(VpnSession.uid == body.uid))
    if existing is not None:
        if existing.pod_name != body.pod:
            raise Problem(409, "Conflict", f"uid: session {body.uid!r} belongs to another pod")
        # Delivered again (at least once): the same verdict, unless the session was ended here
        # meanwhile (its pod's lease ran out while its agent was away): then it may not stay.
        ended = existing.ended_at is not None
        return SessionVerdict(
            uid=body.uid,
            session_id=existing.id,
            allowed=not ended,
            reason=f"session ended: {existing.end_reason}" if ended else None,
        )
    if known is not None:
        user = known.users.get(body.user)  # locked by the batch
    else:
        user = db.scalar(select(User).where(User.name == body.user).with_for_update())
    if user is None:
        raise not_found("user", body.user)
    live = known.live_of(user) if known is not None else _live(db, user)
    live = [r for r in live if r.kill_reason is None]
    staying = _drop_unheard(db, journal, live, lease, alive=known.alive if known else None)
    replaced = [r for r in staying if body.real_ip and r.real_ip == body.real_ip]
    allowed, reason = True, None
    wrong = _wrong_address(db, pod, user, body, known)
    if wrong is not None:
        allowed, reason = False, wrong
    elif not user.enabled:
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
    if known is not None:
        # A batch read its uids after locking their users, and a uid's open always locks its
        # user first: the same uid cannot be inserted meanwhile by another request.
        db.add(row)
        db.flush()
        known.sessions[row.uid] = row
        if allowed:
            known.live.setdefault(user.id, []).append(row)
    else:
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


def close_session(
    db: Session, journal: Journal, body: SessionClose, known: _Known | None = None
) -> bool:
    """Close a session with its pod's bytes and reason, killed or not; False if it was
    already closed or is unknown (closing twice is not an error). A refusal by Problem (403)
    comes before anything is written (see `apply_batch`)."""
    if known is not None:
        row = known.sessions.get(body.uid)
    else:
        row = db.scalar(select(VpnSession).where(VpnSession.uid == body.uid))
    if row is None:
        return False
    if row.pod_name != journal.who.pod:
        raise Problem(
            403,
            "Forbidden",
            f"session {body.uid!r} is on pod {row.pod_name!r}; pod {journal.who.pod!r} "
            "cannot close it",
        )
    if row.ended_at is not None:
        return False
    row.ended_at = max(body.ended_at, row.started_at)
    row.bytes_in = body.bytes_in
    row.bytes_out = body.bytes_out
    row.end_reason = body.reason
    db.flush()
    journal.delete(fleetstate.session_key(row))
    return True


def apply_batch(
    db: Session, journal: Journal, body: SessionBatch, lease: dt.timedelta
) -> list[SessionResult]:
    """Apply a pod's session records in order, each as its own endpoint would, in the
    caller's one transaction; the caller commits the journal once (one change-log append).

    A record its endpoint would refuse with a 4xx (an unknown user, another pod's uid) is
    answered with that status and detail, having written nothing, and the next record
    applied: one bad record does not hold up the rest, as with one request per record. Any
    other failure fails the whole batch, and nothing of it is kept.

    The users the batch touches are locked first, in one order (PostgreSQL): two pods'
    batches meeting on the same users then wait for each other instead of deadlocking.
    """
    pod = pods.own_pod(db, journal.who, body.pod)
    names = {r.body.user for r in body.records if isinstance(r, OpenRecord)}
    closing = [r.body.uid for r in body.records if not isinstance(r, OpenRecord)]
    ids: set[int] = set()
    for i in range(0, len(closing), 500):
        ids.update(
            uid
            for uid in db.scalars(
                select(VpnSession.user_id).where(VpnSession.uid.in_(closing[i : i + 500]))
            )
            if uid is not None  # the session of a user deleted since: nobody to lock
        )
    users: dict[str, User] = {}
    if names or ids:
        users = {
            u.name: u
            for u in db.scalars(
                select(User)
                .where(User.name.in_(sorted(names)) | User.id.in_(sorted(ids)))
                .order_by(User.id)
                .with_for_update()
                .execution_options(populate_existing=True)
            )
        }
    # Read after the lock: what another request of these users wrote meanwhile is seen.
    pool = pods.nat_pool_of(db, pod) if names else None
    by_uid, live = _batch_sessions(
        db, (r.body.uid for r in body.records), (u.id for u in users.values() if u.name in names)
    )
    known = _Known(pod, pool, users, by_uid, live)
    results: list[SessionResult] = []
    for rec in body.records:
        mark = journal.mark()
        try:
            if isinstance(rec, OpenRecord):
                verdict = open_session(db, journal, rec.body, lease, known)
                result = SessionResult(kind="open", uid=rec.body.uid, status=200, verdict=verdict)
            else:
                closed = close_session(db, journal, rec.body, known)
                result = SessionResult(kind="close", uid=rec.body.uid, status=200, closed=closed)
        except Problem as exc:
            # open_session and close_session refuse a record before they write anything for
            # it, so a refused record needs no savepoint of its own (two round trips per
            # record). Should one ever refuse after writing, the batch fails whole (500)
            # instead of keeping half a record: nothing of it is kept, the agent sends it again.
            if exc.status >= 500:
                raise
            if journal.mark() != mark or db.new or db.dirty or db.deleted:
                raise RuntimeError(
                    f"session record {rec.body.uid!r} was refused after it had written; "
                    "the batch is not kept"
                ) from exc
            result = SessionResult(
                kind=rec.kind, uid=rec.body.uid, status=exc.status, detail=exc.detail
            )
        results.append(result)
    return results


def report_sessions(db: Session, journal: Journal, body: SessionReport) -> tuple[int, list[str]]:
    """Level-triggered repair, both ways: close this pod's sessions that the pod no longer
    has (returns how many), and name the sessions the pod still has that are ended here
    (its lease ran out while it was cut off, or it was refused): the pod disconnects them."""
    pods.own_pod(db, journal.who, body.pod)
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
    ended: list[str] = []
    uids = sorted(live)
    for i in range(0, len(uids), 1000):
        ended += db.scalars(
            select(VpnSession.uid).where(
                VpnSession.uid.in_(uids[i : i + 1000]),
                VpnSession.pod_name == body.pod,
                VpnSession.ended_at.is_not(None),
            )
        ).all()
    return len(stale), sorted(ended)


def kill_user_sessions(
    db: Session,
    journal: Journal,
    user: User,
    lease: dt.timedelta,
    reason: str = ADMIN_KILL,
) -> int:
    """Mark every live session of `user` to end; returns how many there are.

    Sessions on a pod that lost its lease (or was revoked) are closed at once: no pod will
    close them.
    """
    live = _live(db, user)
    _drop_unheard(db, journal, live, lease, reason)
    _mark_killed(journal, [r for r in live if r.ended_at is None], reason)
    db.flush()
    journal.audit("session.kill", user.name, None, {"sessions": [s.uid for s in live]})
    return len(live)
