"""The PKI module with the cryptography API as the verifier."""

from __future__ import annotations

import datetime as dt

import pytest
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID

from vpnfleet.controlplane import pki


def test_chain_usages_and_crl() -> None:
    ca = pki.create_ca("test CA")
    server = pki.issue_server_cert(ca, "pod-1")
    client = pki.issue_client_cert(ca, "alice")
    ca_cert = x509.load_pem_x509_certificate(ca.cert_pem.encode())
    for pair, usage in (
        (server, ExtendedKeyUsageOID.SERVER_AUTH),
        (client, ExtendedKeyUsageOID.CLIENT_AUTH),
    ):
        cert = x509.load_pem_x509_certificate(pair.cert_pem.encode())
        cert.verify_directly_issued_by(ca_cert)
        assert usage in cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
        assert not cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    info = pki.cert_info(client.cert_pem)
    assert info.common_name == "alice" and not info.is_ca and pki.cert_info(ca.cert_pem).is_ca
    crl = x509.load_pem_x509_crl(
        pki.build_crl(ca, [(info.serial, dt.datetime.now(dt.UTC))]).encode()
    )
    assert crl.is_signature_valid(ca_cert.public_key())  # type: ignore[arg-type]
    assert crl.get_revoked_certificate_by_serial_number(info.serial) is not None


def test_tls_crypt_key_format() -> None:
    key = pki.generate_tls_crypt_key()
    lines = key.strip().splitlines()
    assert lines[0] == "-----BEGIN OpenVPN Static key V1-----"
    assert lines[-1] == "-----END OpenVPN Static key V1-----"
    body = lines[1:-1]
    assert len(body) == 16 and all(len(x) == 32 and int(x, 16) >= 0 for x in body)
    assert pki.generate_tls_crypt_key() != key


def test_sealer_roundtrip_and_wrong_secret() -> None:
    sealed = pki.Sealer("one").seal("-----BEGIN PRIVATE KEY-----")
    assert "PRIVATE" not in sealed
    assert pki.Sealer("one").unseal(sealed) == "-----BEGIN PRIVATE KEY-----"
    with pytest.raises(pki.PKIError, match="secret does not match") as err:
        pki.Sealer("two").unseal(sealed)
    assert "PRIVATE" not in str(err.value)


def test_cert_info_rejects_garbage() -> None:
    with pytest.raises(pki.PKIError, match="not a PEM"):
        pki.cert_info("hello")
