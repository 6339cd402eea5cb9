"""Endpoints the pod agents call: register, snapshot, sessions, heartbeat.

Agents decide CONNECTs locally from a snapshot plus the watch stream (see docs/operations.md);
the control plane stays authoritative for fleet-wide limits when a session is opened.
"""

from __future__ import annotations

from fastapi import APIRouter
from sqlalchemy import update

from vpnfleet.controlplane import certs, fleetstate, flowstore
from vpnfleet.controlplane.errors import Problem, not_found
from vpnfleet.controlplane.models import DeniedAttempt, Pod, utcnow
from vpnfleet.controlplane.services import pods, sessions
from vpnfleet.controlplane.services.journal import Journal
from vpnfleet.controlplane.state import DB, Agent, State
from vpnfleet.wire import (
    WIRE_VERSION,
    Bootstrap,
    DeniedBatch,
    FlowBatch,
    Heartbeat,
    RegisterRequest,
    SessionClose,
    SessionOpen,
    SessionReport,
    SessionVerdict,
    Snapshot,
)

router = APIRouter(prefix="/api/v1/agent", tags=["agent"])


@router.post("/register", response_model=Bootstrap)
def register(body: RegisterRequest, db: DB, who: Agent, state: State) -> Bootstrap:
    if body.wire_version != WIRE_VERSION:
        raise Problem(
            400,
            "Unsupported agent",
            f"agent speaks wire version {body.wire_version}, control plane {WIRE_VERSION}: "
            "upgrade the older side",
        )
    journal = Journal(db, who)
    reg = pods.register_pod(db, journal, state.sealer, body)
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
    )


@router.get("/snapshot", response_model=Snapshot)
def snapshot(db: DB, _who: Agent) -> Snapshot:
    return fleetstate.build_snapshot(db)


@router.post("/sessions/open", response_model=SessionVerdict)
def open_session(body: SessionOpen, db: DB, who: Agent) -> SessionVerdict:
    """Record a session (idempotent by uid) and say whether it may stay."""
    journal = Journal(db, who)
    verdict = sessions.open_session(db, journal, body)
    journal.commit()
    return verdict


@router.post("/sessions/close")
def close_session(body: SessionClose, db: DB, who: Agent) -> dict[str, bool]:
    """Close a session (idempotent: closing twice, or an unknown uid, is not an error)."""
    journal = Journal(db, who)
    closed = sessions.close_session(db, journal, body)
    journal.commit()
    return {"closed": closed}


@router.post("/sessions/report")
def report_sessions(body: SessionReport, db: DB, who: Agent) -> dict[str, int]:
    """Level-triggered repair: close this pod's sessions that the pod no longer has."""
    journal = Journal(db, who)
    closed = sessions.report_sessions(db, journal, body)
    journal.commit()
    return {"closed": closed}


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
