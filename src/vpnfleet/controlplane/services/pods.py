"""Pods: enrollment (a credential of their own), registration, revocation and leases.

A pod enrolls once with the enrollment token (role "agent", the Secret every pod starts with)
and receives a credential bound to its name (role "pod"). Only that credential may register
the pod (and so receive its server key) or speak for it. The enrollment token cannot take a
name a live pod holds: a name is free again only when its pod's lease has expired (no
heartbeat for the lease time) or an operator ran `vpnfleet pod forget`. A revoked pod's name
stays refused until then, so a stolen pod cannot simply enroll itself again.
"""

from __future__ import annotations

import datetime as dt
import secrets
from collections.abc import Sequence
from dataclasses import dataclass

from sqlalchemy import select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from vpnfleet.controlplane import auth, certs, fleetstate, pki
from vpnfleet.controlplane.errors import Problem, conflict, not_found
from vpnfleet.controlplane.models import AdminToken, Certificate, Pod, Pool, VpnSession, utcnow
from vpnfleet.controlplane.services.journal import Journal
from vpnfleet.wire import SERVER_CN_PREFIX, Enrollment, EnrollRequest, RegisterRequest

CERT_RENEW_BEFORE = dt.timedelta(days=30)
REVOKED_END = "pod revoked by an administrator"


@dataclass(frozen=True)
class Registration:
    """What a registered pod runs with."""

    pod: Pod
    cert: Certificate
    nat: Pool
    gateway: Pool | None


def server_cn(pod_name: str) -> str:
    """The CN of a pod's server certificate (what client profiles check)."""
    return SERVER_CN_PREFIX + pod_name


def last_seen(pod: Pod) -> dt.datetime:
    return max(pod.last_heartbeat or pod.registered_at, pod.registered_at)


def alive(pod: Pod, lease: dt.timedelta, now: dt.datetime | None = None) -> bool:
    """Does the pod hold its lease (heard from within `lease`, not revoked)?"""
    return pod.revoked_at is None and (now or utcnow()) - last_seen(pod) <= lease


def _pod_cert(db: Session, sealer: pki.Sealer, pod: Pod) -> Certificate:
    """The pod's server certificate: reused while valid for 30 more days, else reissued."""
    soon = utcnow() + CERT_RENEW_BEFORE
    cert = db.scalar(
        select(Certificate)
        .where(
            Certificate.pod_id == pod.id,
            Certificate.kind == "server",
            Certificate.common_name == server_cn(pod.name),
            Certificate.revoked_at.is_(None),
            Certificate.not_after > soon,
        )
        .order_by(Certificate.id.desc())
        .limit(1)
    )
    return cert or certs.issue(db, sealer, "server", server_cn(pod.name), pod_id=pod.id)


def _revoke_credentials(db: Session, pod_name: str) -> int:
    result = db.execute(
        update(AdminToken)
        .where(AdminToken.pod_name == pod_name, AdminToken.revoked_at.is_(None))
        .values(revoked_at=utcnow())
    )
    return int(getattr(result, "rowcount", 0) or 0)


