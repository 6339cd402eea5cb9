"""Desired firewall state of one pod, rendered to ipset/iptables text and diffed. Pure: no I/O.

The agent computes a :class:`DesiredState` from policy and live sessions; this module turns it
into ``ipset restore`` and ``iptables-restore --noflush`` text, computes incremental set
operations between two states, compares a parsed kernel snapshot with the desired state
(drift), and parses the kernel's own text output. ``vpnfleet.agent.dataplane`` runs the commands.

Layout (``P`` = prefix, e.g. ``vpnf``; chains use the upper-case prefix)
-------------------------------------------------------------------------
Rule count depends on the number of groups only: connect, disconnect and permission changes
are set element changes.

ipsets::

    P-tun        hash:net       the tunnel networks: "is this packet ours?"
    P-clients    hash:ip        every connected client
    P-nat        hash:ip        connected NAT-mode clients (gateway clients are not in it)
    P-g<ID>-m    hash:ip        members of group ID
    P-g<ID>-d    hash:net,port  tcp/udp destinations with explicit ports ("10.0.0.0/24,tcp:80")
    P-g<ID>-t    hash:net       tcp destinations, all ports
    P-g<ID>-u    hash:net       udp destinations, all ports
    P-g<ID>-i    hash:net       icmp destinations (all types)
    P-g<ID>-n    hash:net       destinations for any protocol

Why five destination sets: ``hash:net,port`` keys on (net, proto, port); it has no wildcard
port and expands a range into one element per port, so "tcp, all ports" would be 65536
elements per network and "any protocol" cannot be written at all (it only accepts
``proto:0`` for port-less protocols, one protocol per element). Whole-protocol grants
therefore live in plain ``hash:net`` sets behind ``-p tcp``/``-p udp``/``-p icmp`` rules, and
port ranges up to :data:`MAX_SET_ELEMENTS` elements per set are expanded (a grant whose range
covers 1-65535 counts as all ports). Sets are sized with ``maxelem`` from their element
count. ``hash:net`` types reject ``/0``; it is stored as two ``/1`` halves. ICMP grants carry
no type filter: replies and errors of allowed flows pass as ESTABLISHED/RELATED anyway.

filter table, chain ``P-FWD`` (one jump from FORWARD, inserted at position 1 if missing)::

    -m set ! --match-set P-tun src -m set ! --match-set P-tun dst -j RETURN   not ours
    -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT                       open flows
    -m conntrack --ctstate INVALID -j DROP
    -p tcp ! --syn, src not in P-tun -j DROP       no mid-stream pickup towards a client
    src not in P-tun, dst in P-clients, dst not in P-nat -j ACCEPT   gateway users reachable
    src not in P-tun -j DROP                       NAT users / free tunnel IPs are not
    per group: member src + destination set match -j ACCEPT (5 rules)
      (allow_all instead: src in P-clients -j ACCEPT)
    [log_denied] -m limit -j NFLOG
    -j DROP

The ``! --syn`` rule matters for revocation: once conntrack entries are deleted, a server's
next segment to a gateway client would otherwise re-create the flow (``tcp_loose``) in the
inbound direction and the client's packets would pass as ESTABLISHED again.

nat table, chain ``P-POST`` (one jump from POSTROUTING)::

    [-o UPLINK] -m set --match-set P-nat src -m set ! --match-set P-tun dst -j MASQUERADE

Resync and consistency
----------------------
:func:`render_full` creates missing sets directly; existing ones are rebuilt into a
``<name>.new`` twin and ``swap``-ped in, so a live set is never empty mid-resync. Sets with
our prefix that the state no longer wants are *flushed* in that same ipset step (rules still
reference them, so they cannot be destroyed yet; flushing disables a removed group at once)
and destroyed by :func:`render_cleanup` after the iptables step replaced the chains.
:func:`diff` orders element operations so that a packet is never allowed before the NAT set
knows its source, and access is removed before anything is added.

Cost at scale
-------------
States are immutable, so what is derived from them (set elements, rules, per-group indexes)
is computed on first use and kept on the instance. :func:`diff` skips groups and sets that
are the same objects in both states and only analyses revocation for clients that left a group
or belong to a group that lost a grant. Callers that build each new state from the previous
one (reusing unchanged :class:`GroupState` objects, client sets and address objects) get
connects, disconnects and grant changes in about a millisecond at 5,000 clients and 200
groups; rebuilding every object from strings costs ~10x that in :func:`diff` alone, because
comparing equal but distinct addresses runs Python code (see docs/performance.md).
"""

from __future__ import annotations

import functools
import re
import socket
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv4Network
from typing import Literal, get_args

Proto = Literal["tcp", "udp", "icmp", "any"]
PROTOS: frozenset[str] = frozenset(get_args(Proto))

# ipset names are at most 31 characters: prefix (10) + "-g" + id (10) + "-m" + ".new" = 28.
MAX_PREFIX_LEN = 10
MAX_GROUP_ID = 2**31 - 1
TEMP_SUFFIX = ".new"
DEFAULT_MAXELEM = 65536
# A hash:net,port set holding more than this is refused: wide port ranges must be narrowed or
# widened to "all ports" (which costs one element per network).
MAX_SET_ELEMENTS = 1 << 20
LOG_LIMIT = "10/sec"
LOG_BURST = 20

_PREFIX_RE = re.compile(rf"^[a-z][a-z0-9]{{0,{MAX_PREFIX_LEN - 1}}}$")
# Interface names: at most 15 bytes; "+" is iptables' wildcard.
_IFACE_RE = re.compile(r"^[A-Za-z0-9_.@:+-]{1,15}$")

