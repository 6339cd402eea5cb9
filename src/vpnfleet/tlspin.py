"""Client-side TLS for the agent and the CLI: trust one pinned CA, and say why a handshake
failed in one sentence.

A pinned CA file (`--ca-file`, `VPNFLEET_CA_FILE`) replaces every other trust anchor: only
certificates it signed, for the host in the URL (httpx checks the name), are accepted. Without
one, https URLs are checked against the bundled public CAs (certifi), as httpx does.
"""

from __future__ import annotations

import ssl
from pathlib import Path

import httpx

# OpenSSL's X509_V_ERR_HOSTNAME_MISMATCH and X509_V_ERR_IP_ADDRESS_MISMATCH.
_NAME_MISMATCH = (62, 64)


class TrustError(ValueError):
    """The CA file cannot be used (missing, unreadable, not PEM certificates)."""


def pinned_context(ca_file: str | Path) -> ssl.SSLContext:
    """An ssl context that trusts only the certificates in `ca_file` (PEM), TLS 1.2 or newer,
    with hostname checks."""
    # A bare client context: verification and hostname checks on, no CA loaded but ours.
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        ctx.load_verify_locations(cafile=str(ca_file))
    except FileNotFoundError:
        raise TrustError(f"CA file {ca_file} does not exist") from None
    except ssl.SSLError:
        raise TrustError(f"CA file {ca_file} holds no PEM certificate") from None
    except OSError as exc:
        raise TrustError(f"cannot read CA file {ca_file}: {exc.strerror}") from None
    return ctx


def verify_for(ca_file: str | Path | None) -> ssl.SSLContext | bool:
    """What to give httpx as `verify`: the pinned context, or True (httpx's default CAs)."""
    return pinned_context(ca_file) if ca_file else True


def describe_failure(url: str, exc: BaseException, ca_file: str | Path | None) -> str | None:
    """One sentence for a TLS failure behind an httpx error (None if it was not TLS)."""
    seen: set[int] = set()
    cause: BaseException | None = exc
    while cause is not None and id(cause) not in seen:
        seen.add(id(cause))
        if isinstance(cause, ssl.SSLCertVerificationError):
            trusted = f"the CA in {ca_file}" if ca_file else "the default public CAs"
            what = (cause.verify_message or cause.reason or "rejected").rstrip(".")
            hint = (
                "use a host name the certificate carries"
                if cause.verify_code in _NAME_MISMATCH
                else "pin the control plane's CA with --ca-file or VPNFLEET_CA_FILE"
            )
            return (
                f"the TLS certificate of {url} failed the check against {trusted}: {what} ({hint})"
            )
        if isinstance(cause, ssl.SSLError):
            return (
                f"the TLS handshake with {url} failed ({cause.reason or type(cause).__name__}); "
                "is it serving https on that port?"
            )
        cause = cause.__cause__ or cause.__context__
    if isinstance(exc, httpx.RemoteProtocolError) and url.startswith("http://"):
        return f"{url} did not answer plain HTTP; if it serves TLS use an https:// URL"
    return None
