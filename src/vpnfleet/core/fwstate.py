"""The desired firewall state of one pod, and what it allows. Pure: no I/O.

The agent builds a :class:`DesiredState` from policy and live sessions: the tunnel networks,
the connected clients (and which of them are NAT'd), and per group a :class:`GroupAccess`
(its connected members and its grants). Everything else works from it: rendering
(:mod:`vpnfleet.core.fwrender`), incremental changes (:mod:`vpnfleet.core.fwdiff`), drift
(:mod:`vpnfleet.core.fwkernel`) and revocation (:mod:`vpnfleet.core.revocation`).
:func:`is_allowed` is the policy the rules enforce, restated in Python for decisions about
flows that are already open.

Validation happens at construction, so a state that exists is consistent: a client outside
the tunnel networks would be "not ours" to the rules (unfiltered), a NAT member or group
member that is not a connected client would be let through half-configured.

Derived data and reuse
----------------------
States are immutable, so what is derived from them (set elements, rules, per-group indexes)
is computed on first use and kept on the instance (``cached_property``: not fields, so eq,
hash and repr ignore them). A caller that builds each new state from the previous one,
reusing unchanged :class:`GroupAccess` objects, client sets and address objects, pays for
each of those once; diffs skip what is shared (see :mod:`vpnfleet.core.fwdiff` for the
figures). Validating 5,000 clients costs a few milliseconds; a :class:`ClientCheck` owned by
the state's builder remembers what it already checked, so a connect checks one address.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv4Network

from vpnfleet.core import fwlimits
from vpnfleet.core.fwnames import MAX_GROUP_ID, GroupSetKind, group_set, validate_prefix
from vpnfleet.core.fwrender import (
    GROUP_SET_TYPES,
    SetSpec,
    build_desired_sets,
    build_expected_rules,
    group_destinations,
    ip_elements,
)
from vpnfleet.core.grants import Grant

# A group needing more destination-set elements than every group together may have is refused
# here; the limit and the count are fwlimits' (the agent denies such a group before this).
MAX_SET_ELEMENTS = fwlimits.MAX_FIREWALL_ELEMENTS

# Interface names: at most 15 bytes; "+" is iptables' wildcard.
_IFACE_RE = re.compile(r"^[A-Za-z0-9_.@:+-]{1,15}$")


def _all_instances(items: Iterable[object], cls: type) -> bool:
    # type() runs in C for every element; isinstance only for the few distinct types.
    return all(issubclass(t, cls) for t in set(map(type, items)))


@dataclass(frozen=True)
class GroupAccess:
    """One group: its connected members' tunnel IPs and what they may reach.

    Derived data (set elements, the grant set, an index for :meth:`covers`) is computed on
    first use and kept on the instance, so a caller that reuses an unchanged GroupAccess
    between states pays for it once, and diffs skip it.
    """

    group_id: int
    members: frozenset[IPv4Address]
    grants: tuple[Grant, ...]

    def __post_init__(self) -> None:
        gid = self.group_id
        if not isinstance(gid, int) or isinstance(gid, bool) or not 0 <= gid <= MAX_GROUP_ID:
            raise ValueError(f"group id must be an integer in 0..{MAX_GROUP_ID}, not {gid!r}")
        if not isinstance(self.members, frozenset) or not _all_instances(self.members, IPv4Address):
            raise ValueError(f"group {gid}: members must be a frozenset of IPv4Address")
        if not isinstance(self.grants, tuple) or not _all_instances(self.grants, Grant):
            raise ValueError(f"group {gid}: grants must be a tuple of Grant")
        # Cheap upper bound first (each grant's elements, without merging); exact if over.
        bound = sum(2 * max(1, g.port_count) for g in self.grants)
        if bound > MAX_SET_ELEMENTS:
            need = fwlimits.group_elements(self.grants)
            if need > MAX_SET_ELEMENTS:
                raise ValueError(
                    f"group {gid} would need {need} firewall set elements "
                    f"(limit {MAX_SET_ELEMENTS}): {fwlimits.ADVICE}"
                )

    @functools.cached_property
    def destinations(self) -> dict[GroupSetKind, frozenset[str]]:
        """Elements of the group's five destination sets (see
        :func:`~vpnfleet.core.fwrender.group_destinations`); do not modify."""
        return group_destinations(self.grants)

    @functools.cached_property
    def grant_set(self) -> frozenset[Grant]:
        """The grants as a set (hashed once per group, not once per diff)."""
        return frozenset(self.grants)

    @functools.cached_property
    def member_elements(self) -> frozenset[str]:
        """Members as set elements (strings)."""
        return ip_elements(self.members)

    def set_specs(self, prefix: str) -> tuple[SetSpec, ...]:
        """The group's six sets (members first), kept for reuse by later states."""
        cache = self._set_specs
        specs = cache.get(prefix)
        if specs is None:
            m = SetSpec(group_set(prefix, self.group_id, "m"), "hash:ip", self.member_elements)
            specs = cache[prefix] = (
                m,
                *(
                    SetSpec(group_set(prefix, self.group_id, kind), GROUP_SET_TYPES[kind], elems)
                    for kind, elems in self.destinations.items()
                ),
            )
        return specs

    @functools.cached_property
    def _set_specs(self) -> dict[str, tuple[SetSpec, ...]]:
        return {}

    @functools.cached_property
    def _by_network(self) -> tuple[tuple[int, ...], dict[tuple[int, int], list[Grant]]]:
        # Grants keyed by (network address, prefix length), and the prefix lengths in use:
        # only grants on a supernet of a grant's network can cover it, so covers() makes one
        # lookup per prefix length instead of testing every grant.
        index: dict[tuple[int, int], list[Grant]] = {}
        for g in self.grants:
            index.setdefault((g.span[0], g.network.prefixlen), []).append(g)
        return tuple(sorted({plen for _, plen in index})), index

    def covers(self, grant: Grant) -> bool:
        """True when one of this group's grants alone covers ``grant``."""
        plens, index = self._by_network
        lo = grant.span[0]
        own = grant.network.prefixlen
        for plen in plens:
            if plen > own:
                break
            for h in index.get((lo & ~(0xFFFFFFFF >> plen), plen), ()):
                if h.covers(grant):
                    return True
        return False