SetType = Literal["hash:ip", "hash:net", "hash:net,port"]
GroupSetKind = Literal["m", "d", "t", "u", "i", "n"]
_GROUP_SET_TYPES: dict[GroupSetKind, SetType] = {
    "m": "hash:ip",
    "d": "hash:net,port",
    "t": "hash:net",
    "u": "hash:net",
    "i": "hash:net",
    "n": "hash:net",
}


def validate_prefix(prefix: str) -> str:
    """Return ``prefix`` if it is usable for set and chain names, else raise ValueError."""
    if not isinstance(prefix, str) or not _PREFIX_RE.match(prefix):
        raise ValueError(
            f"invalid dataplane prefix {prefix!r}: use 1-{MAX_PREFIX_LEN} lower-case letters "
            "or digits, starting with a letter (e.g. 'vpnf')"
        )
    return prefix


# --- names -------------------------------------------------------------------------------


def tun_set(prefix: str) -> str:
    """Name of the set holding the tunnel networks."""
    return f"{prefix}-tun"


def clients_set(prefix: str) -> str:
    """Name of the set holding every connected client."""
    return f"{prefix}-clients"


def nat_set(prefix: str) -> str:
    """Name of the set holding connected NAT-mode clients."""
    return f"{prefix}-nat"


def group_set(prefix: str, group_id: int, kind: GroupSetKind) -> str:
    """Name of one of a group's sets (``m`` members, ``d``/``t``/``u``/``i``/``n`` targets)."""
    return f"{prefix}-g{group_id}-{kind}"


def fwd_chain(prefix: str) -> str:
    """Name of the agent's filter chain."""
    return f"{prefix.upper()}-FWD"


def post_chain(prefix: str) -> str:
    """Name of the agent's nat chain."""
    return f"{prefix.upper()}-POST"


def is_own_set(prefix: str, name: str) -> bool:
    """True when ``name`` follows this prefix's set naming (live or temporary)."""
    return _own_set_re(prefix).match(name) is not None


@functools.lru_cache(maxsize=16)
def _own_set_re(prefix: str) -> re.Pattern[str]:
    p = re.escape(prefix)
    temp = re.escape(TEMP_SUFFIX)
    return re.compile(rf"^{p}-(?:tun|clients|nat|g\d{{1,10}}-[mdtuin])(?:{temp})?$")


@dataclass(frozen=True)
class Jump:
    """A jump from a built-in chain to one of the agent's chains."""

    table: Literal["filter", "nat"]
    chain: str
    target: str

    @property
    def rule(self) -> str:
        """The rule as ``iptables -S`` prints it."""
        return f"-A {self.chain} -j {self.target}"


def jumps(prefix: str) -> tuple[Jump, Jump]:
    """The two jumps the layout needs."""
    return (
        Jump("filter", "FORWARD", fwd_chain(prefix)),
        Jump("nat", "POSTROUTING", post_chain(prefix)),
    )


# --- desired state -----------------------------------------------------------------------


def _is_int(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


@dataclass(frozen=True)
class Grant:
    """Access to ``network`` for ``proto``; ports only for tcp/udp (None = all ports).

    ``port_hi`` defaults to ``port_lo`` (a single port).
    """

    network: IPv4Network
    proto: Proto = "any"
    port_lo: int | None = None
    port_hi: int | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.network, IPv4Network):
            raise ValueError(f"grant network must be an IPv4Network, not {self.network!r}")
        if self.proto not in PROTOS:
            raise ValueError(f"grant protocol must be one of {sorted(PROTOS)}, not {self.proto!r}")
        if self.port_lo is None:
            if self.port_hi is not None:
                raise ValueError("grant has port_hi without port_lo")
            return
        if self.proto not in ("tcp", "udp"):
            raise ValueError(f"ports are only valid for tcp and udp grants, not {self.proto}")
        if self.port_hi is None:
            object.__setattr__(self, "port_hi", self.port_lo)
        lo, hi = self.port_lo, self.port_hi
        if not _is_int(lo) or not _is_int(hi):
            raise ValueError("grant ports must be integers")
        assert lo is not None and hi is not None
        if not 0 <= lo <= hi <= 65535:
            raise ValueError(f"invalid port range {lo}-{hi}: need 0 <= low <= high <= 65535")

    @property
    def all_ports(self) -> bool:
        """True when the grant does not restrict ports (None, or a range covering 1-65535)."""
        return self.port_lo is None or (
            self.port_lo <= 1 and self.port_hi is not None and self.port_hi == 65535
        )

    @property
    def port_count(self) -> int:
        """How many ports a hash:net,port set needs per network (0 when not port-based)."""
        if self.proto not in ("tcp", "udp") or self.all_ports:
            return 0
        assert self.port_lo is not None and self.port_hi is not None
        return self.port_hi - self.port_lo + 1

    def matches(self, proto: str, dst: IPv4Address, dport: int | None) -> bool:
        """Would a new flow (proto name, destination, destination port) be allowed?"""
        if dst not in self.network:
            return False
        if self.proto == "any":
            return True
        if proto != self.proto:
            return False
        if self.proto == "icmp" or self.all_ports:
            return True
        assert self.port_lo is not None and self.port_hi is not None
        return dport is not None and self.port_lo <= dport <= self.port_hi

    @functools.cached_property
    def _span(self) -> tuple[int, int]:
        # First and last address as integers: covers() runs in revocation loops, where
        # IPv4Network.subnet_of() would dominate. (cached_property writes the instance
        # __dict__ directly, so it works on a frozen dataclass and stays out of eq/hash.)
        lo = int(self.network.network_address)
        return lo, lo | (0xFFFFFFFF >> self.network.prefixlen)

    def covers(self, other: Grant) -> bool:
        """True when every flow ``other`` allows is also allowed by this grant alone."""
        lo, hi = self._span
        other_lo, other_hi = other._span
        if not lo <= other_lo <= other_hi <= hi:
            return False
        if self.proto == "any":
            return True
        if other.proto != self.proto:
            return False
        if self.proto == "icmp" or self.all_ports:
            return True
        if other.all_ports:
            return False
        assert self.port_lo is not None and self.port_hi is not None
        assert other.port_lo is not None and other.port_hi is not None
        return self.port_lo <= other.port_lo and other.port_hi <= self.port_hi

    def sort_key(self) -> tuple[int, int, str, int, int]:
        """Deterministic ordering for rendering."""
        return (
            int(self.network.network_address),
            self.network.prefixlen,
            self.proto,
            -1 if self.port_lo is None else self.port_lo,
            -1 if self.port_hi is None else self.port_hi,
        )


