"""The CA as stored in the database: issue, revoke and list certificates, sign the CRL."""

from __future__ import annotations

import datetime as dt
import hashlib

from cryptography import x509
from sqlalchemy import ColumnElement, select, update
from sqlalchemy.orm import Session

from vpnfleet.controlplane import pki
from vpnfleet.controlplane.errors import Problem
from vpnfleet.controlplane.models import Certificate, PKIState, utcnow

# Re-sign the stored CRL once less than this fraction of its validity is left.
CRL_RESIGN_FRACTION = 0.5


def load_ca(db: Session, sealer: pki.Sealer) -> pki.KeyPair:
    state = db.get(PKIState, 1)
    if state is None:
        raise Problem(503, "PKI not initialised", "the CA has not been created yet")
    return pki.KeyPair(state.ca_cert_pem, sealer.unseal(state.ca_key_sealed))


def ca_cert_pem(db: Session) -> str:
    state = db.get(PKIState, 1)
    if state is None:
        raise Problem(503, "PKI not initialised", "the CA has not been created yet")
    return state.ca_cert_pem


def tls_crypt_key(db: Session, sealer: pki.Sealer) -> str:
    state = db.get(PKIState, 1)
    if state is None:
        raise Problem(503, "PKI not initialised", "the CA has not been created yet")
    return sealer.unseal(state.tls_crypt_sealed)


def auth_token_key(db: Session, sealer: pki.Sealer) -> str:
    """The fleet's auth-gen-token secret, made at first use. Every pod gets the same one, so
    a token handed out by one pod is honoured by the others (a reconnect to another pod needs
    no new single sign-on login). Replicas racing to make it keep whichever was stored first."""
    state = db.get(PKIState, 1)
    if state is None:
        raise Problem(503, "PKI not initialised", "the CA has not been created yet")
    if state.auth_token_sealed is None:
        db.execute(
            update(PKIState)
            .where(PKIState.id == 1, PKIState.auth_token_sealed.is_(None))
            .values(auth_token_sealed=sealer.seal(pki.generate_auth_token_key()))
        )
        db.refresh(state)
    assert state.auth_token_sealed is not None
    return sealer.unseal(state.auth_token_sealed)


def ensure_ca(db: Session, sealer: pki.Sealer) -> bool:
    """Create the CA and tls-crypt key once; True if they were created now."""
    if db.get(PKIState, 1) is not None:
        return False
    ca = pki.create_ca()
    db.add(
        PKIState(
            id=1,
            ca_cert_pem=ca.cert_pem,
            ca_key_sealed=sealer.seal(ca.key_pem),
            tls_crypt_sealed=sealer.seal(pki.generate_tls_crypt_key()),
        )
    )
    db.flush()
    return True


def issue(
    db: Session,
    sealer: pki.Sealer,
    kind: str,
    common_name: str,
    user_id: int | None = None,
    pod_id: int | None = None,
    device: str | None = None,
) -> Certificate:
    """Issue and store a client (`kind="client"`; `"device"`: one of the user's own devices,
    labelled `device`) or server certificate."""
    cert = new_certificate(load_ca(db, sealer), sealer, kind, common_name, user_id, pod_id)
    cert.device = device
    db.add(cert)
    db.flush()
    return cert


def new_certificate(
    ca: pki.KeyPair,
    sealer: pki.Sealer,
    kind: str,
    common_name: str,
    user_id: int | None = None,
    pod_id: int | None = None,
) -> Certificate:
    """A certificate row signed by `ca`, not yet added (many users at once load the CA once)."""
    pair = (
        pki.issue_client_cert(ca, common_name)
        if kind in ("client", "device")
        else pki.issue_server_cert(ca, common_name)
    )
    info = pki.cert_info(pair.cert_pem)
    return Certificate(
        kind=kind,
        common_name=common_name,
        user_id=user_id,
        pod_id=pod_id,
        serial=str(info.serial),
        cert_pem=pair.cert_pem,
        key_sealed=sealer.seal(pair.key_pem),
        not_after=info.not_after,
    )


def current_user_cert(db: Session, user_id: int) -> Certificate | None:
    """The user's newest certificate that is not revoked."""
    return db.scalar(
        select(Certificate)
        .where(
            Certificate.user_id == user_id,
            Certificate.kind == "client",
            Certificate.revoked_at.is_(None),
        )
        .order_by(Certificate.id.desc())
        .limit(1)
    )


