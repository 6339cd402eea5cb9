"""Group memberships from the IdP's group claim (docs/sso.md, "Group memberships from the
IdP"): reading the claim from a validated ID token, and the membership changes one login makes.

Pure: the control plane reads the user's current memberships, asks `plan` what to change, and
applies the answer through the group services (services/sso.py). A claim that cannot be read
refuses the login (`ClaimRefused`, its message shown to the user) and changes nothing: an
absent or garbled claim must never be taken for "member of nothing", which would strip every
managed membership of a user whose IdP merely left the claim out.
"""

from __future__ import annotations

from collections.abc import Mapping, Set
from dataclasses import dataclass
from typing import Any

# More entries than this in one claim is refused rather than read: no IdP configured to send
# the groups of one application sends that many (Entra ID stops at 200 and sends an overage
# indicator instead), and a token that does is better looked at than half-trusted.
MAX_CLAIM_GROUPS = 1000
MAX_GROUP_VALUE = 1000  # characters of one entry (Keycloak's full group paths can be long)

# Claims an ID token carries for its own purposes, never a group list.
RESERVED_CLAIMS = frozenset(
    {
        "iss", "sub", "aud", "exp", "iat", "nbf", "jti", "nonce", "azp", "auth_time", "acr",
        "amr", "at_hash", "c_hash", "sid", "_claim_names", "_claim_sources",
    }
)  # fmt: skip


class ClaimRefused(Exception):
    """The group claim cannot be used: the login is refused with this reason."""


def read_claim(claims: Mapping[str, Any], name: str) -> frozenset[str]:
    """The group values of the claim `name` of a validated ID token.

    Refused (ClaimRefused): the claim is missing — with the reason that the IdP left it out
    for too many groups when the token says so in `_claim_names` (OpenID Connect's
    distributed claims, which Entra ID sends past 200 groups) —, is not a list of strings,
    or has more than MAX_CLAIM_GROUPS entries. An empty list is a valid answer: member of
    none of the managed groups."""
    value = claims.get(name)
    if value is None:
        names = claims.get("_claim_names")
        if isinstance(names, Mapping) and name in names:
            raise ClaimRefused(
                f"the identity provider left the {name!r} claim out of the token (too many "
                "groups); have it send only the groups assigned to the VPN application"
            )
        raise ClaimRefused(f"the identity provider's token has no {name!r} claim")
    if not isinstance(value, list):
        raise ClaimRefused(f"the identity provider's {name!r} claim is not a list of groups")
    if len(value) > MAX_CLAIM_GROUPS:
        raise ClaimRefused(
            f"the identity provider's {name!r} claim lists {len(value)} groups (at most "
            f"{MAX_CLAIM_GROUPS}); have it send only the groups assigned to the VPN application"
        )
    for entry in value:
        if not isinstance(entry, str) or not entry or len(entry) > MAX_GROUP_VALUE:
            raise ClaimRefused(f"the identity provider's {name!r} claim is not a list of groups")
    return frozenset(value)


@dataclass(frozen=True)
class MembershipPlan:
    """What one login changes: vpnfleet groups to join and to leave (sorted)."""

    add: tuple[str, ...]
    remove: tuple[str, ...]

    def __bool__(self) -> bool:
        return bool(self.add or self.remove)


def managed_groups(group_map: Mapping[str, str]) -> frozenset[str]:
    """The vpnfleet groups the claim manages: the values of the mapping."""
    return frozenset(group_map.values())


def plan(
    claimed: Set[str],
    group_map: Mapping[str, str],
    existing: Set[str],
    current: Set[str],
) -> MembershipPlan:
    """Make the user's memberships of the managed groups match the claim.

    `claimed`: the claim's values; `group_map`: IdP group -> vpnfleet group (several IdP
    groups may name one vpnfleet group: a member of any is a member); `existing`: the managed
    vpnfleet groups that exist (one deleted since the mapping was set is left alone);
    `current`: the vpnfleet groups the user is a member of. Groups outside the mapping are
    never in the answer, whatever `current` holds."""
    managed = managed_groups(group_map) & existing
    wanted = {group_map[value] for value in claimed if value in group_map} & managed
    have = set(current) & managed
    return MembershipPlan(add=tuple(sorted(wanted - have)), remove=tuple(sorted(have - wanted)))
