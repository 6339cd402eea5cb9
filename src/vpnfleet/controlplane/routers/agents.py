"""Endpoints the pod agents call: register, snapshot, sessions, heartbeat.

Agents decide CONNECTs locally from a snapshot plus the watch stream (see docs/agent.md);
the control plane stays authoritative for fleet-wide limits when a session is opened.
"""

from __future__ import annotations

import datetime as dt

from fastapi import APIRouter
from sqlalchemy import func, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from vpnfleet.controlplane import certs, changelog, flowstore
from vpnfleet.controlplane.changelog import ChangeSpec
from vpnfleet.controlplane.errors import Problem, conflict, not_found
from vpnfleet.controlplane.models import (
    Certificate,
    DeniedAttempt,
    GatewayLease,
    Group,
    Membership,
    Pod,
    Pool,
    Rule,
    User,
    VpnSession,
    utcnow,
)
from vpnfleet.controlplane.state import DB, Agent, State
from vpnfleet.wire import (
    WIRE_VERSION,
    Bootstrap,
    DeniedBatch,
    FlowBatch,
    GroupState,
    Heartbeat,
    LiveSession,
    PodState,
    PoolState,
    RegisterRequest,
    RuleState,
    SessionClose,
    SessionOpen,
    SessionReport,
    SessionVerdict,
    Snapshot,
    UserState,
)

router = APIRouter(prefix="/api/v1/agent", tags=["agent"])

CERT_RENEW_BEFORE = dt.timedelta(days=30)


def _pod_cert(db: Session, state: State, pod: Pod) -> Certificate:
    """The pod's server certificate: reused while valid for 30 more days, else reissued."""
    soon = utcnow() + CERT_RENEW_BEFORE
    cert = db.scalar(
        select(Certificate)
        .where(
            Certificate.pod_id == pod.id,
            Certificate.kind == "server",
            Certificate.revoked_at.is_(None),
            Certificate.not_after > soon,
        )
        .order_by(Certificate.id.desc())
        .limit(1)
    )
    return cert or certs.issue(db, state.sealer, "server", pod.name, pod_id=pod.id)


@router.post("/register", response_model=Bootstrap)
def register(body: RegisterRequest, db: DB, who: Agent, state: State) -> Bootstrap:
    if body.wire_version != WIRE_VERSION:
        raise Problem(
            400,
            "Unsupported agent",
            f"agent speaks wire version {body.wire_version}, control plane {WIRE_VERSION}: "
            "upgrade the older side",
        )
    pod = db.scalar(select(Pod).where(Pod.name == body.name))
    if pod is None:
        pod = Pod(name=body.name)
        db.add(pod)
    pod.template = body.template
    # Only what the agent knows this time: an omitted field keeps its last value.
    if body.public_endpoint is not None:
        pod.public_endpoint = body.public_endpoint
    if body.pod_ip is not None:
        pod.pod_ip = body.pod_ip
    pod.registered_at = utcnow()
    pod.ready = False
    db.flush()
    nat = db.scalar(
        select(Pool).where(Pool.kind == "nat", Pool.name == body.template)
    ) or db.scalar(select(Pool).where(Pool.kind == "nat").order_by(Pool.id).limit(1))
    if nat is None:
        raise conflict("no NAT pool is configured: run 'vpnfleet pool set default --cidr ...'")
    gateway = db.scalar(select(Pool).where(Pool.kind == "gateway").order_by(Pool.id).limit(1))
    cert = _pod_cert(db, state, pod)
    revision = changelog.record(
        db,
        who,
        "pod.register",
        pod.name,
        None,
        {"pod": pod.name, "pod_ip": pod.pod_ip, "serial": cert.serial},
        [ChangeSpec("pod", "upsert", pod.id, {"name": pod.name, "pod_ip": pod.pod_ip})],
    )
    return Bootstrap(
        pod_id=pod.id,
        name=pod.name,
        ca_pem=certs.ca_cert_pem(db),
        cert_pem=cert.cert_pem,
        key_pem=state.sealer.unseal(cert.key_sealed),
        crl_pem=certs.crl_pem(db, state.sealer),
        tls_crypt_key=certs.tls_crypt_key(db, state.sealer),
        nat_pool=nat.cidr,
        gateway_pool=gateway.cidr if gateway else None,
        revision=revision,
    )


