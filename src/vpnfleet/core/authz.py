"""The CONNECT decision: may this certificate's user connect, and how.

Pure and fast: the agent evaluates it against its replica of the control plane's state, so a
decision never waits on the network (OpenVPN is never blocked), and the control plane being
briefly away does not lock users out. The control plane re-checks the fleet-wide session
limit when the session is recorded and the agent disconnects the client if it says no.
"""

from __future__ import annotations

from dataclasses import dataclass

from vpnfleet.core.fleet import FleetView
from vpnfleet.wire import UserState


@dataclass(frozen=True)
class Decision:
    """`reason` is for logs and metrics; `client_reason` is what the user's client shows;
    `user` is the admitted user (only on an allow). `sso` marks a refusal that only lacks
    the user's single sign-on login: every other check passed, and a login could admit it."""

    allow: bool
    reason: str
    client_reason: str
    user: UserState | None = None
    sso: bool = False

    @property
    def label(self) -> str:
        """A bounded metric label for the outcome."""
        return "allowed" if self.allow else self.reason.split(" (")[0].replace(" ", "_")


def holds_certificate(user: UserState, presented: str | None) -> bool:
    """Is ``presented`` the user's main certificate or one of their devices' (not revoked)?"""
    return serial_matches(user.cert_serial, presented) or any(
        serial_matches(s, presented) for s in user.device_serials
    )


def serial_matches(expected: str | None, presented: str | None) -> bool:
    """Is ``presented`` (OpenVPN's decimal ``tls_serial_0``) the user's current serial?"""
    if expected is None or presented is None:
        return False
    try:
        return int(expected) == int(presented)
    except ValueError:
        return False


def decide(
    view: FleetView,
    common_name: str,
    cert_serial: str | None,
    local_sessions: int,
    superseded: frozenset[str] = frozenset(),
    *,
    reauth: bool = False,
    signed_in: bool = False,
    token_expired: bool = False,
) -> Decision:
    """Decide a CONNECT for the certificate `common_name` / `cert_serial`.

    `local_sessions` counts this user's sessions on this pod that the fleet view may not have
    seen yet (established here, not yet echoed back by the watch stream). `superseded` names
    session uids this connection replaces (the same device reconnecting): they do not count,
    and neither do sessions the control plane has marked to end (`LiveSession.kill`).

    A user whose auth policy is `cert+sso` is refused at CONNECT with ``sso`` set until
    `signed_in` says this connection's single sign-on login succeeded (the agent then decides
    again, on the view of that moment): the certificate alone must not be enough. Every other
    check comes first, so nobody is sent to log in only to be refused afterwards. A REAUTH
    (TLS renegotiation) continues a connection that was admitted, so it is not asked again,
    unless `token_expired` says the auth token it presents ran out (the single sign-on
    session's lifetime): then it is refused, which ends the connection. A CONNECT whose
    token ran out is refused too (the client drops its token and comes back to log in, see
    sessionbook.SessionBook.connect).
    """
    user = view.users.get(common_name)
    if user is None:
        return Decision(False, "unknown user", "unknown account")
    if not user.enabled:
        return Decision(False, "user disabled", "account disabled")
    if not holds_certificate(user, cert_serial):
        return Decision(False, "certificate not current", "certificate revoked or replaced")
    if user.mode == "gateway" and not user.gateway_address:
        return Decision(False, "no gateway address leased", "no gateway address")
    # A session the control plane asked to end (killed, replaced) is on its way out and
    # must not lock its user out meanwhile.
    fleet = sum(
        1
        for s in view.sessions.values()
        if s.user == user.name and s.uid not in superseded and s.kill is None
    )
    live = max(fleet, local_sessions)
    if live >= user.max_sessions:
        return Decision(False, f"session limit reached ({user.max_sessions})", "too many sessions")
    if user.auth == "cert+sso" and token_expired:
        return Decision(
            False,
            "single sign-on session expired",
            "single sign-on session expired: connect again to log in",
        )
    if user.auth == "cert+sso" and not reauth and not signed_in:
        return Decision(False, "single sign-on required", "single sign-on login required", sso=True)
    return Decision(True, "allowed", "", user)
