"""How a VPN connection must authenticate: the certificate alone, or the certificate and a
single sign-on login at the company's IdP (docs/sso.md).

A user's own policy wins when set (an administrator may exempt a service account from SSO, or
require it of one person). Otherwise the user's groups decide, the strictest winning: one group
asking for `cert+sso` is enough. With neither, the certificate alone (what vpnfleet always did).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Literal

AuthPolicy = Literal["cert", "cert+sso"]
POLICIES: tuple[AuthPolicy, ...] = ("cert", "cert+sso")
DEFAULT: AuthPolicy = "cert"


def parse_policy(value: str) -> AuthPolicy:
    """`value` as a policy, or a ValueError naming the accepted ones."""
    if value not in POLICIES:
        raise ValueError(f"auth policy must be one of {', '.join(POLICIES)}, not {value!r}")
    return value


def effective(own: str | None, group_policies: Iterable[str | None]) -> AuthPolicy:
    """The policy a connection of this user must meet."""
    if own is not None:
        return parse_policy(own)
    policies = {parse_policy(p) for p in group_policies if p is not None}
    return "cert+sso" if "cert+sso" in policies else DEFAULT