def build_snapshot(db: Session) -> Snapshot:
    """Everything an agent decides from, read in one transaction."""
    revision = changelog.current_revision(db)
    groups_of: dict[int, list[str]] = {}
    for user_id, gname in db.execute(
        select(Membership.user_id, Group.name).join(Group).order_by(Group.name)
    ):
        groups_of.setdefault(user_id, []).append(gname)
    leases: dict[int, str] = {
        uid: addr for uid, addr in db.execute(select(GatewayLease.user_id, GatewayLease.address))
    }
    serials: dict[int | None, str] = {
        uid: serial
        for uid, serial in db.execute(
            select(Certificate.user_id, func.max(Certificate.serial))
            .where(Certificate.kind == "client", Certificate.revoked_at.is_(None))
            .group_by(Certificate.user_id)
        )
    }
    # max(serial) above is only a tie-break: a user has one valid client cert at a time.
    users = [
        UserState(
            id=u.id,
            name=u.name,
            enabled=u.enabled,
            mode=u.mode,
            max_sessions=u.max_sessions,
            groups=groups_of.get(u.id, []),
            gateway_address=leases.get(u.id),
            cert_serial=serials.get(u.id),
        )
        for u in db.scalars(select(User).order_by(User.id))
    ]
    return Snapshot(
        revision=revision,
        users=users,
        groups=[GroupState(id=g.id, name=g.name) for g in db.scalars(select(Group))],
        rules=[
            RuleState(
                id=r.id,
                group_id=r.group_id,
                destination=r.destination,
                proto=r.proto,
                ports=r.ports,
            )
            for r in db.scalars(select(Rule).order_by(Rule.id))
        ],
        pools=[
            PoolState(id=p.id, name=p.name, kind=p.kind, cidr=p.cidr)
            for p in db.scalars(select(Pool).order_by(Pool.id))
        ],
        sessions=[
            LiveSession(
                uid=s.uid,
                user=s.user_name,
                pod=s.pod_name,
                tunnel_ip=s.tunnel_ip,
                mode=s.mode,
                real_ip=s.real_ip,
            )
            for s in db.scalars(select(VpnSession).where(VpnSession.ended_at.is_(None)))
        ],
        pods=[PodState(id=p.id, name=p.name, pod_ip=p.pod_ip) for p in db.scalars(select(Pod))],
    )


@router.get("/snapshot", response_model=Snapshot)
def snapshot(db: DB, _who: Agent) -> Snapshot:
    return build_snapshot(db)


def _session_change(s: VpnSession, op: str) -> ChangeSpec:
    return ChangeSpec(
        "session",
        op,
        s.id,
        {
            "uid": s.uid,
            "user": s.user_name,
            "pod": s.pod_name,
            "tunnel_ip": s.tunnel_ip,
            "mode": s.mode,
            "real_ip": s.real_ip,
        },
    )


