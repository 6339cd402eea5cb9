"""Profiles, certificates and the CRL, verified with the cryptography API."""

from __future__ import annotations

import re

import httpx
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import ExtendedKeyUsageOID

from tests.api.test_users_groups_rules import problem
from tests.conftest import Server


def inline(profile: str, tag: str) -> str:
    m = re.search(rf"<{tag}>\n(.*?)</{tag}>", profile, re.S)
    assert m, f"profile has no <{tag}> block"
    return m.group(1)


def test_profile_is_complete_and_its_cert_verifies(admin: httpx.Client) -> None:
    admin.post("/api/v1/users", json={"name": "alice"})
    r = admin.get("/api/v1/users/alice/profile")
    assert r.status_code == 200
    assert 'filename="alice.ovpn"' in r.headers["content-disposition"]
    profile = r.text
    # UDP first (both endpoints, rotated per user), then the TCP fallback on the same hosts.
    remotes = [line for line in profile.splitlines() if line.startswith("remote ")]
    assert sorted(remotes[:2]) == [
        "remote vpn.example.test 1194 udp",
        "remote vpn2.example.test 1195 udp",
    ]
    assert remotes[2:] == ["remote vpn.example.test 443 tcp", "remote vpn2.example.test 443 tcp"]
    assert "remote-cert-tls server" in profile

    ca = x509.load_pem_x509_certificate(inline(profile, "ca").encode())
    cert = x509.load_pem_x509_certificate(inline(profile, "cert").encode())
    key = serialization.load_pem_private_key(inline(profile, "key").encode(), password=None)
    assert "OpenVPN Static key V1" in inline(profile, "tls-crypt")

    cert.verify_directly_issued_by(ca)  # raises if the CA did not sign it
    assert cert.subject.rfc4514_string() == "CN=alice"
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert ExtendedKeyUsageOID.CLIENT_AUTH in eku
    assert key.public_key().public_numbers() == cert.public_key().public_numbers()  # type: ignore[union-attr]
    assert admin.get("/api/v1/pki").json()["ca_pem"].strip() == inline(profile, "ca").strip()


def test_reissue_revokes_old_cert_into_a_valid_crl(admin: httpx.Client) -> None:
    admin.post("/api/v1/users", json={"name": "bob"})
    old_profile = admin.get("/api/v1/users/bob/profile").text
    old = x509.load_pem_x509_certificate(inline(old_profile, "cert").encode())
    new_user = admin.post("/api/v1/users/bob/reissue", json={"reason": "laptop lost"}).json()
    assert int(new_user["certificate"]["serial"]) != old.serial_number

    ca = x509.load_pem_x509_certificate(admin.get("/api/v1/pki").json()["ca_pem"].encode())
    crl = x509.load_pem_x509_crl(admin.get("/api/v1/pki/crl").content)
    assert crl.is_signature_valid(ca.public_key())  # type: ignore[arg-type]
    assert crl.get_revoked_certificate_by_serial_number(old.serial_number) is not None
    assert (
        crl.get_revoked_certificate_by_serial_number(int(new_user["certificate"]["serial"])) is None
    )

    new_profile = admin.get("/api/v1/users/bob/profile").text
    new = x509.load_pem_x509_certificate(inline(new_profile, "cert").encode())
    assert new.serial_number == int(new_user["certificate"]["serial"])


def test_revoke_without_reissue_blocks_profile(admin: httpx.Client) -> None:
    admin.post("/api/v1/users", json={"name": "carol"})
    assert admin.post("/api/v1/users/carol/revoke").status_code == 200
    assert "no valid certificate" in problem(admin.get("/api/v1/users/carol/profile"), 409)
    assert "no valid certificate" in problem(admin.post("/api/v1/users/carol/revoke"), 409)
    assert admin.get("/api/v1/pki").json()["revoked"] == 1


def test_deleting_a_user_revokes_their_certificate(admin: httpx.Client) -> None:
    serial = admin.post("/api/v1/users", json={"name": "dan"}).json()["certificate"]["serial"]
    admin.delete("/api/v1/users/dan")
    crl = x509.load_pem_x509_crl(admin.get("/api/v1/pki/crl").content)
    assert crl.get_revoked_certificate_by_serial_number(int(serial)) is not None


def test_private_keys_are_sealed_in_the_database(server: Server, admin: httpx.Client) -> None:
    from sqlalchemy import create_engine, text

    admin.post("/api/v1/users", json={"name": "erin"})
    profile = admin.get("/api/v1/users/erin/profile").text
    key_pem = inline(profile, "key")
    eng = create_engine(server.database_url)
    with eng.connect() as conn:
        dump = " ".join(
            str(v) for row in conn.execute(text("SELECT * FROM certificates")) for v in row
        )
        dump += " ".join(
            str(v) for row in conn.execute(text("SELECT * FROM pki_state")) for v in row
        )
    eng.dispose()
    assert "PRIVATE KEY" not in dump and key_pem.splitlines()[1] not in dump


def test_profiles_spread_users_over_the_udp_endpoints(admin: httpx.Client) -> None:
    firsts = set()
    for n in range(8):
        admin.post("/api/v1/users", json={"name": f"spread{n}"})
        profile = admin.get(f"/api/v1/users/spread{n}/profile").text
        firsts.add(next(line for line in profile.splitlines() if line.startswith("remote ")))
        assert profile == admin.get(f"/api/v1/users/spread{n}/profile").text  # stable
    assert firsts == {"remote vpn.example.test 1194 udp", "remote vpn2.example.test 1195 udp"}
