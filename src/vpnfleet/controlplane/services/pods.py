"""Pods: registration (the pod's server certificate and pools)."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

from sqlalchemy import select
from sqlalchemy.orm import Session

from vpnfleet.controlplane import certs, fleetstate, pki
from vpnfleet.controlplane.errors import conflict
from vpnfleet.controlplane.models import Certificate, Pod, Pool, utcnow
from vpnfleet.controlplane.services.journal import Journal
from vpnfleet.wire import RegisterRequest

CERT_RENEW_BEFORE = dt.timedelta(days=30)


@dataclass(frozen=True)
class Registration:
    """What a registered pod runs with."""

    pod: Pod
    cert: Certificate
    nat: Pool
    gateway: Pool | None


def _pod_cert(db: Session, sealer: pki.Sealer, pod: Pod) -> Certificate:
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
    return cert or certs.issue(db, sealer, "server", pod.name, pod_id=pod.id)


def register_pod(
    db: Session, journal: Journal, sealer: pki.Sealer, body: RegisterRequest
) -> Registration:
    """Record (or refresh) a pod; it is not ready until its heartbeat says so."""
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
    cert = _pod_cert(db, sealer, pod)
    journal.upsert(fleetstate.pod_state(pod))
    journal.audit(
        "pod.register",
        pod.name,
        None,
        {"pod": pod.name, "pod_ip": pod.pod_ip, "serial": cert.serial},
    )
    return Registration(pod=pod, cert=cert, nat=nat, gateway=gateway)