def enroll(db: Session, journal: Journal, body: EnrollRequest, lease: dt.timedelta) -> Enrollment:
    """Give the pod `body.name` a credential of its own, if no live pod holds that name."""
    pod = db.scalar(select(Pod).where(Pod.name == body.name).with_for_update())
    now = utcnow()
    if pod is not None and pod.revoked_at is not None:
        raise Problem(
            403,
            "Forbidden",
            f"pod {pod.name!r} was revoked; its name may not enroll again until an "
            f"administrator runs 'vpnfleet pod forget {pod.name}'",
        )
    if pod is not None and alive(pod, lease, now):
        if _answer_lost(db, pod, journal.who):
            # The same enrollment token asks again for a name whose credential was never
            # used: the answer to the last enrollment never reached its pod (a timeout, a
            # reset connection). That credential is revoked and a new one given, instead of
            # refusing the pod its own name until the lease ends.
            _revoke_credentials(db, pod.name)
            pod.registered_at = now
            return _new_credential(db, journal, pod, again=True)
        left = int((lease - (now - last_seen(pod))).total_seconds()) + 1
        raise conflict(
            f"pod {pod.name!r} is enrolled and alive (heard from within the "
            f"{int(lease.total_seconds())} s lease): another pod cannot take its name. If it is "
            f"gone, its lease ends in {left} s; 'vpnfleet pod revoke {pod.name}' cuts it off now"
        )
    if pod is None:
        pod = Pod(name=body.name, registered_at=now, ready=False)
        try:
            with db.begin_nested():
                db.add(pod)
                db.flush()
        except IntegrityError:
            raise conflict(f"pod {body.name!r} is enrolling at this moment") from None
    else:
        # The name's lease ended: whoever had it loses its credential, and the key it was
        # given is revoked, so the new holder never runs with a key another process has.
        _revoke_credentials(db, pod.name)
        revoked = certs.revoke_pod_certs(db, pod.id, "pod re-enrolled")
        if revoked:
            journal.upsert(fleetstate.crl_update(revoked))
        pod.registered_at = now
        pod.ready = False
    return _new_credential(db, journal, pod)


def _answer_lost(db: Session, pod: Pod, who: auth.Principal) -> bool:
    """Was the answer to this pod's last enrollment lost? Its live credentials (at least
    one) were all made for the caller, the same enrollment token, and none was ever used."""
    live = db.scalars(
        select(AdminToken).where(AdminToken.pod_name == pod.name, AdminToken.revoked_at.is_(None))
    ).all()
    return bool(live) and all(
        t.created_by == who.name and t.last_used_at is None and t.role == "pod" for t in live
    )


def _new_credential(db: Session, journal: Journal, pod: Pod, again: bool = False) -> Enrollment:
    secret = auth.new_token()
    token = AdminToken(
        name=f"{pod.name}@{secrets.token_hex(3)}",
        role="pod",
        pod_name=pod.name,
        token_hash=auth.hash_token(secret),
        prefix=auth.display_prefix(secret),
        created_by=journal.who.name,
    )
    db.add(token)
    db.flush()
    after: dict[str, object] = {"pod": pod.name, "credential": token.name}
    if again:
        after["replaces_unused_credential"] = True
    journal.audit("pod.enroll", pod.name, None, after)
    return Enrollment(name=pod.name, token=secret)


def _nat_pool(db: Session, template: str) -> Pool | None:
    return db.scalar(select(Pool).where(Pool.kind == "nat", Pool.name == template)) or db.scalar(
        select(Pool).where(Pool.kind == "nat").order_by(Pool.id).limit(1)
    )


def nat_pool_of(db: Session, pod: Pod) -> Pool | None:
    """The NAT pool a pod hands its clients addresses from (chosen by its template)."""
    return _nat_pool(db, pod.template)


def register_pod(
    db: Session,
    journal: Journal,
    sealer: pki.Sealer,
    body: RegisterRequest,
    lease: dt.timedelta,
) -> Registration:
    """Refresh the caller's own pod; it is not ready until its heartbeat says so.

    The pod's row is locked and the caller's credential read again under that lock: an
    enrollment that replaced a never-used credential (`_answer_lost`) holds the same lock, so
    a registration that got past the token check just before it is refused, and never gets
    the pod's key with a credential revoked meanwhile."""
    pod = own_pod(db, journal.who, body.name, lock=True)
    revoked = db.scalar(select(AdminToken.revoked_at).where(AdminToken.id == journal.who.token_id))
    if revoked is not None:
        raise Problem(401, "Unauthorized", "the token is unknown or revoked")
    if body.pod_ip is not None and body.pod_ip != pod.pod_ip:
        now = utcnow()
        holders = db.scalars(select(Pod).where(Pod.pod_ip == body.pod_ip, Pod.id != pod.id)).all()
        taken = [p.name for p in holders if alive(p, lease, now)]
        if taken:
            raise conflict(
                f"pod_ip {body.pod_ip} belongs to live pod {taken[0]!r}: two pods cannot share "
                "an address (gateway routes point at it)"
            )
    pod.template = body.template
    # Only what the agent knows this time: an omitted field keeps its last value.
    if body.public_endpoint is not None:
        pod.public_endpoint = body.public_endpoint
    if body.pod_ip is not None:
        pod.pod_ip = body.pod_ip
    pod.registered_at = utcnow()
    pod.lease_expired_at = None
    pod.ready = False
    db.flush()
    nat = _nat_pool(db, body.template)
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


