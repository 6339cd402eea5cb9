"""Firewall states the unit tests of the pure firewall modules share: a tunnel network,
example grants, a state builder, hypothesis strategies for random states and the kernel
snapshot a state would leave behind."""

from __future__ import annotations

from ipaddress import IPv4Address, IPv4Network

from hypothesis import strategies as st

from vpnfleet.core import fwnames, fwrender
from vpnfleet.core.fwkernel import KernelSet, KernelState
from vpnfleet.core.fwstate import DesiredState, GroupAccess
from vpnfleet.core.grants import Grant

TUN = IPv4Network("10.8.0.0/16")
P = "vpnf"


def ip(n: int) -> IPv4Address:
    return TUN[n + 2]


def net(text: str) -> IPv4Network:
    return IPv4Network(text)


def nth_net(base: str, n: int) -> IPv4Network:
    """The n-th /24 after ``base``."""
    return IPv4Network((int(IPv4Address(base)) + 256 * n, 24))


def state(
    groups: dict[int, tuple[set[IPv4Address], list[Grant]]],
    *,
    clients: set[IPv4Address] | None = None,
    nat: set[IPv4Address] | None = None,
    allow_all: bool = False,
    uplink: str | None = "eth0",
    log_denied: bool = True,
) -> DesiredState:
    members = {m for ms, _ in groups.values() for m in ms}
    all_clients = members if clients is None else clients
    return DesiredState(
        prefix=P,
        tunnel_networks=(TUN,),
        uplink=uplink,
        nat_members=frozenset(all_clients if nat is None else nat),
        all_clients=frozenset(all_clients),
        groups=tuple(GroupAccess(g, frozenset(m), tuple(gr)) for g, (m, gr) in groups.items()),
        allow_all=allow_all,
        log_denied=log_denied,
    )


WEB = Grant(net("10.1.0.0/24"), "tcp", 80, 81)
DNS = Grant(net("10.1.2.3/32"), "udp", 53)


def fwd_rules(s: DesiredState) -> tuple[str, ...]:
    return fwrender.expected_rules(s)[("filter", fwnames.fwd_chain(P))]


def sets_of(s: DesiredState) -> dict[str, frozenset[str]]:
    return {n: spec.elements for n, spec in fwrender.desired_sets(s).items()}


def kernel_from(s: DesiredState, jump_count: int = 1) -> KernelState:
    specs = fwrender.desired_sets(s)
    return KernelState(
        prefix=P,
        sets={n: KernelSet(n, sp.type, sp.maxelem, sp.elements) for n, sp in specs.items()},
        chains=dict(fwrender.expected_rules(s)),
        jumps={j: jump_count for j in fwnames.jumps(P)},
    )


addresses = st.integers(min_value=0, max_value=40).map(ip)


port_grants = st.builds(
    lambda n, lo, span, proto: Grant(nth_net("10.1.0.0", n), proto, lo, lo + span),
    st.integers(0, 3),
    st.integers(1, 100),
    st.integers(0, 5),
    st.sampled_from(["tcp", "udp"]),
)
whole_grants = st.builds(
    lambda n, proto: Grant(nth_net("10.2.0.0", n), proto),
    st.integers(0, 3),
    st.sampled_from(["tcp", "udp", "icmp", "any"]),
)
grants = st.one_of(port_grants, whole_grants)
group_specs = st.dictionaries(
    st.integers(0, 4), st.tuples(st.sets(addresses, max_size=8), st.lists(grants, max_size=4))
)


@st.composite
def states(draw: st.DrawFn, group_ids: list[int]) -> DesiredState:
    spec = draw(group_specs)
    groups = {g: spec.get(g, (set(), [])) for g in group_ids}
    members = {m for ms, _ in groups.values() for m in ms}
    extra = draw(st.sets(addresses, max_size=4))
    clients = members | extra
    nat = (
        draw(st.sets(st.sampled_from(sorted(clients)), max_size=len(clients))) if clients else set()
    )
    return state(groups, clients=clients, nat=nat)
