"""Endpoints the pod agents call: enroll, register, snapshot, sessions, heartbeat.

Agents decide CONNECTs locally from a snapshot plus the watch stream (see docs/operations.md);
the control plane stays authoritative for fleet-wide limits when a session is opened. Every
endpoint but `enroll` takes a pod's own credential and only lets it speak for its own pod
(services/pods.py); what it says about sessions is checked (services/sessions.py).
"""

from __future__ import annotations

from fastapi import APIRouter, Request, Response
from sqlalchemy.orm import Session

from vpnfleet.controlplane import certs, flowstore
from vpnfleet.controlplane.auth import Principal
from vpnfleet.controlplane.errors import Problem
from vpnfleet.controlplane.models import DeniedAttempt, utcnow
from vpnfleet.controlplane.podleases import lifespan as leases_lifespan
from vpnfleet.controlplane.routing import WriteThroughRoute
from vpnfleet.controlplane.schemas import SSO_SESSION_SECONDS
from vpnfleet.controlplane.services import idp as idpsvc
from vpnfleet.controlplane.services import pods, sessions
from vpnfleet.controlplane.services.journal import Journal
from vpnfleet.controlplane.state import (
    DB,
    Enroller,
    PodCaller,
    PodCredentials,
    SnapshotReader,
    State,
    pod_transaction,
)
from vpnfleet.wire import (
    WIRE_VERSION,
    Bootstrap,
    DeniedBatch,
    Enrollment,
    EnrollRequest,
    FlowBatch,
    Heartbeat,
    RegisterRequest,
    SessionBatch,
    SessionBatchResult,
    SessionClose,
    SessionOpen,
    SessionReport,
    SessionVerdict,
    Snapshot,
)

router = APIRouter(
    route_class=WriteThroughRoute, prefix="/api/v1/agent", tags=["agent"], lifespan=leases_lifespan
)


def _check_version(version: int) -> None:
    if version != WIRE_VERSION:
        raise Problem(
            400,
            "Unsupported agent",
            f"agent speaks wire version {version}, control plane {WIRE_VERSION}: "
            "upgrade the older side",
        )


@router.post("/enroll", response_model=Enrollment, status_code=201)
def enroll(body: EnrollRequest, db: DB, who: Enroller, state: State) -> Enrollment:
    """Exchange the enrollment token for a credential bound to one pod name (shown once)."""
    _check_version(body.wire_version)
    journal = Journal(db, who)
    out = pods.enroll(db, journal, body, state.settings.pod_lease)
    journal.commit()
    return out


@router.post("/register", response_model=Bootstrap)
def register(body: RegisterRequest, db: DB, who: PodCaller, state: State) -> Bootstrap:
    _check_version(body.wire_version)
    journal = Journal(db, who)
    reg = pods.register_pod(db, journal, state.sealer, body, state.settings.pod_lease)
    revision = journal.commit()
    return Bootstrap(
        pod_id=reg.pod.id,
        name=reg.pod.name,
        ca_pem=certs.ca_cert_pem(db),
        cert_pem=reg.cert.cert_pem,
        key_pem=state.sealer.unseal(reg.cert.key_sealed),
        crl_pem=certs.crl_pem(db, state.sealer),
        tls_crypt_key=certs.tls_crypt_key(db, state.sealer),
        nat_pool=reg.nat.cidr,
        gateway_pool=reg.gateway.cidr if reg.gateway else None,
        revision=revision,
        auth_token_key=certs.auth_token_key(db, state.sealer),
        sso_session_seconds=_sso_session_seconds(db),
    )


def _sso_session_seconds(db: DB) -> int:
    row = idpsvc.get_config(db)
    return SSO_SESSION_SECONDS if row is None else idpsvc.settings_of(row).session_lifetime_seconds


