"""The fleet's PKI, built on `cryptography` alone (no easy-rsa, no openssl shell-outs).

Keys are ECDSA P-256: OpenVPN 2.6 with OpenSSL 3 handles them, they are small in profiles and
fast to sign. Private keys are sealed (Fernet) before they are stored, so a database dump alone
does not hand out the CA.
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import ipaddress
import secrets
from collections.abc import Iterable
from dataclasses import dataclass

from cryptography import x509
from cryptography.fernet import Fernet, InvalidToken
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

CA_DAYS = 3650
LEAF_DAYS = 825
CRL_DAYS = 30


class PKIError(Exception):
    """A PKI operation could not be done (the message never contains key material)."""


@dataclass(frozen=True)
class KeyPair:
    """A certificate and its private key, both PEM."""

    cert_pem: str
    key_pem: str


@dataclass(frozen=True)
class CertInfo:
    """The facts about a certificate that admins and the API show."""

    common_name: str
    serial: int
    not_before: dt.datetime
    not_after: dt.datetime
    fingerprint_sha256: str
    is_ca: bool


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _key_pem(key: ec.EllipticCurvePrivateKey) -> str:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ).decode()


def _load(ca: KeyPair) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    cert = x509.load_pem_x509_certificate(ca.cert_pem.encode())
    key = serialization.load_pem_private_key(ca.key_pem.encode(), password=None)
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise PKIError("the CA key is not an EC key")
    return cert, key


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def create_ca(common_name: str = "vpnfleet CA", days: int = CA_DAYS) -> KeyPair:
    """Create a self-signed CA that may sign leaf certificates and CRLs only."""
    key = _new_key()
    now = _now()
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(common_name))
        .issuer_name(_name(common_name))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(ski, critical=False)
        .sign(key, hashes.SHA256())
    )
    return KeyPair(cert.public_bytes(serialization.Encoding.PEM).decode(), _key_pem(key))


def _issue(
    ca: KeyPair,
    common_name: str,
    server: bool,
    days: int,
    alt_names: list[x509.GeneralName] | None = None,
) -> KeyPair:
    ca_cert, ca_key = _load(ca)
    key = _new_key()
    now = _now()
    not_after = min(now + dt.timedelta(days=days), ca_cert.not_valid_after_utc)
    usage = ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(common_name))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=True,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
            critical=False,
        )
    )
    if server:
        names = alt_names if alt_names is not None else [x509.DNSName(common_name)]
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
    cert = builder.sign(ca_key, hashes.SHA256())
    return KeyPair(cert.public_bytes(serialization.Encoding.PEM).decode(), _key_pem(key))


def issue_server_cert(ca: KeyPair, common_name: str, days: int = LEAF_DAYS) -> KeyPair:
    """Issue a TLS server certificate for a pod (extendedKeyUsage serverAuth)."""
    return _issue(ca, common_name, server=True, days=days)


def issue_https_server_cert(ca: KeyPair, names: Iterable[str], days: int = LEAF_DAYS) -> KeyPair:
    """Issue an HTTPS server certificate whose subjectAltName holds `names` (DNS names or IP
    addresses; the first is also the CN). Used for the control plane's own API endpoint."""
    alt: list[x509.GeneralName] = []
    for name in names:
        try:
            alt.append(x509.IPAddress(ipaddress.ip_address(name)))
        except ValueError:
            alt.append(x509.DNSName(name))
    if not alt:
        raise PKIError("a server certificate needs at least one name")
    first = alt[0].value
    return _issue(ca, str(first), server=True, days=days, alt_names=alt)


def issue_client_cert(ca: KeyPair, common_name: str, days: int = LEAF_DAYS) -> KeyPair:
    """Issue a client certificate whose CN is the user name (extendedKeyUsage clientAuth)."""
    return _issue(ca, common_name, server=False, days=days)


def build_crl(ca: KeyPair, revoked: Iterable[tuple[int, dt.datetime]], days: int = CRL_DAYS) -> str:
    """Sign a CRL listing the (serial, revoked_at) pairs; PEM."""
    ca_cert, ca_key = _load(ca)
    now = _now()
    builder = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(ca_cert.subject)
        .last_update(now - dt.timedelta(minutes=5))
        .next_update(now + dt.timedelta(days=days))
    )
    for serial, when in revoked:
        if when.tzinfo is None:
            when = when.replace(tzinfo=dt.UTC)
        builder = builder.add_revoked_certificate(
            x509.RevokedCertificateBuilder().serial_number(serial).revocation_date(when).build()
        )
    crl = builder.sign(ca_key, hashes.SHA256())
    return crl.public_bytes(serialization.Encoding.PEM).decode()


def cert_info(cert_pem: str) -> CertInfo:
    """Describe a PEM certificate."""
    try:
        cert = x509.load_pem_x509_certificate(cert_pem.encode())
    except ValueError as exc:
        raise PKIError("not a PEM certificate") from exc
    cns = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    try:
        is_ca = bool(cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca)
    except x509.ExtensionNotFound:
        is_ca = False
    return CertInfo(
        common_name=str(cns[0].value) if cns else "",
        serial=cert.serial_number,
        not_before=cert.not_valid_before_utc,
        not_after=cert.not_valid_after_utc,
        fingerprint_sha256=cert.fingerprint(hashes.SHA256()).hex(),
        is_ca=is_ca,
    )


def generate_auth_token_key() -> str:
    """A secret for OpenVPN's ``auth-gen-token-secret``: 128 random bytes in the PEM block
    OpenVPN reads (the format ``openvpn --genkey auth-token`` writes)."""
    body = base64.b64encode(secrets.token_bytes(128)).decode()
    lines = [body[i : i + 64] for i in range(0, len(body), 64)]
    return (
        "-----BEGIN OpenVPN auth-token server key-----\n"
        + "\n".join(lines)
        + "\n-----END OpenVPN auth-token server key-----\n"
    )


def generate_tls_crypt_key() -> str:
    """A 2048-bit OpenVPN static key (the format `openvpn --genkey tls-crypt` writes)."""
    raw = secrets.token_bytes(256)
    lines = [raw[i : i + 16].hex() for i in range(0, 256, 16)]
    return (
        "-----BEGIN OpenVPN Static key V1-----\n"
        + "\n".join(lines)
        + "\n-----END OpenVPN Static key V1-----\n"
    )


class Sealer:
    """Seals private keys at rest with a secret the control plane holds outside the database."""

    def __init__(self, secret: str) -> None:
        # Any string secret works: derive a Fernet key from it.
        digest = hashlib.sha256(secret.encode()).digest()
        self._fernet = Fernet(base64.urlsafe_b64encode(digest))

    def seal(self, plaintext: str) -> str:
        return self._fernet.encrypt(plaintext.encode()).decode()

    def unseal(self, token: str) -> str:
        try:
            return self._fernet.decrypt(token.encode()).decode()
        except InvalidToken as exc:
            raise PKIError(
                "cannot unseal a stored private key: the control plane secret does not match "
                "the one the database was created with"
            ) from exc