@dataclass(frozen=True)
class GroupState:
    """One group: its connected members' tunnel IPs and what they may reach.

    Derived data (set elements, the grant set, an index for :meth:`covers`) is computed on
    first use and kept on the instance, so a caller that reuses an unchanged GroupState
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
        ports = sum(
            (2 if g.network.prefixlen == 0 else 1) * g.port_count
            for g in self.grants
            if g.port_lo is not None
        )
        if ports > MAX_SET_ELEMENTS:
            raise ValueError(
                f"group {gid}: port ranges expand to {ports} set elements "
                f"(limit {MAX_SET_ELEMENTS}); narrow them or grant all ports"
            )

    @functools.cached_property
    def _destinations(self) -> dict[GroupSetKind, frozenset[str]]:
        return group_destinations(self.grants)

    @functools.cached_property
    def grant_set(self) -> frozenset[Grant]:
        """The grants as a set (hashed once per group, not once per diff)."""
        return frozenset(self.grants)

    @functools.cached_property
    def member_elements(self) -> frozenset[str]:
        """Members as set elements (strings)."""
        return _ips(self.members)

    def set_specs(self, prefix: str) -> tuple[SetSpec, ...]:
        """The group's six sets (members first), kept for reuse by later states."""
        cache = self._set_specs
        specs = cache.get(prefix)
        if specs is None:
            m = SetSpec(group_set(prefix, self.group_id, "m"), "hash:ip", self.member_elements)
            specs = cache[prefix] = (
                m,
                *(
                    SetSpec(group_set(prefix, self.group_id, kind), _GROUP_SET_TYPES[kind], elems)
                    for kind, elems in self._destinations.items()
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
            index.setdefault((g._span[0], g.network.prefixlen), []).append(g)
        return tuple(sorted({plen for _, plen in index})), index

    def covers(self, grant: Grant) -> bool:
        """True when one of this group's grants alone covers ``grant``."""
        plens, index = self._by_network
        lo = grant._span[0]
        own = grant.network.prefixlen
        for plen in plens:
            if plen > own:
                break
            for h in index.get((lo & ~(0xFFFFFFFF >> plen), plen), ()):
                if h.covers(grant):
                    return True
        return False


def _all_instances(items: Iterable[object], cls: type) -> bool:
    # type() runs in C for every element; isinstance only for the few distinct types.
    return all(issubclass(t, cls) for t in set(map(type, items)))


@dataclass(frozen=True)
class DesiredState:
    """Everything the pod's firewall should enforce right now."""

    prefix: str
    tunnel_networks: tuple[IPv4Network, ...]
    uplink: str | None
    nat_members: frozenset[IPv4Address]
    all_clients: frozenset[IPv4Address]
    groups: tuple[GroupState, ...]
    allow_all: bool = False
    log_denied: bool = True
    nflog_group: int = 1

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
        fresh = _unchecked_clients(clients, self.tunnel_networks)
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
        _remember_checked(clients, self.tunnel_networks)
        if not nat_are_clients:
            extra = self.nat_members - self.all_clients
            raise ValueError(f"NAT members that are not connected clients: {_ip_list(extra)}")
        groups = self.groups
        if (
            _all_instances(groups, GroupState)
            and len({g.group_id for g in groups}) == len(groups)
            and all(g.members <= clients for g in groups)
        ):
            return  # the common case, checked in bulk; otherwise find the first problem
        seen: set[int] = set()
        for g in groups:
            if not isinstance(g, GroupState):
                raise ValueError(f"groups must hold GroupState, not {g!r}")
            if g.group_id in seen:
                raise ValueError(f"group {g.group_id} appears twice")
            seen.add(g.group_id)
            if not g.members <= self.all_clients:
                extra = g.members - self.all_clients
                raise ValueError(
                    f"group {g.group_id}: members that are not connected clients: {_ip_list(extra)}"
                )

    def sorted_groups(self) -> list[GroupState]:
        """Groups in rendering order."""
        return list(self._sorted_groups)

    # Derived data, computed on first use and kept on the (immutable) instance. A full
    # resync asks for the desired sets several times; diffs and revocation analysis look
    # groups up by id. cached_property writes the instance __dict__ directly, so it works on
    # a frozen dataclass; these are not fields, so eq, hash and repr ignore them.

    @functools.cached_property
    def _sorted_groups(self) -> tuple[GroupState, ...]:
        return tuple(sorted(self.groups, key=lambda g: g.group_id))

    @functools.cached_property
    def _groups_by(self) -> dict[int, GroupState]:
        return {g.group_id: g for g in self.groups}

    @functools.cached_property
    def _desired_sets(self) -> dict[str, SetSpec]:
        return _build_desired_sets(self)

    @functools.cached_property
    def _expected_rules(self) -> dict[tuple[str, str], tuple[str, ...]]:
        return _build_expected_rules(self)


# The client set most recently validated (addresses inside these tunnel networks). Successive
# states differ by a few clients, so only the difference, a set operation in C on stored
# hashes, needs the Python-speed checks. A cache only: results never depend on it.
_checked_memo: tuple[tuple[IPv4Network, ...], frozenset[IPv4Address]] | None = None


def _unchecked_clients(
    clients: frozenset[IPv4Address], networks: tuple[IPv4Network, ...]
) -> frozenset[IPv4Address]:
    memo = _checked_memo
    if memo is not None and memo[0] == networks:
        return clients - memo[1]
    return clients


def _remember_checked(clients: frozenset[IPv4Address], networks: tuple[IPv4Network, ...]) -> None:
    global _checked_memo
    _checked_memo = (networks, clients)


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


def grants_of(destination: str, proto: str, ports: str | None) -> list[Grant]:
    """One access rule as firewall grants (one per port range)."""
    from vpnfleet.core import netparse

    net = IPv4Network(destination)
    ranges = netparse.parse_ports(ports)
    if not ranges:
        return [Grant(net, proto)]  # type: ignore[arg-type]
    return [Grant(net, proto, r.lo, r.hi) for r in ranges]  # type: ignore[arg-type]


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


# --- sets ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class SetSpec:
    """One ipset as the desired state needs it."""

    name: str
    type: SetType
    elements: frozenset[str]

    @property
    def maxelem(self) -> int:
        """Capacity to create the set with."""
        return maxelem_for(len(self.elements))

    @functools.cached_property
    def sorted_elements(self) -> tuple[str, ...]:
        """Elements in rendering order (numeric)."""
        if self.type == "hash:ip":  # plain addresses: the C key alone gives the same order
            return tuple(sorted(self.elements, key=socket.inet_aton))
        return tuple(_sort_elements(self.elements))


def maxelem_for(count: int) -> int:
    """ipset ``maxelem`` for ``count`` elements: the default, or the power of two >= 2x."""
    return max(DEFAULT_MAXELEM, 1 << max(0, 2 * count - 1).bit_length())


def _net_elements(net: IPv4Network) -> tuple[str, ...]:
    # hash:net rejects /0; /32 is printed by ipset as a bare address.
    if net.prefixlen == 0:
        return ("0.0.0.0/1", "128.0.0.0/1")
    if net.prefixlen == 32:
        return (str(net.network_address),)
    return (str(net),)


def group_destinations(grants: Iterable[Grant]) -> dict[GroupSetKind, frozenset[str]]:
    """Elements of a group's five destination sets."""
    out: dict[GroupSetKind, set[str]] = {k: set() for k in ("d", "t", "u", "i", "n")}
    for g in grants:
        nets = _net_elements(g.network)
        if g.proto == "any":
            out["n"].update(nets)
        elif g.proto == "icmp":
            out["i"].update(nets)
        elif g.all_ports:
            out["t" if g.proto == "tcp" else "u"].update(nets)
        else:
            assert g.port_lo is not None and g.port_hi is not None
            ports = range(g.port_lo, g.port_hi + 1)
            out["d"].update(f"{n},{g.proto}:{p}" for n in nets for p in ports)
    return {k: frozenset(v) for k, v in out.items()}


def desired_sets(state: DesiredState) -> dict[str, SetSpec]:
    """Every set the state needs, keyed by name, in rendering order."""
    return dict(state._desired_sets)


def _build_desired_sets(state: DesiredState) -> dict[str, SetSpec]:
    p = state.prefix
    specs = [
        SetSpec(
            tun_set(p),
            "hash:net",
            tunnel_elements(state),
        ),
        SetSpec(clients_set(p), "hash:ip", _ips(state.all_clients)),
        SetSpec(nat_set(p), "hash:ip", _ips(state.nat_members)),
    ]
    for g in state._sorted_groups:
        specs += g.set_specs(p)
    return {s.name: s for s in specs}


def _sort_elements(elements: Iterable[str]) -> list[str]:
    # Numeric order so output is stable and readable; inet_aton keeps big sets fast.
    def key(e: str) -> tuple[bytes, int, str, int]:
        addr, _, rest = e.partition(",")
        ip, _, plen = addr.partition("/")
        proto, _, port = rest.partition(":")
        return (socket.inet_aton(ip), int(plen or 32), proto, int(port or 0))

    return sorted(elements, key=key)


def _create_line(name: str, spec: SetSpec) -> str:
    return f"create {name} {spec.type} family inet maxelem {spec.maxelem}"


# --- rules --------------------------------------------------------------------------------


def expected_rules(state: DesiredState) -> dict[tuple[str, str], tuple[str, ...]]:
    """The agent's chains, keyed by (table, chain), rules exactly as ``iptables -S`` prints."""
    return dict(state._expected_rules)


def _build_expected_rules(state: DesiredState) -> dict[tuple[str, str], tuple[str, ...]]:
    p = state.prefix
    fwd, post = fwd_chain(p), post_chain(p)
    tun, clients, nat = tun_set(p), clients_set(p), nat_set(p)
    rules = [
        f"-A {fwd} -m set ! --match-set {tun} src -m set ! --match-set {tun} dst -j RETURN",
        f"-A {fwd} -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT",
        f"-A {fwd} -m conntrack --ctstate INVALID -j DROP",
        f"-A {fwd} -p tcp -m tcp ! --tcp-flags FIN,SYN,RST,ACK SYN "
        f"-m set ! --match-set {tun} src -j DROP",
        f"-A {fwd} -m set ! --match-set {tun} src -m set --match-set {clients} dst "
        f"-m set ! --match-set {nat} dst -j ACCEPT",
        f"-A {fwd} -m set ! --match-set {tun} src -j DROP",
    ]
    if state.allow_all:
        rules.append(f"-A {fwd} -m set --match-set {clients} src -j ACCEPT")
    else:
        for g in state._sorted_groups:
            m = group_set(p, g.group_id, "m")

            def s(kind: GroupSetKind, gid: int = g.group_id) -> str:
                return group_set(p, gid, kind)

            rules += [
                f"-A {fwd} -m set --match-set {m} src -m set --match-set {s('d')} dst,dst "
                "-j ACCEPT",
                f"-A {fwd} -m set --match-set {m} src -m set --match-set {s('n')} dst -j ACCEPT",
                f"-A {fwd} -p tcp -m set --match-set {m} src -m set --match-set {s('t')} dst "
                "-j ACCEPT",
                f"-A {fwd} -p udp -m set --match-set {m} src -m set --match-set {s('u')} dst "
                "-j ACCEPT",
                f"-A {fwd} -p icmp -m set --match-set {m} src -m set --match-set {s('i')} dst "
                "-j ACCEPT",
            ]
    if state.log_denied:
        rules.append(
            f"-A {fwd} -m limit --limit {LOG_LIMIT} --limit-burst {LOG_BURST} "
            f"-j NFLOG --nflog-prefix {p}-deny --nflog-group {state.nflog_group}"
        )
    rules.append(f"-A {fwd} -j DROP")
    out_if = f"-o {state.uplink} " if state.uplink else ""
    masq = (
        f"-A {post} {out_if}-m set --match-set {nat} src "
        f"-m set ! --match-set {tun} dst -j MASQUERADE"
    )
    return {("filter", fwd): tuple(rules), ("nat", post): (masq,)}


# --- kernel snapshot ----------------------------------------------------------------------


@dataclass(frozen=True)
class KernelSet:
    """An ipset as the kernel reports it."""

    name: str
    type: str
    maxelem: int
    elements: frozenset[str]


@dataclass(frozen=True)
class KernelState:
    """The parts of the kernel's netfilter state that carry this prefix."""

    prefix: str
    sets: Mapping[str, KernelSet] = field(default_factory=dict)
    # (table, chain) -> rules as printed; a chain present with no rules maps to ().
    chains: Mapping[tuple[str, str], tuple[str, ...]] = field(default_factory=dict)
    jumps: Mapping[Jump, int] = field(default_factory=dict)

    @property
    def is_empty(self) -> bool:
        """True when nothing of ours is in the kernel."""
        return not self.sets and not self.chains and not any(self.jumps.values())


def parse_ipset_save(text: str, prefix: str) -> dict[str, KernelSet]:
    """Parse ``ipset save`` output, keeping only this prefix's sets."""
    own = _own_set_re(prefix)
    meta: dict[str, tuple[str, int]] = {}
    elements: dict[str, set[str]] = {}
    for line in text.splitlines():
        parts = line.split()
        if len(parts) < 3 or not own.match(parts[1]):
            continue
        if parts[0] == "create":
            maxelem = DEFAULT_MAXELEM
            if "maxelem" in parts:
                maxelem = int(parts[parts.index("maxelem") + 1])
            meta[parts[1]] = (parts[2], maxelem)
            elements.setdefault(parts[1], set())
        elif parts[0] == "add":
            elements.setdefault(parts[1], set()).add(parts[2])
    return {
        name: KernelSet(name, typ, maxelem, frozenset(elements.get(name, ())))
        for name, (typ, maxelem) in meta.items()
    }


def parse_iptables_s(
    text: str, table: Literal["filter", "nat"], prefix: str
) -> tuple[dict[tuple[str, str], tuple[str, ...]], dict[Jump, int]]:
    """Parse ``iptables -t TABLE -S`` output: our chains' rules and our jumps' counts."""
    ours = fwd_chain(prefix) if table == "filter" else post_chain(prefix)
    jump = next(j for j in jumps(prefix) if j.table == table)
    rules: list[str] | None = None
    count = 0
    for line in text.splitlines():
        line = line.strip()
        if line == f"-N {ours}":
            rules = rules if rules is not None else []
        elif line.startswith(f"-A {ours} "):
            rules = rules if rules is not None else []
            rules.append(line)
        elif line == jump.rule:
            count += 1
    chains: dict[tuple[str, str], tuple[str, ...]] = {}
    if rules is not None:
        chains[(table, ours)] = tuple(rules)
    return chains, {jump: count}


@dataclass(frozen=True)
class Flow:
    """A conntrack entry's original-direction tuple."""

    proto: str
    protonum: int
    src: IPv4Address
    dst: IPv4Address
    sport: int | None
    dport: int | None


def parse_conntrack(text: str) -> list[Flow]:
    """Parse ``conntrack -L`` output (IPv4, default format) into original-direction tuples."""
    flows: list[Flow] = []
    for line in text.splitlines():
        parts = line.split()
        if len(parts) < 3 or not parts[1].isdigit():
            continue
        first: dict[str, str] = {}
        for token in parts[2:]:
            key, sep, value = token.partition("=")
            if sep and key not in first:
                first[key] = value
        if "src" not in first or "dst" not in first:
            continue
        try:
            flows.append(
                Flow(
                    proto=parts[0],
                    protonum=int(parts[1]),
                    src=IPv4Address(first["src"]),
                    dst=IPv4Address(first["dst"]),
                    sport=int(first["sport"]) if "sport" in first else None,
                    dport=int(first["dport"]) if "dport" in first else None,
                )
            )
        except ValueError:
            continue  # IPv6 or malformed: not ours
    return flows


def flows_to_cut(state: DesiredState, flows: Iterable[Flow]) -> list[Flow]:
    """Open flows that ``state`` would not allow to start now.

    From a tunnel address: the source must be a connected client allowed to reach the
    destination. From elsewhere to a tunnel address: only gateway clients may be reached.
    Flows between two outside addresses are not ours. A client's flow to the pod itself is
    judged like forwarded traffic; cutting it is harmless, since local traffic is not
    filtered here and its next packet simply starts a new entry.
    """
    out: list[Flow] = []
    for f in flows:
        from_tun = any(f.src in n for n in state.tunnel_networks)
        to_tun = any(f.dst in n for n in state.tunnel_networks)
        if from_tun:
            if not is_allowed(state, f.src, f.proto, f.dst, f.dport):
                out.append(f)
        elif to_tun and (f.dst not in state.all_clients or f.dst in state.nat_members):
            out.append(f)
    return out


# --- rendering ----------------------------------------------------------------------------


def render_ipset(state: DesiredState, kernel: KernelState | None = None) -> str:
    """``ipset -exist restore`` text that makes every desired set exact.

    Without ``kernel`` the sets are created if missing, flushed and filled (fine for a fresh
    namespace). With ``kernel`` existing sets are rebuilt into a twin and swapped in, left-over
    twins are destroyed first, and sets the state no longer wants are flushed.
    """
    specs = desired_sets(state)
    lines: list[str] = []
    if kernel is not None:
        wrong = mismatched_sets(state, kernel)
        if wrong:
            raise SetTypeMismatch(wrong)
        lines += [f"destroy {n}" for n in sorted(kernel.sets) if n.endswith(TEMP_SUFFIX)]
    for name, spec in specs.items():
        elems = spec.sorted_elements
        if kernel is None:
            lines += [_create_line(name, spec), f"flush {name}"]
            lines += [f"add {name} {e}" for e in elems]
        elif name not in kernel.sets:
            lines.append(_create_line(name, spec))
            lines += [f"add {name} {e}" for e in elems]
        else:
            tmp = name + TEMP_SUFFIX
            lines.append(_create_line(tmp, spec))
            lines += [f"add {tmp} {e}" for e in elems]
            lines += [f"swap {tmp} {name}", f"destroy {tmp}"]
    lines += [f"flush {n}" for n in stale_sets(state, kernel)] if kernel is not None else []
    return "\n".join(lines) + "\n"


class SetTypeMismatch(ValueError):
    """A set with a desired name exists in the kernel with another type."""

    def __init__(self, names: list[str]) -> None:
        super().__init__(f"ipsets exist with the wrong type: {', '.join(names)}")
        self.names = names


def mismatched_sets(state: DesiredState, kernel: KernelState) -> list[str]:
    """Desired set names that exist in the kernel with a different type (need recreating)."""
    specs = desired_sets(state)
    return sorted(n for n, ks in kernel.sets.items() if n in specs and ks.type != specs[n].type)


def stale_sets(state: DesiredState, kernel: KernelState) -> list[str]:
    """Our live (non-temporary) sets in the kernel that the state does not want."""
    want = desired_sets(state)
    return sorted(n for n in kernel.sets if n not in want and not n.endswith(TEMP_SUFFIX))


def render_iptables(state: DesiredState, kernel: KernelState | None = None) -> str:
    """``iptables-restore --noflush`` text: replace our chains, fix the jumps.

    Declaring ``:CHAIN - [0:0]`` under ``--noflush`` creates or flushes just that chain; the
    built-in chains are only touched by inserting a missing jump at position 1 or deleting
    duplicates of it (``kernel`` gives the current counts; without it jumps are inserted).
    """
    rules = expected_rules(state)
    out: list[str] = []
    for jump in jumps(state.prefix):
        present = 0 if kernel is None else kernel.jumps.get(jump, 0)
        out.append(f"*{jump.table}")
        out.append(f":{jump.target} - [0:0]")
        out += rules[(jump.table, jump.target)]
        if present == 0:
            out.append(f"-I {jump.chain} 1 -j {jump.target}")
        out += [f"-D {jump.chain} -j {jump.target}"] * max(0, present - 1)
        out.append("COMMIT")
    return "\n".join(out) + "\n"


def render_full(state: DesiredState, kernel: KernelState | None = None) -> tuple[str, str]:
    """(ipset restore text, iptables-restore text) for a complete resync. Apply in that order,
    then :func:`render_cleanup`."""
    return render_ipset(state, kernel), render_iptables(state, kernel)


def render_cleanup(state: DesiredState, kernel: KernelState) -> str:
    """ipset text destroying sets the state no longer wants; run after the iptables step."""
    return "".join(f"destroy {n}\n" for n in stale_sets(state, kernel))


def render_lockdown(
    prefix: str, tunnel_networks: Iterable[IPv4Network], kernel: KernelState
) -> str:
    """iptables text that drops all tunnel traffic without referencing any set.

    Used to release every set reference (so sets can be recreated) without failing open.
    """
    fwd, post = fwd_chain(prefix), post_chain(prefix)
    nets = list(tunnel_networks)
    out = ["*filter", f":{fwd} - [0:0]"]
    out += [f"-A {fwd} -s {n} -j DROP" for n in nets] + [f"-A {fwd} -d {n} -j DROP" for n in nets]
    if kernel.jumps.get(jumps(prefix)[0], 0) == 0:
        out.append(f"-I FORWARD 1 -j {fwd}")
    out += ["COMMIT", "*nat", f":{post} - [0:0]", "COMMIT"]
    return "\n".join(out) + "\n"


def render_teardown(kernel: KernelState) -> tuple[str, str]:
    """(iptables-restore text, ipset text) removing our jumps, chains and sets."""
    p = kernel.prefix
    ipt: list[str] = []
    for jump in jumps(p):
        has_chain = (jump.table, jump.target) in kernel.chains
        count = kernel.jumps.get(jump, 0)
        if not has_chain and not count:
            continue
        ipt.append(f"*{jump.table}")
        ipt += [f"-D {jump.chain} -j {jump.target}"] * count
        if has_chain:
            ipt += [f"-F {jump.target}", f"-X {jump.target}"]
        ipt.append("COMMIT")
    ipset = "".join(f"destroy {n}\n" for n in sorted(kernel.sets))
    return ("\n".join(ipt) + "\n" if ipt else ""), ipset


# --- incremental changes --------------------------------------------------------------------


@dataclass(frozen=True)
class SetOp:
    """Add or delete one set element."""

    op: Literal["add", "del"]
    set_name: str
    element: str

    def line(self) -> str:
        """The ipset restore line."""
        return f"{self.op} {self.set_name} {self.element}"


@dataclass(frozen=True)
class RevokedFlow:
    """A client lost access: its open flows matching ``grant`` (None: all of them) must go."""

    client: IPv4Address
    grant: Grant | None


@dataclass(frozen=True)
class StateDiff:
    """What it takes to go from one state to the next."""

    ops: tuple[SetOp, ...]
    needs_full: bool
    revoked_flows: tuple[RevokedFlow, ...]
    reasons: tuple[str, ...] = ()


_ANY = Grant(IPv4Network("0.0.0.0/0"), "any")


def _set_role(prefix: str, name: str) -> str:
    if name == tun_set(prefix):
        return "tun"
    if name == nat_set(prefix):
        return "nat"
    if name == clients_set(prefix) or name.endswith("-m"):
        return "access"
    return "dest"


# Apply order: widen "ours" first; remove access, then destinations, then NAT; add NAT before
# destinations and access (a client is never allowed out before it is NAT'd); shrink "ours" last.
_ORDER = {
    ("add", "tun"): 0,
    ("del", "access"): 1,
    ("del", "dest"): 2,
    ("del", "nat"): 3,
    ("add", "nat"): 4,
    ("add", "dest"): 5,
    ("add", "access"): 6,
    ("del", "tun"): 7,
}


def diff(old: DesiredState, new: DesiredState) -> StateDiff:
    """Element operations from ``old`` to ``new``, whether rules must change, and revocations.

    When ``needs_full`` is set the caller applies :func:`render_full` instead of ``ops``
    (``ops`` is then empty); ``revoked_flows`` is valid either way.

    The work is proportional to what changed: sets and groups that are the same objects in
    both states are skipped, and set differences run on frozensets (in C, on stored hashes).
    A caller that keeps unchanged :class:`GroupState` objects and client sets between states
    gets a connect or a grant change in under a millisecond at thousands of clients.
    """
    reasons: list[str] = []
    if old.prefix != new.prefix:
        reasons.append("prefix changed")
    if old.uplink != new.uplink:
        reasons.append("uplink changed")
    if old.allow_all != new.allow_all:
        reasons.append("allow_all changed")
    if (old.log_denied, old.nflog_group) != (new.log_denied, new.nflog_group):
        reasons.append("logging changed")
    old_groups, new_groups = old._groups_by, new._groups_by
    if old_groups.keys() != new_groups.keys():
        reasons.append("groups added or removed")

    ops: list[SetOp] = []
    # Differences of address sets, reused by the revocation analysis (None: not computed).
    gone: frozenset[IPv4Address] | None = None
    left: dict[int, frozenset[IPv4Address]] = {}
    if not reasons:
        p = new.prefix
        # (set, size before, size after, elements removed, elements added), only for sets
        # that may have changed; differences are taken on address objects before stringifying.
        changes: list[tuple[str, int, int, frozenset[str], frozenset[str]]] = []

        def ip_change(
            name: str, before: frozenset[IPv4Address], after: frozenset[IPv4Address]
        ) -> frozenset[IPv4Address]:
            if before is after:
                return frozenset()
            removed = before - after
            changes.append((name, len(before), len(after), _ips(removed), _ips(after - before)))
            return removed

        def str_change(name: str, before: frozenset[str], after: frozenset[str]) -> None:
            if before is not after:
                changes.append((name, len(before), len(after), before - after, after - before))

        if old.tunnel_networks != new.tunnel_networks:
            str_change(tun_set(p), tunnel_elements(old), tunnel_elements(new))
        gone = ip_change(clients_set(p), old.all_clients, new.all_clients)
        ip_change(nat_set(p), old.nat_members, new.nat_members)
        for g in new._sorted_groups:
            og = old_groups[g.group_id]
            if og is g:
                continue
            left[g.group_id] = ip_change(group_set(p, g.group_id, "m"), og.members, g.members)
            if og.grants != g.grants:
                od, nd = og._destinations, g._destinations
                for kind in nd:
                    str_change(group_set(p, g.group_id, kind), od[kind], nd[kind])
        for name, n_before, n_after, removed, added in changes:
            if maxelem_for(n_after) > maxelem_for(n_before):
                reasons.append(f"set {name} needs a larger maxelem")
            ops += [SetOp("del", name, e) for e in _sort_elements(removed)]
            ops += [SetOp("add", name, e) for e in _sort_elements(added)]
        ops.sort(key=lambda o: _ORDER[(o.op, _set_role(p, o.set_name))])
    return StateDiff(
        ops=() if reasons else tuple(ops),
        needs_full=bool(reasons),
        revoked_flows=tuple(_revoked_flows(old, new, gone, left)),
        reasons=tuple(reasons),
    )


def tunnel_elements(state: DesiredState) -> frozenset[str]:
    """Elements of the tunnel-network set."""
    return frozenset(e for n in state.tunnel_networks for e in _net_elements(n))


def _ips(ips: Iterable[IPv4Address]) -> frozenset[str]:
    return frozenset(map(str, ips))


def effective_grants(state: DesiredState, client: IPv4Address) -> frozenset[Grant]:
    """All grants ``client`` holds through its groups (everything when allow_all)."""
    if client not in state.all_clients:
        return frozenset()
    if state.allow_all:
        return frozenset({_ANY})
    return frozenset(gr for g in state.groups if client in g.members for gr in g.grants)


def revoked_flows(old: DesiredState, new: DesiredState) -> list[RevokedFlow]:
    """Flows that were allowed under ``old`` and may not be under ``new``.

    A grant counts as revoked for a client unless one grant the client holds in ``new``
    covers it alone; the runner re-checks each open flow with :func:`is_allowed` before
    deleting it, so overlap across several grants never kills a flow that is still allowed.
    Only clients that left a group, or belong to a group that lost a grant, are examined
    (connecting, joining a group or gaining a grant cannot revoke anything); leaving
    allow_all examines every client.
    """
    return _revoked_flows(old, new, None, {})


def _revoked_flows(
    old: DesiredState,
    new: DesiredState,
    gone: frozenset[IPv4Address] | None,
    left: Mapping[int, frozenset[IPv4Address]],
) -> list[RevokedFlow]:
    # ``gone``: clients that disconnected, ``left``: per group, members that left it, when
    # diff() has already computed them (set differences of unshared addresses cost __eq__).
    if gone is None:
        gone = old.all_clients - new.all_clients
    out = [RevokedFlow(c, None) for c in sorted(gone)]
    if new.allow_all:
        return out
    old_groups, new_groups = old._groups_by, new._groups_by
    # Per group: the grants a member loses by staying in it (all of them if it is gone).
    dropped: dict[int, frozenset[Grant]] = {}
    touched: list[frozenset[IPv4Address]] = []  # clients that may have lost something
    for gid, og in old_groups.items():
        ng = new_groups.get(gid)
        if ng is og:
            continue
        if ng is None:
            dropped[gid] = og.grant_set
            touched.append(og.members)
            continue
        if ng.grants != og.grants:
            removed = og.grant_set - ng.grant_set
            if removed:
                dropped[gid] = removed
                touched.append(og.members)
                continue
        if ng.members is not og.members:
            known = left.get(gid)
            touched.append(og.members - ng.members if known is None else known)
    if old.allow_all:
        candidates = old.all_clients & new.all_clients
    else:
        candidates = frozenset[IPv4Address]().union(*touched) & new.all_clients
    if not candidates:
        return out
    was = {} if old.allow_all else _memberships(old, candidates)
    now = _memberships(new, candidates)
    none: tuple[int, ...] = ()
    for client in sorted(candidates):
        now_ids = now.get(client, none)
        if old.allow_all:
            lost = frozenset({_ANY})
        else:
            # A group left takes all its grants; a group kept takes the grants it dropped.
            lost = frozenset[Grant]().union(
                *(
                    old_groups[gid].grant_set if gid not in now_ids else dropped[gid]
                    for gid in was.get(client, none)
                    if gid not in now_ids or gid in dropped
                )
            )
            if not lost:
                continue
        after_groups = [new_groups[gid] for gid in now_ids]
        kept = frozenset[Grant]().union(*(g.grant_set for g in after_groups))
        for g in sorted(lost - kept, key=Grant.sort_key):
            if not any(ag.covers(g) for ag in after_groups):
                out.append(RevokedFlow(client, g))
    return out


def _memberships(
    state: DesiredState, clients: frozenset[IPv4Address]
) -> dict[IPv4Address, tuple[int, ...]]:
    """Group ids of each of ``clients`` (only clients in at least one group appear)."""
    out: dict[IPv4Address, tuple[int, ...]] = {}
    for g in state.groups:
        # Both walk the smaller set with its stored hashes: cheap for few clients.
        if not g.members.isdisjoint(clients):
            for c in g.members & clients:
                out[c] = (*out.get(c, ()), g.group_id)
    return out


def render_ops(ops: Iterable[SetOp]) -> str:
    """``ipset -exist restore`` text for element operations (in the given order)."""
    return "".join(op.line() + "\n" for op in ops)


# --- drift --------------------------------------------------------------------------------


def drift(state: DesiredState, kernel: KernelState, sample: int = 3) -> list[str]:
    """Human-readable differences between the kernel and the desired state (empty: in sync)."""
    out: list[str] = []
    specs = desired_sets(state)
    for name, spec in specs.items():
        ks = kernel.sets.get(name)
        if ks is None:
            out.append(f"ipset {name} is missing")
            continue
        if ks.type != spec.type:
            out.append(f"ipset {name} has type {ks.type}, expected {spec.type}")
            continue
        missing = spec.elements - ks.elements
        extra = ks.elements - spec.elements
        if missing:
            out.append(f"ipset {name} lacks {len(missing)} element(s): {_sample(missing, sample)}")
        if extra:
            out.append(
                f"ipset {name} has {len(extra)} unexpected element(s): {_sample(extra, sample)}"
            )
    for name in sorted(kernel.sets):
        if name not in specs:
            out.append(f"ipset {name} is stale (not in the desired state)")
    for (table, chain), want in expected_rules(state).items():
        have = kernel.chains.get((table, chain))
        if have is None:
            out.append(f"chain {chain} is missing from table {table}")
            continue
        if list(have) == list(want):
            continue
        missing_rules = [r for r in want if r not in have]
        extra_rules = [r for r in have if r not in want]
        out += [f"chain {chain} lacks rule: {r}" for r in missing_rules]
        out += [f"chain {chain} has unexpected rule: {r}" for r in extra_rules]
        if not missing_rules and not extra_rules:
            out.append(f"chain {chain} has its rules out of order")
    for jump in jumps(state.prefix):
        n = kernel.jumps.get(jump, 0)
        if n == 0:
            out.append(f"jump {jump.chain} -> {jump.target} ({jump.table}) is missing")
        elif n > 1:
            out.append(f"jump {jump.chain} -> {jump.target} ({jump.table}) appears {n} times")
    return out


def _sample(elements: Collection[str], n: int) -> str:
    items = _sort_elements(elements)
    text = ", ".join(items[:n])
    return text + (", ..." if len(items) > n else "")