@router.post("/sessions/open", response_model=SessionVerdict)
def open_session(body: SessionOpen, db: DB, _who: Agent) -> SessionVerdict:
    """Record a session (idempotent by uid) and say whether it may stay."""
    existing = db.scalar(select(VpnSession).where(VpnSession.uid == body.uid))
    if existing is not None:
        return SessionVerdict(uid=body.uid, session_id=existing.id, allowed=True)
    user = db.scalar(select(User).where(User.name == body.user).with_for_update())
    if user is None:
        raise not_found("user", body.user)
    if body.started_at.tzinfo is None:
        raise Problem(422, "Invalid request", "started_at: needs a time zone")
    open_rows = list(
        db.scalars(
            select(VpnSession).where(VpnSession.user_id == user.id, VpnSession.ended_at.is_(None))
        )
    )
    # The same device reconnecting (same public address) replaces its old session: OpenVPN
    # may keep that one until a ping timeout, and it must not lock the user out meanwhile.
    replaced = [r for r in open_rows if body.real_ip and r.real_ip == body.real_ip]
    allowed, reason = True, None
    if not user.enabled:
        allowed, reason = False, "user is disabled"
    elif len(open_rows) - len(replaced) >= user.max_sessions:
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
        specs = [_session_change(row, "upsert")]
        if replaced:
            for old in replaced:
                old.ended_at = max(body.started_at, old.started_at)
                old.end_reason = "replaced by a new connection from the same address"
                specs.append(_session_change(old, "delete"))
            specs.append(
                ChangeSpec(
                    "kill",
                    "upsert",
                    user.id,
                    {"user": user.name, "sessions": [r.uid for r in replaced]},
                )
            )
        db.flush()
        changelog.append(db, specs)
    return SessionVerdict(uid=body.uid, session_id=row.id, allowed=allowed, reason=reason)


@router.post("/sessions/close")
def close_session(body: SessionClose, db: DB, _who: Agent) -> dict[str, bool]:
    """Close a session (idempotent: closing twice, or an unknown uid, is not an error)."""
    if body.ended_at.tzinfo is None:
        raise Problem(422, "Invalid request", "ended_at: needs a time zone")
    row = db.scalar(select(VpnSession).where(VpnSession.uid == body.uid))
    if row is None or row.ended_at is not None:
        return {"closed": False}
    row.ended_at = max(body.ended_at, row.started_at)
    row.bytes_in = body.bytes_in
    row.bytes_out = body.bytes_out
    row.end_reason = body.reason
    db.flush()
    changelog.append(db, [_session_change(row, "delete")])
    return {"closed": True}


@router.post("/sessions/report")
def report_sessions(body: SessionReport, db: DB, _who: Agent) -> dict[str, int]:
    """Level-triggered repair: close this pod's sessions that the pod no longer has."""
    live = set(body.live)
    stale = [
        s
        for s in db.scalars(
            select(VpnSession).where(VpnSession.pod_name == body.pod, VpnSession.ended_at.is_(None))
        )
        if s.uid not in live
    ]
    now = utcnow()
    for s in stale:
        s.ended_at = max(now, s.started_at)
        s.end_reason = "not live on pod (reconciled)"
    db.flush()
    if stale:
        changelog.append(db, [_session_change(s, "delete") for s in stale])
    return {"closed": len(stale)}


@router.post("/heartbeat")
def heartbeat(body: Heartbeat, db: DB, _who: Agent, state: State) -> dict[str, int]:
    result = db.execute(
        update(Pod)
        .where(Pod.name == body.name)
        .values(
            last_heartbeat=utcnow(),
            applied_revision=body.applied_revision,
            ready=body.ready,
            status=body.status,
        )
    )
    if not getattr(result, "rowcount", 0):
        raise not_found("pod", body.name)
    return {"revision": state.hub.head}


@router.post("/denied")
def record_denied(body: DeniedBatch, db: DB, _who: Agent) -> dict[str, int]:
    """Store denied-attempt records (aggregated and rate-limited by the agent)."""
    for ev in body.events:
        if ev.first_at.tzinfo is None or ev.last_at.tzinfo is None:
            raise Problem(422, "Invalid request", "first_at/last_at: need a time zone")
    db.add_all(
        DeniedAttempt(
            pod_name=body.pod,
            user_name=ev.user,
            session_uid=ev.session_uid,
            src=ev.src,
            dst=ev.dst,
            proto=ev.proto,
            dport=ev.dport,
            first_at=ev.first_at,
            last_at=ev.last_at,
            count=ev.count,
            overflow=ev.event == "denied_overflow",
        )
        for ev in body.events
    )
    return {"stored": len(body.events)}


@router.post("/flows")
def record_flows(body: FlowBatch, db: DB, _who: Agent) -> dict[str, int]:
    """Store NAT flow records: idempotent by flow_id (see controlplane/flowstore.py)."""
    return flowstore.store(db, body)
