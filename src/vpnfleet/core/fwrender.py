"""A desired firewall state as ``ipset restore`` and ``iptables-restore --noflush`` text.
Pure: no I/O (``vpnfleet.agent.dataplane`` runs the commands).

Layout (``P`` = prefix, e.g. ``vpnf``; chains use the upper-case prefix)
-------------------------------------------------------------------------
Rule count depends on the number of groups only: connect, disconnect and permission changes
are set element changes. Names come from :mod:`vpnfleet.core.fwnames`.

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
port ranges are expanded (a grant whose range covers 1-65535 counts as all ports), up to
:data:`~vpnfleet.core.fwlimits.MAX_FIREWALL_ELEMENTS` elements for all groups together. Sets
are sized with ``maxelem`` from their element count. ``hash:net`` types reject ``/0``; it is
stored as two ``/1`` halves. ICMP grants carry no type filter: replies and errors of allowed
flows pass as ESTABLISHED/RELATED anyway.

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
Incremental changes between two states are :mod:`vpnfleet.core.fwdiff`'s.
"""

from __future__ import annotations

import functools
import socket
from collections.abc import Iterable
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network
from typing import TYPE_CHECKING, Literal

from vpnfleet.core.fwnames import (
    TEMP_SUFFIX,
    GroupSetKind,
    clients_set,
    fwd_chain,
    group_set,
    jumps,
    nat_set,
    post_chain,
    tun_set,
)
from vpnfleet.core.grants import Grant

if TYPE_CHECKING:
    # Type-only: fwstate imports this module (a state caches what is rendered from it), and
    # this module only reads a state's fields, so nothing here needs fwstate at run time.
    from vpnfleet.core.fwkernel import KernelState
    from vpnfleet.core.fwstate import DesiredState

DEFAULT_MAXELEM = 65536
LOG_LIMIT = "10/sec"
LOG_BURST = 20

SetType = Literal["hash:ip", "hash:net", "hash:net,port"]
GROUP_SET_TYPES: dict[GroupSetKind, SetType] = {
    "m": "hash:ip",
    "d": "hash:net,port",
    "t": "hash:net",
    "u": "hash:net",
    "i": "hash:net",
    "n": "hash:net",
}


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
        return tuple(sort_elements(self.elements))


def maxelem_for(count: int) -> int:
    """ipset ``maxelem`` for ``count`` elements: the default, or the power of two >= 2x."""
    return max(DEFAULT_MAXELEM, 1 << max(0, 2 * count - 1).bit_length())


def ip_elements(ips: Iterable[IPv4Address]) -> frozenset[str]:
    """Addresses as ``hash:ip`` set elements."""
    return frozenset(map(str, ips))


def net_elements(net: IPv4Network) -> tuple[str, ...]:
    """A network as ``hash:net`` elements: /0 (which hash:net rejects) as two /1 halves, /32
    as a bare address (the way ipset prints it)."""
    if net.prefixlen == 0:
        return ("0.0.0.0/1", "128.0.0.0/1")
    if net.prefixlen == 32:
        return (str(net.network_address),)
    return (str(net),)


def tunnel_elements(state: DesiredState) -> frozenset[str]:
    """Elements of the tunnel-network set."""
    return frozenset(e for n in state.tunnel_networks for e in net_elements(n))


DestinationKind = Literal["d", "t", "u", "i", "n"]


def destination_kind(grant: Grant) -> DestinationKind:
    """Which of a group's destination sets holds ``grant``: ``d`` (one element per network
    and port), or one element per network in ``t``/``u`` (tcp/udp, all ports), ``i`` (icmp)
    or ``n`` (any protocol). :mod:`vpnfleet.core.fwlimits` counts with this too."""
    if grant.proto == "any":
        return "n"
    if grant.proto == "icmp":
        return "i"
    if grant.all_ports:
        return "t" if grant.proto == "tcp" else "u"
    return "d"


def group_destinations(grants: Iterable[Grant]) -> dict[GroupSetKind, frozenset[str]]:
    """Elements of a group's five destination sets."""
    out: dict[GroupSetKind, set[str]] = {k: set() for k in ("d", "t", "u", "i", "n")}
    for g in grants:
        nets = net_elements(g.network)
        kind = destination_kind(g)
        if kind != "d":
            out[kind].update(nets)
        else:
            assert g.port_lo is not None and g.port_hi is not None
            ports = range(g.port_lo, g.port_hi + 1)
            out["d"].update(f"{n},{g.proto}:{p}" for n in nets for p in ports)
    return {k: frozenset(v) for k, v in out.items()}


def desired_sets(state: DesiredState) -> dict[str, SetSpec]:
    """Every set the state needs, keyed by name, in rendering order."""
    return dict(state._desired_sets)


def build_desired_sets(state: DesiredState) -> dict[str, SetSpec]:
    """What :func:`desired_sets` returns, computed afresh (the state caches it: use that)."""
    p = state.prefix
    specs = [
        SetSpec(tun_set(p), "hash:net", tunnel_elements(state)),
        SetSpec(clients_set(p), "hash:ip", ip_elements(state.all_clients)),
        SetSpec(nat_set(p), "hash:ip", ip_elements(state.nat_members)),
    ]
    for g in state.sorted_groups:
        specs += g.set_specs(p)
    return {s.name: s for s in specs}


def sort_elements(elements: Iterable[str]) -> list[str]:
    """Set elements in numeric order (address, prefix length, protocol, port): stable,
    readable output; inet_aton keeps big sets fast."""

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


def build_expected_rules(state: DesiredState) -> dict[tuple[str, str], tuple[str, ...]]:
    """What :func:`expected_rules` returns, computed afresh (the state caches it: use that)."""
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
        for g in state.sorted_groups:
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
