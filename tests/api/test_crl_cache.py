"""The CRL is signed once and served as stored, by every replica, until it must change."""

from __future__ import annotations

import datetime as dt

import httpx
from cryptography import x509
from sqlalchemy import text

from tests.conftest import Server
from vpnfleet.controlplane import certs, db
from vpnfleet.controlplane.app import prepare
from vpnfleet.controlplane.pki import CRL_DAYS
from vpnfleet.controlplane.settings import ServerSettings

SECRET = "test-seal-secret-Qx9LmPz4Rk8Vw2b7"  # the conftest server's


def get_crl(admin: httpx.Client) -> bytes:
    r = admin.get("/api/v1/pki/crl")
    assert r.status_code == 200
    return r.content


def test_repeated_gets_return_the_same_signed_crl(server: Server, admin: httpx.Client) -> None:
    first = get_crl(admin)
    assert get_crl(admin) == first
    # Another replica on the same database serves the very same bytes.
    other = prepare(
        ServerSettings(data_dir=server.data_dir, database_url=server.database_url, secret=SECRET)
    )
    try:
        with db.transaction(other.factory) as session:
            assert certs.crl_pem(session, other.sealer).encode() == first
    finally:
        other.engine.dispose()


def test_a_revocation_changes_the_crl_and_lists_the_serial(admin: httpx.Client) -> None:
    admin.post("/api/v1/users", json={"name": "carol"})
    serial = int(admin.get("/api/v1/users/carol").json()["certificate"]["serial"])
    before = get_crl(admin)
    assert x509.load_pem_x509_crl(before).get_revoked_certificate_by_serial_number(serial) is None
    assert admin.post("/api/v1/users/carol/reissue", json={"reason": "lost"}).status_code == 200
    after = get_crl(admin)
    assert after != before
    crl = x509.load_pem_x509_crl(after)
    assert crl.get_revoked_certificate_by_serial_number(serial) is not None
    assert get_crl(admin) == after  # and then it stays


def test_a_crl_past_half_its_validity_is_signed_again(server: Server, admin: httpx.Client) -> None:
    first = get_crl(admin)
    engine = db.make_engine(server.database_url)
    soon = dt.datetime.now(dt.UTC).replace(tzinfo=None) + dt.timedelta(days=CRL_DAYS / 2 - 1)
    try:
        with engine.begin() as conn:
            conn.execute(text("UPDATE pki_state SET crl_next_update = :t"), {"t": soon})
    finally:
        engine.dispose()
    renewed = get_crl(admin)
    assert renewed != first
    next_update = x509.load_pem_x509_crl(renewed).next_update_utc
    assert next_update is not None
    left = next_update - dt.datetime.now(dt.UTC)
    assert dt.timedelta(days=CRL_DAYS - 1) < left <= dt.timedelta(days=CRL_DAYS)
    assert get_crl(admin) == renewed