class ClientCheck:
    """Remembers the client set a :class:`DesiredState` last validated, and for which tunnel
    networks, so that the next state only checks the clients that are new to it.

    Successive states differ by a few clients: the difference is a set operation in C on
    stored hashes, while checking every address (type, inside the tunnel networks) runs
    Python code per client. Whoever builds successive states owns one (the agent's
    desired-state builder) and passes it to each :class:`DesiredState`; states built without
    one validate every client. A cache only: whether a state is accepted never depends on it.
    """

    __slots__ = ("_clients", "_networks")

    def __init__(self) -> None:
        self._networks: tuple[IPv4Network, ...] | None = None
        self._clients: frozenset[IPv4Address] = frozenset()

    def unchecked(
        self, clients: frozenset[IPv4Address], networks: tuple[IPv4Network, ...]
    ) -> frozenset[IPv4Address]:
        """The part of ``clients`` not validated yet against ``networks``."""
        if self._networks is not None and self._networks == networks:
            return clients - self._clients
        return clients

    def remember(self, clients: frozenset[IPv4Address], networks: tuple[IPv4Network, ...]) -> None:
        """Record that every one of ``clients`` is an address inside ``networks``."""
        self._networks, self._clients = networks, clients


@dataclass(frozen=True)
class DesiredState:
    """Everything the pod's firewall should enforce right now.

    ``client_check``: an optional :class:`ClientCheck` that makes validating a state that
    differs from the previous one by a few clients cheap. It is not part of the state (not
    compared, hashed or shown) and ``dataclasses.replace`` passes it on to derived states.
    """

    prefix: str
    tunnel_networks: tuple[IPv4Network, ...]
    uplink: str | None
    nat_members: frozenset[IPv4Address]
    all_clients: frozenset[IPv4Address]
    groups: tuple[GroupAccess, ...]
    allow_all: bool = False
    log_denied: bool = True
    nflog_group: int = 1
    client_check: ClientCheck | None = field(default=None, compare=False, repr=False, hash=False)

    def __post_init__(self) -> None:
        validate_prefix(self.prefix)
        if not isinstance(self.tunnel_networks, tuple) or not self.tunnel_networks:
            raise ValueError("tunnel_networks must be a non-empty tuple of IPv4Network")
        for net in self.tunnel_networks:
            if not isinstance(net, IPv4Network):
                raise ValueError(f"tunnel network must be an IPv4Network, not {net!r}")
        if self.uplink is not None and not _IFACE_RE.match(self.uplink):
            raise ValueError(f"invalid uplink interface name {self.uplink!r}")
        if not 0 <= self.nflog_group <= 65535:
            raise ValueError(f"nflog_group must be in 0..65535, not {self.nflog_group}")
        clients, nat = self.all_clients, self.nat_members
        if not isinstance(clients, frozenset):
            raise ValueError("all_clients must be a frozenset of IPv4Address")
        # Only clients not already validated with the previous state need checking.
        check = self.client_check
        fresh = clients if check is None else check.unchecked(clients, self.tunnel_networks)
        if not _all_instances(fresh, IPv4Address):
            raise ValueError("all_clients must be a frozenset of IPv4Address")
        if not isinstance(nat, frozenset):
            raise ValueError("nat_members must be a frozenset of IPv4Address")
        nat_are_clients = nat <= clients  # then they are addresses too
        if not nat_are_clients and not _all_instances(nat, IPv4Address):
            raise ValueError("nat_members must be a frozenset of IPv4Address")
        # A client outside the tunnel networks would be "not ours" to the rules: unfiltered.
        outside = _outside(fresh, self.tunnel_networks)
        if outside:
            raise ValueError(f"clients outside the tunnel networks: {_ip_list(outside)}")
        if check is not None:
            check.remember(clients, self.tunnel_networks)
        if not nat_are_clients:
            extra = self.nat_members - self.all_clients
            raise ValueError(f"NAT members that are not connected clients: {_ip_list(extra)}")
        groups = self.groups
        if (
            _all_instances(groups, GroupAccess)
            and len({g.group_id for g in groups}) == len(groups)
            and all(g.members <= clients for g in groups)
        ):
            return  # the common case, checked in bulk; otherwise find the first problem
        seen: set[int] = set()
        for g in groups:
            if not isinstance(g, GroupAccess):
                raise ValueError(f"groups must hold GroupAccess, not {g!r}")
            if g.group_id in seen:
                raise ValueError(f"group {g.group_id} appears twice")
            seen.add(g.group_id)
            if not g.members <= self.all_clients:
                extra = g.members - self.all_clients
                raise ValueError(
                    f"group {g.group_id}: members that are not connected clients: {_ip_list(extra)}"
                )

    # Derived data, computed on first use and kept on the (immutable) instance. A full
    # resync asks for the desired sets several times; diffs and revocation analysis look
    # groups up by id. cached_property writes the instance __dict__ directly, so it works on
    # a frozen dataclass; these are not fields, so eq, hash and repr ignore them.

    @functools.cached_property
    def sorted_groups(self) -> tuple[GroupAccess, ...]:
        """Groups in rendering order (by id)."""
        return tuple(sorted(self.groups, key=lambda g: g.group_id))

    @functools.cached_property
    def groups_by_id(self) -> Mapping[int, GroupAccess]:
        """Groups keyed by id."""
        return {g.group_id: g for g in self.groups}

    # Kept here for fwrender, which builds them: desired_sets() and expected_rules() there
    # are the way to read them.
    @functools.cached_property
    def _desired_sets(self) -> dict[str, SetSpec]:
        return build_desired_sets(self)

    @functools.cached_property
    def _expected_rules(self) -> dict[tuple[str, str], tuple[str, ...]]:
        return build_expected_rules(self)


