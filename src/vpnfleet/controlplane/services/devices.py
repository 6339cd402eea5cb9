"""A user's own devices: each one its own client certificate, made and revoked by the user on
the self-service pages (docs/console.md). Agents admit any of them (UserState.device_serials);
revoking one ends that device's sessions and puts it in the CRL, the others stay connected."""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from vpnfleet.controlplane import certs, fleetstate, pki
from vpnfleet.controlplane.errors import Problem, conflict, not_found
from vpnfleet.controlplane.models import Certificate, User
from vpnfleet.controlplane.services.journal import Journal

MAX_DEVICES = 10  # valid device certificates per user
MAX_LABEL = 64


def check_label(text: str) -> str:
    label = " ".join(text.split())
    if not label:
        raise Problem(422, "Invalid input", "device: give the device a name, e.g. 'work laptop'")
    if len(label) > MAX_LABEL or not label.isprintable():
        raise Problem(422, "Invalid input", f"device: at most {MAX_LABEL} printable characters")
    return label


def devices(db: Session, user: User) -> Sequence[Certificate]:
    """The user's device certificates, newest first (revoked ones too, for the record)."""
    return db.scalars(
        select(Certificate)
        .where(Certificate.user_id == user.id, Certificate.kind == "device")
        .order_by(Certificate.id.desc())
        .limit(100)
    ).all()


def get_device(db: Session, user: User, serial: str) -> Certificate:
    cert = db.scalar(
        select(Certificate).where(
            Certificate.user_id == user.id,
            Certificate.kind == "device",
            Certificate.serial == serial[:64],
        )
    )
    if cert is None:
        raise not_found("device", serial[:64])
    return cert


def get_device_by_id(db: Session, user: User, cert_id: int | None) -> Certificate:
    cert = db.get(Certificate, cert_id) if cert_id is not None else None
    if cert is None or cert.user_id != user.id or cert.kind != "device":
        raise not_found("device", cert_id)
    return cert


def add_device(
    db: Session, journal: Journal, sealer: pki.Sealer, user: User, label: str
) -> Certificate:
    """A new certificate for one of the user's devices (refused past MAX_DEVICES)."""
    label = check_label(label)
    valid = db.scalar(
        select(func.count())
        .select_from(Certificate)
        .where(
            Certificate.user_id == user.id,
            Certificate.kind == "device",
            Certificate.revoked_at.is_(None),
        )
    )
    if (valid or 0) >= MAX_DEVICES:
        raise conflict(f"at most {MAX_DEVICES} devices: remove one you no longer use first")
    if not user.enabled:
        raise conflict(f"user {user.name!r} is disabled")
    cert = certs.issue(db, sealer, "device", user.name, user_id=user.id, device=label)
    journal.user_changed(user)  # agents learn the new serial before the profile is used
    journal.audit("device.add", user.name, None, {"device": label, "serial": cert.serial})
    return cert


def revoke_device(db: Session, journal: Journal, user: User, cert: Certificate) -> None:
    """Revoke one device: its sessions end, it is in the CRL; the user's others stay."""
    if cert.revoked_at is not None:
        return
    cert.revoked_at = dt.datetime.now(dt.UTC)
    cert.revocation_reason = "device removed"
    db.flush()
    journal.upsert(fleetstate.crl_update([cert]))
    journal.user_changed(user)
    journal.audit("device.revoke", user.name, {"device": cert.device, "serial": cert.serial}, None)