def revoke_user_certs(
    db: Session, user_id: int, reason: str, kinds: tuple[str, ...] = ("client",)
) -> list[Certificate]:
    """Revoke the user's certificates of ``kinds`` (the main one by default: a reissue leaves
    the user's own devices alone; deleting the user revokes them too)."""
    return _revoke(db, (Certificate.user_id == user_id) & Certificate.kind.in_(kinds), reason)


def revoke_pod_certs(db: Session, pod_id: int, reason: str) -> list[Certificate]:
    return _revoke(db, Certificate.pod_id == pod_id, reason)


def _revoke(db: Session, owner: ColumnElement[bool], reason: str) -> list[Certificate]:
    rows = db.scalars(select(Certificate).where(owner, Certificate.revoked_at.is_(None))).all()
    now = utcnow()
    for row in rows:
        row.revoked_at = now
        row.revocation_reason = reason
    db.flush()
    return list(rows)


def revoked_serials(db: Session) -> list[tuple[int, dt.datetime]]:
    rows = db.execute(
        select(Certificate.serial, Certificate.revoked_at).where(
            Certificate.revoked_at.is_not(None)
        )
    ).all()
    return [(int(serial), when) for serial, when in rows if when is not None]


def revoked_digest(revoked: list[tuple[int, dt.datetime]]) -> str:
    """A fingerprint of the revoked set: equal on every replica reading the same rows."""
    lines = sorted(f"{serial}:{when.astimezone(dt.UTC).isoformat()}" for serial, when in revoked)
    return hashlib.sha256("\n".join(lines).encode()).hexdigest()


def _crl_current(state: PKIState, digest: str, now: dt.datetime) -> bool:
    if state.crl_pem is None or state.crl_next_update is None:
        return False
    resign_at = state.crl_next_update - dt.timedelta(days=pki.CRL_DAYS * CRL_RESIGN_FRACTION)
    return state.crl_revoked_digest == digest and now < resign_at


def crl_pem(db: Session, sealer: pki.Sealer, now: dt.datetime | None = None) -> str:
    """The CRL of every revoked certificate, signed once and stored for every replica.

    Re-signed only when the revoked set differs from the one the stored CRL lists (any code
    path that revokes is covered, since the set is read, not announced) or when less than
    half of its validity is left, so agents refreshing every few hours always hold one with
    weeks to go. Every GET, register and snapshot in between gets the same bytes.
    """
    now = now or utcnow()
    revoked = revoked_serials(db)
    digest = revoked_digest(revoked)
    state = db.get(PKIState, 1)
    if state is None:
        raise Problem(503, "PKI not initialised", "the CA has not been created yet")
    if _crl_current(state, digest, now):
        assert state.crl_pem is not None
        return state.crl_pem
    # Lock the row, then look again: another replica may have signed it meanwhile.
    state = db.execute(
        select(PKIState)
        .where(PKIState.id == 1)
        .with_for_update()
        .execution_options(populate_existing=True)
    ).scalar_one()
    if _crl_current(state, digest, now):
        assert state.crl_pem is not None
        return state.crl_pem
    pem = pki.build_crl(load_ca(db, sealer), revoked)
    next_update = x509.load_pem_x509_crl(pem.encode()).next_update_utc
    state.crl_pem = pem
    state.crl_revoked_digest = digest
    state.crl_next_update = next_update
    db.flush()
    return pem


def reseal(db: Session, old: pki.Sealer, new: pki.Sealer) -> int:
    """Seal every stored private key (CA, tls-crypt, auth-token, certificates) with ``new``
    instead of ``old``; the number of keys. Raises PKIError, with nothing changed once the
    caller rolls back, when a key does not open with ``old``."""
    count = 0
    state = db.get(PKIState, 1)
    if state is not None:
        state.ca_key_sealed = new.seal(old.unseal(state.ca_key_sealed))
        state.tls_crypt_sealed = new.seal(old.unseal(state.tls_crypt_sealed))
        count += 2
        if state.auth_token_sealed is not None:
            state.auth_token_sealed = new.seal(old.unseal(state.auth_token_sealed))
            count += 1
    for cert in db.scalars(select(Certificate)):
        cert.key_sealed = new.seal(old.unseal(cert.key_sealed))
        count += 1
    db.flush()
    return count