def own_pod(db: Session, who: auth.Principal, name: str, *, lock: bool = False) -> Pod:
    """The caller's pod, if `name` is it; a pod credential never speaks for another pod."""
    if who.pod != name:
        raise Problem(
            403,
            "Forbidden",
            f"this credential belongs to pod {who.pod!r}; it cannot act as pod {name!r}",
        )
    stmt = select(Pod).where(Pod.name == name)
    pod = db.scalar(stmt.with_for_update() if lock else stmt)
    if pod is None:  # its row was forgotten while the credential was in use
        raise not_found("pod", name)
    return pod


def close_pod_sessions(
    db: Session, journal: Journal, pod_name: str, reason: str, uids: Sequence[str] | None = None
) -> int:
    """End the live sessions of a pod that will not end them itself (gone or revoked)."""
    stmt = select(VpnSession).where(VpnSession.pod_name == pod_name, VpnSession.ended_at.is_(None))
    if uids is not None:
        stmt = stmt.where(VpnSession.uid.in_(list(uids)))
    rows = db.scalars(stmt.order_by(VpnSession.id)).all()
    now = utcnow()
    for row in rows:
        row.ended_at = max(now, row.started_at)
        row.end_reason = row.kill_reason or reason
        journal.delete(fleetstate.session_key(row))
    db.flush()
    return len(rows)


def revoke_pod(db: Session, journal: Journal, name: str) -> dict[str, int]:
    """Cut a pod off: its credentials and certificate revoked, its sessions closed, and its
    name refused at enrollment until `forget`."""
    pod = db.scalar(select(Pod).where(Pod.name == name).with_for_update())
    if pod is None:
        raise not_found("pod", name)
    if pod.revoked_at is not None:
        raise conflict(f"pod {name!r} is already revoked")
    pod.revoked_at = utcnow()
    pod.ready = False
    credentials = _revoke_credentials(db, name)
    revoked = certs.revoke_pod_certs(db, pod.id, "pod revoked")
    if revoked:
        journal.upsert(fleetstate.crl_update(revoked))
    closed = close_pod_sessions(db, journal, name, REVOKED_END)
    journal.audit(
        "pod.revoke",
        name,
        None,
        {
            "pod": name,
            "credentials": credentials,
            "serials": [c.serial for c in revoked],
            "sessions_closed": closed,
        },
    )
    return {"credentials": credentials, "certificates": len(revoked), "sessions_closed": closed}


def forget_pod(db: Session, journal: Journal, name: str, lease: dt.timedelta) -> None:
    """Remove a pod that is gone (revoked, or its lease expired) so its name is free."""
    pod = db.scalar(select(Pod).where(Pod.name == name).with_for_update())
    if pod is None:
        raise not_found("pod", name)
    if alive(pod, lease):
        raise conflict(
            f"pod {name!r} is alive: revoke it first ('vpnfleet pod revoke {name}') or wait "
            "for its lease to expire"
        )
    close_pod_sessions(db, journal, name, "pod forgotten by an administrator")
    _revoke_credentials(db, name)
    revoked = certs.revoke_pod_certs(db, pod.id, "pod forgotten")
    if revoked:
        journal.upsert(fleetstate.crl_update(revoked))
    db.delete(pod)
    db.flush()
    journal.audit("pod.forget", name, {"pod": name}, None)
