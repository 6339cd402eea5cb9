"""OpenVPN's web authentication, the parts that are protocol (OpenVPN 2.6 management notes,
"client-pending-auth"): whether a connecting client can open a login URL, and the
`WEB_AUTH::<url>` text the server sends it.

A client that can open a URL announces it in its peer info, `IV_SSO=webauth[,crtext,...]`
(stock clients: OpenVPN 2.6 with `setenv IV_SSO webauth` and a management client that shows
the URL; OpenVPN Connect; Tunnelblick and Viscosity in their recent versions). Others must be
refused with a reason instead of being left pending until they time out.

The server sends `INFO_PRE,WEB_AUTH:<flags>:<url>` to the client in one control message of
at most 1024 bytes, so the URL must be short: the control plane hands out a short login URL
that redirects to the IdP, never the IdP's own long authorization URL.
"""

from __future__ import annotations

import base64
import binascii
import re
from collections.abc import Iterable, Mapping
from urllib.parse import urlsplit

MAX_CONTROL_MESSAGE = 1024  # bytes, "INFO_PRE," included
# The longest the agent keeps a connection pending for its user's login (seconds), a longer
# login_timeout_seconds at the control plane is cut to it; also the servers' hand-window, so
# that the handshake up to the pending answer is not cut short while registrations queue.
PENDING_MAX = 300
INFO_PRE = "INFO_PRE,"
FLAGS = frozenset({"external", "hidden"})  # "proxy" needs proxy settings we do not send
# What a URL may contain here: RFC 3986 unreserved, reserved and '%'; no quotes, spaces or
# backslashes, which OpenVPN's command lexer would have to escape and clients would mangle.
_URL_CHARS = re.compile(r"[A-Za-z0-9\-._~:/?#\[\]@!$&'()*+,;=%]+")


def announces_webauth(env: Mapping[str, str]) -> bool:
    """Whether the client's peer info (`IV_SSO`) says it can open a web login."""
    methods = env.get("IV_SSO", "")
    return "webauth" in {m.strip().lower() for m in methods.split(",")}


def web_auth_extra(url: str, flags: Iterable[str] = ()) -> str:
    """The `{EXTRA}` of `client-pending-auth` for a login at `url` (ValueError if it cannot
    be sent: not an absolute http(s) URL, characters a client would mangle, too long)."""
    parts = urlsplit(url)
    if parts.scheme not in ("https", "http") or not parts.netloc:
        raise ValueError("the web-auth URL must be an absolute http(s) URL")
    if not _URL_CHARS.fullmatch(url):
        raise ValueError("the web-auth URL has characters a client could not open as given")
    wanted = list(flags)
    unknown = set(wanted) - FLAGS
    if unknown:
        raise ValueError(f"unknown web-auth flags: {', '.join(sorted(unknown))}")
    extra = f"WEB_AUTH:{','.join(wanted)}:{url}"
    if len(INFO_PRE) + len(extra) > MAX_CONTROL_MESSAGE:
        raise ValueError(
            f"the web-auth URL is too long for OpenVPN's control message "
            f"({len(INFO_PRE) + len(extra)} > {MAX_CONTROL_MESSAGE} bytes)"
        )
    return extra


# OpenVPN's auth tokens (auth-gen-token, src/openvpn/auth_token.c): "SESS_ID_AT_" and the
# base64 of the session id (12 bytes), the token's first issue time and this time (big
# endian 64-bit Unix seconds each) and an HMAC-SHA256 (32 bytes). A token keeps the first issue
# time through every renewal: that is when the user last logged in.
TOKEN_PREFIX = "SESS_ID_AT_"  # noqa: S105  # a format marker, no secret
_TOKEN_BYTES = 12 + 8 + 8 + 32


def token_signed_in_at(token: str | None) -> int | None:
    """When the login behind an auth token happened (Unix seconds), or None if `token` is not
    one. Read only from a token OpenVPN has already checked (`session_state=Authenticated`):
    the HMAC is OpenVPN's to verify, this only reads the time it vouches for."""
    if not token or not token.startswith(TOKEN_PREFIX):
        return None
    try:
        raw = base64.b64decode(token[len(TOKEN_PREFIX) :], validate=True)
    except (binascii.Error, ValueError):
        return None
    if len(raw) != _TOKEN_BYTES:
        return None
    return int.from_bytes(raw[12:20], "big")
