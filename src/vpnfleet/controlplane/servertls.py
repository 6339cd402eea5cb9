"""The control plane's HTTPS endpoint: the certificate and key it serves.

Either the operator's own (`--tls-cert/--tls-key`, e.g. from cert-manager or the company CA), or
one made at first start (`--tls-self-signed NAMES`) from a CA that exists for this one purpose.

Why a CA of its own and not the fleet CA: the fleet CA signs a server certificate for every pod
that registers, with the pod name as its DNS name, and pod names may contain dots. Anyone who
can register a pod named `vpnfleet-controlplane.vpnfleet.svc` would hold a fleet-signed
certificate valid for the control plane's name. Agents and the CLI pin the control-plane CA
instead, which signs exactly one kind of certificate: this server's.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import re
import ssl
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature

from vpnfleet.controlplane import pki

TLS_DIR = "tls"
CA_CERT = "ca.pem"
CA_KEY = "ca.key"
SERVER_CERT = "server.pem"
SERVER_KEY = "server.key"
CA_NAME = "vpnfleet control plane CA"
# A certificate this close to expiry is re-issued at start (the CA stays, so clients keep
# their pinned CA file).
RENEW_BEFORE = dt.timedelta(days=30)
# Always in a self-made certificate, so a CLI on the server's own host can use https.
LOOPBACK_NAMES = ("localhost", "127.0.0.1")

# TLS 1.2 suites the server offers: forward secrecy and AEAD only. (uvicorn's default
# "TLSv1" would bring back CBC and RSA key exchange; TLS 1.3 suites are not affected, and
# Python's server context already refuses anything below TLS 1.2.)
SERVER_CIPHERS = "ECDHE+AESGCM:ECDHE+CHACHA20"

_DNS_LABEL = re.compile(r"^[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?$")


@dataclass(frozen=True)
class ServerTLS:
    """What uvicorn serves and what clients should trust."""

    cert_file: Path
    key_file: Path
    # The CA clients pin (`--ca-file`); None for an operator's certificate (its CA is theirs).
    ca_file: Path | None
    # The certificate's DNS names and IP addresses: the hosts a client may use in https URLs.
    names: tuple[str, ...]


def validate_name(text: str) -> str:
    """A DNS name or an IP address for a certificate; ValueError with one sentence otherwise."""
    name = text.strip().lower().rstrip(".")
    try:
        return str(ipaddress.ip_address(name))
    except ValueError:
        pass
    labels = name.split(".")
    if not name or len(name) > 253 or not all(_DNS_LABEL.fullmatch(label) for label in labels):
        raise ValueError(
            f"TLS name {text!r} is not a DNS name or IP address (example: "
            "vpnfleet-controlplane.vpnfleet.svc)"
        )
    return name


def _write(path: Path, text: str, mode: int) -> None:
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "w") as fh:
        fh.write(text)
    os.chmod(tmp, mode)
    os.replace(tmp, path)


def certificate_names(cert_pem: str) -> tuple[str, ...]:
    """The DNS names and IP addresses in a certificate's subjectAltName (none: empty)."""
    cert = x509.load_pem_x509_certificate(cert_pem.encode())
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return ()
    dns = [str(n) for n in san.get_values_for_type(x509.DNSName)]
    ips = [str(n) for n in san.get_values_for_type(x509.IPAddress)]
    return tuple(dns + ips)


def _still_good(cert_pem: str, ca_pem: str, names: Sequence[str]) -> bool:
    """Is the stored server certificate issued by our CA, valid a while longer, and does it
    carry every wanted name?"""
    cert = x509.load_pem_x509_certificate(cert_pem.encode())
    ca = x509.load_pem_x509_certificate(ca_pem.encode())
    try:
        cert.verify_directly_issued_by(ca)
    except (ValueError, TypeError, InvalidSignature):
        return False
    if cert.not_valid_after_utc - dt.datetime.now(dt.UTC) < RENEW_BEFORE:
        return False
    return set(names) <= set(certificate_names(cert_pem))


def ensure_self_signed(tls_dir: Path, names: Sequence[str]) -> ServerTLS:
    """Create the control-plane CA once, and a server certificate for `names` (plus loopback)
    whenever the stored one lacks a name, nears expiry or is missing. Keys are 0600."""
    wanted = list(dict.fromkeys([*(validate_name(n) for n in names), *LOOPBACK_NAMES]))
    tls_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(tls_dir, 0o700)
    ca_cert, ca_key = tls_dir / CA_CERT, tls_dir / CA_KEY
    cert_file, key_file = tls_dir / SERVER_CERT, tls_dir / SERVER_KEY
    if ca_cert.exists() and ca_key.exists():
        ca = pki.KeyPair(ca_cert.read_text(), ca_key.read_text())
    else:
        ca = pki.create_ca(CA_NAME)
        _write(ca_key, ca.key_pem, 0o600)
        _write(ca_cert, ca.cert_pem, 0o644)
    if not (
        cert_file.exists()
        and key_file.exists()
        and _still_good(cert_file.read_text(), ca.cert_pem, wanted)
    ):
        pair = pki.issue_https_server_cert(ca, wanted)
        _write(key_file, pair.key_pem, 0o600)
        _write(cert_file, pair.cert_pem, 0o644)
    check_pair(cert_file, key_file)
    return ServerTLS(cert_file, key_file, ca_cert, certificate_names(cert_file.read_text()))


def check_pair(cert_file: Path, key_file: Path) -> None:
    """Load the pair as the server will; ValueError naming the files (never the key) if not."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        ctx.load_cert_chain(cert_file, key_file)
    except OSError as exc:
        reason = exc.strerror if not isinstance(exc, ssl.SSLError) else exc.reason
        raise ValueError(
            f"cannot use TLS certificate {cert_file} with key {key_file}: "
            f"{reason or type(exc).__name__}"
        ) from None


def operator_pair(cert_file: Path, key_file: Path) -> ServerTLS:
    """The operator's certificate and key, checked."""
    check_pair(cert_file, key_file)
    return ServerTLS(cert_file, key_file, None, certificate_names(cert_file.read_text()))


def server_tls(
    data_dir: Path,
    cert_file: Path | None,
    key_file: Path | None,
    self_signed: Sequence[str],
) -> ServerTLS | None:
    """What the server will serve: the operator's pair, a self-made one, or None (plain HTTP)."""
    if cert_file is not None and key_file is not None:
        return operator_pair(cert_file, key_file)
    if self_signed:
        return ensure_self_signed(data_dir / TLS_DIR, self_signed)
    return None