@router.get("/snapshot", response_model=Snapshot)
async def snapshot(request: Request, state: State, _who: SnapshotReader) -> Response:
    """The fleet view an agent decides from, at its `revision` (the watch stream from that
    revision brings what came after). Requests that come while one is being built share the
    next build (controlplane/snapshotcache.py), and it is gzipped once for clients that
    accept gzip."""
    body = await state.snapshots.get()
    if _accepts_gzip(request.headers.get("accept-encoding", "")):
        return Response(
            body.gzipped,
            media_type="application/json",
            headers={"Content-Encoding": "gzip", "Vary": "Accept-Encoding"},
        )
    return Response(body.json, media_type="application/json", headers={"Vary": "Accept-Encoding"})


def _accepts_gzip(header: str) -> bool:
    """Does an Accept-Encoding header name gzip (not with q=0)? A `*` is not taken for it."""
    for item in header.split(","):
        coding, *params = item.split(";")
        if coding.strip().lower() not in ("gzip", "x-gzip"):
            continue
        q = "1"
        for param in params:
            name, _, value = param.partition("=")
            if name.strip().lower() == "q":
                q = value.strip()
        try:
            return float(q) > 0
        except ValueError:
            return False
    return False


@router.post("/sessions/open", response_model=SessionVerdict)
def open_session(body: SessionOpen, db: DB, who: PodCaller, state: State) -> SessionVerdict:
    """Record a session (idempotent by uid) and say whether it may stay."""
    journal = Journal(db, who)
    verdict = sessions.open_session(db, journal, body, state.settings.pod_lease)
    journal.commit()
    return verdict


@router.post("/sessions/close")
def close_session(body: SessionClose, db: DB, who: PodCaller) -> dict[str, bool]:
    """Close one of the caller's sessions (idempotent: twice, or an unknown uid, is fine)."""
    journal = Journal(db, who)
    closed = sessions.close_session(db, journal, body)
    journal.commit()
    return {"closed": closed}


@router.post("/sessions/batch", response_model=SessionBatchResult)
async def session_batch(
    body: SessionBatch, creds: PodCredentials, state: State
) -> SessionBatchResult:
    """Apply a pod's open and close records in order, in one transaction with one change-log
    append; each record's result is what its own endpoint would answer (a record refused
    with a 4xx changes nothing, the others still apply). A malformed batch, too many
    records or another pod's batch is refused whole, and nothing of it is written."""

    def work(db: Session, who: Principal) -> SessionBatchResult:
        journal = Journal(db, who)
        results = sessions.apply_batch(db, journal, body, state.settings.pod_lease)
        journal.commit()
        return SessionBatchResult(results=results)

    return await pod_transaction(state, creds, work)


@router.post("/sessions/report")
async def report_sessions(
    body: SessionReport, creds: PodCredentials, state: State
) -> dict[str, object]:
    """Level-triggered repair: close this pod's sessions that the pod no longer has, and
    name those it still has that ended here (`ended`: the pod disconnects them)."""

    def work(db: Session, who: Principal) -> dict[str, object]:
        journal = Journal(db, who)
        closed, ended = sessions.report_sessions(db, journal, body)
        journal.commit()
        return {"closed": closed, "ended": ended}

    return await pod_transaction(state, creds, work)


@router.post("/heartbeat")
async def heartbeat(body: Heartbeat, creds: PodCredentials, state: State) -> dict[str, int]:
    def work(db: Session, who: Principal) -> None:
        pod = pods.own_pod(db, who, body.name, lock=True)
        pod.last_heartbeat = utcnow()
        pod.applied_revision = body.applied_revision
        pod.ready = body.ready
        pod.status = body.status
        pod.lease_expired_at = None

    await pod_transaction(state, creds, work)
    return {"revision": state.hub.head}


@router.post("/denied")
def record_denied(body: DeniedBatch, db: DB, who: PodCaller) -> dict[str, int]:
    """Store denied-attempt records (aggregated and rate-limited by the agent)."""
    pods.own_pod(db, who, body.pod)
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
async def record_flows(body: FlowBatch, creds: PodCredentials, state: State) -> dict[str, int]:
    """Store NAT flow records: idempotent by flow_id (see controlplane/flowstore.py)."""

    def work(db: Session, who: Principal) -> dict[str, int]:
        pods.own_pod(db, who, body.pod)
        return flowstore.store(db, body)

    return await pod_transaction(state, creds, work)