def _outside(ips: frozenset[IPv4Address], networks: tuple[IPv4Network, ...]) -> list[IPv4Address]:
    # Integer compares; "ip in network" costs a microsecond per pair.
    if not ips:
        return []
    ranges = [(int(n.network_address), int(n.broadcast_address)) for n in networks]
    ints = list(map(int, ips))
    lo, hi = min(ints), max(ints)
    if any(a <= lo and hi <= b for a, b in ranges):
        return []
    for a, b in ranges:
        ints = [x for x in ints if x < a or x > b]
    return [IPv4Address(x) for x in ints]


def _ip_list(ips: Iterable[IPv4Address], limit: int = 5) -> str:
    items = sorted(ips)
    text = ", ".join(str(i) for i in items[:limit])
    return text + (f" and {len(items) - limit} more" if len(items) > limit else "")


def is_allowed(
    state: DesiredState, src: IPv4Address, proto: str, dst: IPv4Address, dport: int | None
) -> bool:
    """Would ``state`` let client ``src`` open a new flow to (proto, dst, dport)?

    ``proto`` is a protocol name as conntrack prints it (``tcp``, ``udp``, ``icmp``, ...).
    """
    if src not in state.all_clients:
        return False
    if state.allow_all:
        return True
    # isdisjoint() with a one-element set probes each group with the hash stored in that set,
    # instead of calling IPv4Address.__hash__ (Python code) once per group.
    probe = frozenset((src,))
    return any(
        not g.members.isdisjoint(probe) and any(gr.matches(proto, dst, dport) for gr in g.grants)
        for g in state.groups
    )
