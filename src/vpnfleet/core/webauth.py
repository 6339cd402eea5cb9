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
