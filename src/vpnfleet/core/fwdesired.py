"""The pod's desired firewall state, built from the fleet view and the session book. Pure.

Default deny: a connected client reaches what the grants of its user's *current* groups in the
view allow, nothing else; NAT-mode clients are masqueraded. Groups come from the view at build
time, never from a copy taken at connect time, so a membership change reaches clients that are
already connected.

A group whose grants would put the firewall over :data:`fwlimits.MAX_FIREWALL_ELEMENTS`
(the control plane refuses such writes; older data may still hold them) is built with no
grants at all: it grants nothing on this pod, every other group is enforced, and
:attr:`DesiredStateBuilder.over_limit` names it for the agent to report. Denying is the safe
direction; failing the whole state would freeze every other change instead.

The builder owns its caches (it is one object per agent, not module state). They make
successive states share unchanged objects: the firewall diff skips identical group objects, and
comparing the same address objects is a pointer check instead of Python-level ``__eq__``, so a
connect costs in proportion to the groups it touches, not to the clients connected.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable

from vpnfleet.core import fwlimits, fwnames, fwstate, grants
from vpnfleet.core.fleet import FleetView
from vpnfleet.core.sessionbook import Client

_Grants = dict[str, tuple[int, tuple[grants.Grant, ...]]]


def grants_by_group(view: FleetView) -> _Grants:
    """Group name -> (group id, grants) for every group in the view (one grant per port range)."""
    by_group: dict[int, list[grants.Grant]] = {g: [] for g in view.groups}
    for rule in view.rules.values():
        if rule.group_id in by_group:
            by_group[rule.group_id].extend(
                grants.grants_of(rule.destination, rule.proto, rule.ports)
            )
    return {g.name: (g.id, tuple(by_group[g.id])) for g in view.groups.values()}


class DesiredStateBuilder:
    """Builds :class:`fwstate.DesiredState` objects for one pod, reusing unchanged parts."""

    def __init__(
        self,
        prefix: str,
        tunnel_networks: tuple[ipaddress.IPv4Network, ...],
        *,
        uplink: str | None = None,
        nflog_group: int = 1,
        log_denied: bool = True,
    ) -> None:
        self.prefix = fwnames.validate_prefix(prefix)
        self.tunnel_networks = tunnel_networks
        self.uplink = uplink
        self.nflog_group = nflog_group
        self.log_denied = log_denied
        self._grants: tuple[FleetView, int, _Grants] | None = None
        self._sizes = fwlimits.GroupSizes()
        self.over_limit: dict[str, int] = {}
        """Groups denied because the firewall would exceed its limit: name -> elements."""
        self.total_elements = 0
        """Elements all groups' rules would need (before denying any)."""
        self._addrs: dict[str, ipaddress.IPv4Address] = {}
        self._groups: dict[str, fwstate.GroupAccess] = {}
        self._check = fwstate.ClientCheck()

    def _grants_of(self, view: FleetView) -> _Grants:
        # Recomputed when the view object or its revision changed (a resync replaces the view).
        cached = self._grants
        if cached is not None and cached[0] is view and cached[1] == view.revision:
            return cached[2]
        grants = grants_by_group(view)
        stored: dict[int, list[fwlimits.StoredRule]] = {gid: [] for gid in view.groups}
        for r in view.rules.values():
            if r.group_id in stored:
                stored[r.group_id].append((r.destination, r.proto, r.ports))
        sizes = self._sizes.count({g.name: stored[g.id] for g in view.groups.values()})
        deny = fwlimits.groups_to_deny(sizes)
        for name in deny:
            grants[name] = (grants[name][0], ())
        self.over_limit = {name: sizes[name] for name in deny}
        self.total_elements = sum(sizes.values())
        self._grants = (view, view.revision, grants)
        return grants

    def _addr(self, text: str) -> ipaddress.IPv4Address:
        addr = self._addrs.get(text)
        if addr is None:
            addr = self._addrs[text] = ipaddress.IPv4Address(text)
        return addr

    def build(self, view: FleetView, clients: Iterable[Client]) -> fwstate.DesiredState:
        """The state for the established ``clients`` under ``view``'s groups and rules."""
        established = [c for c in clients if c.established]
        addr = self._addr
        all_clients = frozenset(addr(c.tunnel_ip) for c in established)
        nat = frozenset(addr(c.tunnel_ip) for c in established if c.mode == "nat")
        grants = self._grants_of(view)
        members: dict[str, set[ipaddress.IPv4Address]] = {name: set() for name in grants}
        users = view.users
        for c in established:
            user = users.get(c.user)
            if user is None:
                continue  # deleted: it is being disconnected and gets nothing meanwhile
            for name in user.groups:
                if name in members:
                    members[name].add(addr(c.tunnel_ip))
        groups: list[fwstate.GroupAccess] = []
        cache: dict[str, fwstate.GroupAccess] = {}
        for name, (gid, g) in grants.items():
            old = self._groups.get(name)
            if (
                old is not None
                and old.group_id == gid
                and old.grants is g
                and old.members == members[name]
            ):
                state = old
            else:
                state = fwstate.GroupAccess(
                    group_id=gid, members=frozenset(members[name]), grants=g
                )
            cache[name] = state
            groups.append(state)
        self._groups = cache
        if len(self._addrs) > 4 * len(established) + 1024:
            self._addrs = {c.tunnel_ip: addr(c.tunnel_ip) for c in established}
        return fwstate.DesiredState(
            prefix=self.prefix,
            tunnel_networks=self.tunnel_networks,
            uplink=self.uplink,
            nat_members=nat,
            all_clients=all_clients,
            groups=tuple(groups),
            allow_all=False,
            log_denied=self.log_denied,
            nflog_group=self.nflog_group,
            client_check=self._check,
        )
