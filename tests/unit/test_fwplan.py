"""The pure dataplane plan: layout, rendering, diffs, drift and parsers."""

from __future__ import annotations

import random
from ipaddress import IPv4Address, IPv4Network
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vpnfleet.core import fwplan
from vpnfleet.core.fwplan import (
    DesiredState,
    Grant,
    GroupState,
    KernelSet,
    KernelState,
    RevokedFlow,
    SetTypeMismatch,
)

TUN = IPv4Network("10.8.0.0/16")
P = "vpnf"


def ip(n: int) -> IPv4Address:
    return TUN[n + 2]


def net(text: str) -> IPv4Network:
    return IPv4Network(text)


def _nth_net(base: str, n: int) -> IPv4Network:
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
        groups=tuple(GroupState(g, frozenset(m), tuple(gr)) for g, (m, gr) in groups.items()),
        allow_all=allow_all,
        log_denied=log_denied,
    )


WEB = Grant(net("10.1.0.0/24"), "tcp", 80, 81)
DNS = Grant(net("10.1.2.3/32"), "udp", 53)


def fwd_rules(s: DesiredState) -> tuple[str, ...]:
    return fwplan.expected_rules(s)[("filter", fwplan.fwd_chain(P))]


def sets_of(s: DesiredState) -> dict[str, frozenset[str]]:
    return {n: spec.elements for n, spec in fwplan.desired_sets(s).items()}


# --- layout -----------------------------------------------------------------------------------


def test_rendering_is_deterministic_whatever_the_input_order() -> None:
    members = [ip(i) for i in range(50)]
    grants = [WEB, DNS, Grant(net("10.2.0.0/16"), "any")]
    one = state({1: (set(members), grants), 2: ({members[0]}, [DNS])})
    random.Random(7).shuffle(members)
    two = state({2: ({members[members.index(ip(0))]}, [DNS]), 1: (set(members), grants[::-1])})
    assert fwplan.render_full(one) == fwplan.render_full(two)
    assert fwplan.render_full(one) == fwplan.render_full(one)


@pytest.mark.parametrize("n_groups", [1, 200])
def test_rule_count_depends_on_groups_not_members_or_destinations(n_groups: int) -> None:
    def build(members: int, dests: int) -> DesiredState:
        clients = [ip(i) for i in range(members)]
        grants = [Grant(_nth_net("10.100.0.0", d), "tcp", 443) for d in range(dests)]
        return state({g: (set(clients), grants) for g in range(n_groups)})

    small, large = build(10, 1), build(5000, 50)
    per_group = 5
    fixed = 6 + 2  # preamble, log, drop
    for s in (small, large):
        assert len(fwd_rules(s)) == fixed + per_group * n_groups
    assert fwplan.render_iptables(small).count("\n") == fwplan.render_iptables(large).count("\n")
    assert sum(len(e) for e in sets_of(large).values()) > 10 * sum(
        len(e) for e in sets_of(small).values()
    )


def test_group_sets_and_element_encoding() -> None:
    s = state(
        {
            4: (
                {ip(0)},
                [
                    WEB,
                    DNS,
                    Grant(net("10.3.0.0/16"), "tcp"),
                    Grant(net("10.4.0.0/16"), "udp", 1, 65535),  # all ports: no expansion
                    Grant(net("0.0.0.0/0"), "icmp"),
                    Grant(net("10.5.5.5/32"), "any"),
                ],
            )
        }
    )
    specs = fwplan.desired_sets(s)
    assert {n: sp.type for n, sp in specs.items() if "-g4-" in n} == {
        "vpnf-g4-m": "hash:ip",
        "vpnf-g4-d": "hash:net,port",
        "vpnf-g4-t": "hash:net",
        "vpnf-g4-u": "hash:net",
        "vpnf-g4-i": "hash:net",
        "vpnf-g4-n": "hash:net",
    }
    assert specs["vpnf-g4-d"].elements == {
        "10.1.0.0/24,tcp:80",
        "10.1.0.0/24,tcp:81",
        "10.1.2.3,udp:53",  # /32 as ipset prints it
    }
    assert specs["vpnf-g4-t"].elements == {"10.3.0.0/16"}
    assert specs["vpnf-g4-u"].elements == {"10.4.0.0/16"}
    assert specs["vpnf-g4-i"].elements == {"0.0.0.0/1", "128.0.0.0/1"}  # hash:net rejects /0
    assert specs["vpnf-g4-n"].elements == {"10.5.5.5"}
    assert specs["vpnf-tun"].elements == {"10.8.0.0/16"}
    assert all(len(n) <= 31 for n in specs)


def test_nat_rule_uses_uplink_and_spares_client_to_client_traffic() -> None:
    with_uplink = fwplan.expected_rules(state({}, clients={ip(0)}))[("nat", "VPNF-POST")]
    assert with_uplink == (
        "-A VPNF-POST -o eth0 -m set --match-set vpnf-nat src "
        "-m set ! --match-set vpnf-tun dst -j MASQUERADE",
    )
    bare = fwplan.expected_rules(state({}, clients={ip(0)}, uplink=None))[("nat", "VPNF-POST")]
    assert "-o " not in bare[0]


def test_allow_all_is_one_rule_and_logging_is_optional() -> None:
    s = state({1: ({ip(0)}, [WEB])}, allow_all=True, log_denied=False)
    rules = fwd_rules(s)
    assert rules[-2:] == (
        "-A VPNF-FWD -m set --match-set vpnf-clients src -j ACCEPT",
        "-A VPNF-FWD -j DROP",
    )
    assert not any("NFLOG" in r or "vpnf-g1" in r for r in rules)
    logged = fwd_rules(state({1: ({ip(0)}, [WEB])}))
    assert "-m limit" in logged[-2] and "--nflog-group 1" in logged[-2]


def test_large_port_ranges_get_room_and_are_capped() -> None:
    wide = Grant(net("10.1.0.0/24"), "tcp", 1000, 40999)
    spec = fwplan.desired_sets(state({1: ({ip(0)}, [wide])}))["vpnf-g1-d"]
    assert len(spec.elements) == 40000
    assert f"create vpnf-g1-d hash:net,port family inet maxelem {spec.maxelem}" in (
        fwplan.render_ipset(state({1: ({ip(0)}, [wide])}))
    )
    assert spec.maxelem >= 2 * 40000
    too_wide = [Grant(_nth_net("10.1.0.0", i), "tcp", 2, 65534) for i in range(17)]
    with pytest.raises(ValueError, match="expand to"):
        GroupState(1, frozenset(), tuple(too_wide))


# --- validation -------------------------------------------------------------------------------


@pytest.mark.parametrize("prefix", ["", "VPNF", "vpn-f", "1vpn", "abcdefghijk", "vp nf", "vpnf."])
def test_bad_prefix_is_refused(prefix: str) -> None:
    with pytest.raises(ValueError, match="invalid dataplane prefix"):
        fwplan.validate_prefix(prefix)
    with pytest.raises(ValueError, match="invalid dataplane prefix"):
        DesiredState(prefix, (TUN,), None, frozenset(), frozenset(), ())


@pytest.mark.parametrize(
    ("proto", "lo", "hi", "message"),
    [
        ("tcp", 90, 80, "invalid port range"),
        ("tcp", 1, 70000, "invalid port range"),
        ("udp", -1, 5, "invalid port range"),
        ("tcp", None, 80, "port_hi without port_lo"),
        ("icmp", 8, None, "only valid for tcp and udp"),
        ("any", 80, 80, "only valid for tcp and udp"),
        ("sctp", None, None, "protocol must be one of"),
        ("tcp", True, None, "must be integers"),
    ],
)
def test_bad_grant_is_refused(proto: str, lo: int | None, hi: int | None, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        Grant(net("10.0.0.0/8"), proto, lo, hi)  # type: ignore[arg-type]


def test_single_port_grant_and_string_network() -> None:
    assert Grant(net("10.0.0.0/8"), "tcp", 22).port_hi == 22
    with pytest.raises(ValueError, match="IPv4Network"):
        Grant("10.0.0.0/8", "tcp")  # type: ignore[arg-type]


def test_inconsistent_states_are_refused() -> None:
    outside = IPv4Address("192.0.2.1")
    with pytest.raises(ValueError, match="outside the tunnel networks"):
        state({}, clients={outside})
    with pytest.raises(ValueError, match="NAT members that are not connected"):
        state({}, clients={ip(0)}, nat={ip(1)})
    with pytest.raises(ValueError, match="members that are not connected"):
        state({1: ({ip(1)}, [])}, clients={ip(0)})
    with pytest.raises(ValueError, match="appears twice"):
        DesiredState(
            P,
            (TUN,),
            None,
            frozenset(),
            frozenset(),
            (GroupState(1, frozenset(), ()), GroupState(1, frozenset(), ())),
        )
    with pytest.raises(ValueError, match="group id"):
        GroupState(-1, frozenset(), ())
    with pytest.raises(ValueError, match="uplink"):
        state({}, clients=set(), uplink="eth0; rm -rf /")
    with pytest.raises(ValueError, match="tunnel_networks"):
        DesiredState(P, (), None, frozenset(), frozenset(), ())


# --- grants and policy --------------------------------------------------------------------------


def test_grant_matching_and_covering() -> None:
    dst = IPv4Address("10.1.0.7")
    assert WEB.matches("tcp", dst, 80) and WEB.matches("tcp", dst, 81)
    assert not WEB.matches("tcp", dst, 82) and not WEB.matches("udp", dst, 80)
    assert not WEB.matches("tcp", IPv4Address("10.1.1.1"), 80)
    anything = Grant(net("10.0.0.0/8"), "any")
    assert anything.matches("gre", dst, None) and anything.covers(WEB)
    assert Grant(net("10.1.0.0/16"), "tcp").covers(WEB)
    assert not WEB.covers(Grant(net("10.1.0.0/24"), "tcp"))
    assert not Grant(net("10.1.0.0/24"), "tcp", 80).covers(WEB)
    assert not WEB.covers(anything)


def test_is_allowed_follows_group_membership() -> None:
    s = state({1: ({ip(0)}, [WEB]), 2: ({ip(1)}, [DNS])}, clients={ip(0), ip(1), ip(2)})
    web_host = IPv4Address("10.1.0.9")
    assert fwplan.is_allowed(s, ip(0), "tcp", web_host, 80)
    assert not fwplan.is_allowed(s, ip(1), "tcp", web_host, 80)
    assert not fwplan.is_allowed(s, ip(2), "tcp", web_host, 80)
    assert not fwplan.is_allowed(s, ip(9), "tcp", web_host, 80)  # not connected
    s_all = state({}, clients={ip(2)}, allow_all=True)
    assert fwplan.is_allowed(s_all, ip(2), "gre", web_host, None)


# --- diff -------------------------------------------------------------------------------------


def apply_ops(
    sets: dict[str, frozenset[str]], ops: tuple[fwplan.SetOp, ...]
) -> dict[str, frozenset[str]]:
    out = {n: set(e) for n, e in sets.items()}
    for op in ops:
        (out[op.set_name].add if op.op == "add" else out[op.set_name].discard)(op.element)
    return {n: frozenset(e) for n, e in out.items()}


def test_connect_adds_nat_before_access() -> None:
    old = state({1: ({ip(0)}, [WEB])})
    new = state({1: ({ip(0), ip(1)}, [WEB])})
    d = fwplan.diff(old, new)
    assert not d.needs_full and d.revoked_flows == ()
    assert [(o.op, o.set_name, o.element) for o in d.ops] == [
        ("add", "vpnf-nat", str(ip(1))),
        ("add", "vpnf-clients", str(ip(1))),
        ("add", "vpnf-g1-m", str(ip(1))),
    ]
    assert fwplan.render_ops(d.ops).splitlines()[0] == f"add vpnf-nat {ip(1)}"


def test_disconnect_removes_access_before_nat_and_revokes_everything() -> None:
    old = state({1: ({ip(0), ip(1)}, [WEB])})
    new = state({1: ({ip(0)}, [WEB])})
    d = fwplan.diff(old, new)
    assert [o.set_name for o in d.ops] == ["vpnf-clients", "vpnf-g1-m", "vpnf-nat"]
    assert all(o.op == "del" for o in d.ops)
    assert d.revoked_flows == (RevokedFlow(ip(1), None),)


def test_grant_change_updates_destinations_and_revokes_what_was_lost() -> None:
    narrower = Grant(net("10.1.0.0/24"), "tcp", 80)
    old = state({1: ({ip(0)}, [WEB, DNS])})
    new = state({1: ({ip(0)}, [narrower, DNS])})
    d = fwplan.diff(old, new)
    assert not d.needs_full
    assert [o.line() for o in d.ops] == ["del vpnf-g1-d 10.1.0.0/24,tcp:81"]
    assert d.revoked_flows == (RevokedFlow(ip(0), WEB),)
    assert apply_ops(sets_of(old), d.ops) == sets_of(new)


def test_grant_moved_between_groups_is_not_revoked() -> None:
    wider = Grant(net("10.1.0.0/16"), "tcp")
    old = state({1: ({ip(0)}, [WEB]), 2: ({ip(0)}, [])})
    new = state({1: ({ip(0)}, []), 2: ({ip(0)}, [wider])})
    assert fwplan.diff(old, new).revoked_flows == ()


def test_leaving_a_group_revokes_its_grants() -> None:
    old = state({1: ({ip(0), ip(1)}, [WEB])})
    new = state({1: ({ip(1)}, [WEB])}, clients={ip(0), ip(1)})
    assert fwplan.diff(old, new).revoked_flows == (RevokedFlow(ip(0), WEB),)


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ({"uplink": "eth1"}, "uplink changed"),
        ({"allow_all": True}, "allow_all changed"),
        ({"log_denied": False}, "logging changed"),
    ],
)
def test_rule_changes_need_a_full_apply(change: dict[str, Any], reason: str) -> None:
    old = state({1: ({ip(0)}, [WEB])})
    kwargs = {"uplink": "eth0", "allow_all": False, "log_denied": True, **change}
    d = fwplan.diff(old, state({1: ({ip(0)}, [WEB])}, **kwargs))
    assert d.needs_full and reason in d.reasons and d.ops == ()


def test_group_added_needs_full_apply_and_leaving_allow_all_revokes() -> None:
    d = fwplan.diff(state({1: ({ip(0)}, [WEB])}), state({1: ({ip(0)}, [WEB]), 2: (set(), [])}))
    assert d.needs_full and "groups added or removed" in d.reasons
    opened = state({}, clients={ip(0)}, allow_all=True)
    d = fwplan.diff(opened, state({1: ({ip(0)}, [WEB])}))
    assert d.needs_full
    assert [(rf.client, rf.grant and rf.grant.proto) for rf in d.revoked_flows] == [(ip(0), "any")]


def test_growing_past_capacity_needs_full_apply() -> None:
    old = state({1: ({ip(0)}, [Grant(net("10.1.0.0/24"), "tcp", 1000, 1999)])})
    new = state({1: ({ip(0)}, [Grant(net("10.1.0.0/24"), "tcp", 1000, 60999)])})
    d = fwplan.diff(old, new)
    assert d.needs_full and any("maxelem" in r for r in d.reasons)


addresses = st.integers(min_value=0, max_value=40).map(ip)


port_grants = st.builds(
    lambda n, lo, span, proto: Grant(_nth_net("10.1.0.0", n), proto, lo, lo + span),
    st.integers(0, 3),
    st.integers(1, 100),
    st.integers(0, 5),
    st.sampled_from(["tcp", "udp"]),
)
whole_grants = st.builds(
    lambda n, proto: Grant(_nth_net("10.2.0.0", n), proto),
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


@settings(max_examples=150, deadline=None)
@given(data=st.data())
def test_diff_ops_turn_old_sets_into_new_sets(data: st.DataObject) -> None:
    ids = data.draw(st.lists(st.integers(0, 9), unique=True, max_size=4))
    old, new = data.draw(states(ids)), data.draw(states(ids))
    d = fwplan.diff(old, new)
    assert not d.needs_full
    assert apply_ops(sets_of(old), d.ops) == sets_of(new)
    # Every flow that loses access is covered by a revocation entry.
    dsts = [IPv4Address("10.1.0.5"), IPv4Address("10.1.2.5"), IPv4Address("10.2.1.5")]
    for client in old.all_clients:
        for proto, port in (("tcp", 3), ("udp", 50), ("icmp", None), ("gre", None)):
            for dst in dsts:
                lost = fwplan.is_allowed(old, client, proto, dst, port) and not fwplan.is_allowed(
                    new, client, proto, dst, port
                )
                if lost:
                    assert any(
                        rf.client == client
                        and (rf.grant is None or rf.grant.matches(proto, dst, port))
                        for rf in d.revoked_flows
                    ), (client, proto, dst, port)


def rebuilt(s: DesiredState) -> DesiredState:
    """An equal state that shares no set, group or state object with ``s``."""
    return DesiredState(
        prefix=s.prefix,
        tunnel_networks=s.tunnel_networks,
        uplink=s.uplink,
        nat_members=frozenset(set(s.nat_members)),
        all_clients=frozenset(set(s.all_clients)),
        groups=tuple(GroupState(g.group_id, frozenset(set(g.members)), g.grants) for g in s.groups),
        allow_all=s.allow_all,
        log_denied=s.log_denied,
    )


@settings(max_examples=150, deadline=None)
@given(data=st.data())
def test_diff_is_the_same_whether_states_share_objects_or_not(data: st.DataObject) -> None:
    # An agent that keeps unchanged groups and sets between states gets the fast paths (and
    # warm caches); results must not depend on that.
    ids = data.draw(st.lists(st.integers(0, 9), unique=True, max_size=4))
    old, other = data.draw(states(ids)), data.draw(states(ids))
    fwplan.render_full(old)  # warm the caches of the objects ``new`` reuses
    fwplan.diff(old, other)
    groups = []
    for og, ng in zip(old.sorted_groups(), other.sorted_groups(), strict=True):
        reuse = data.draw(st.sampled_from(["group", "members", "grants", "nothing"]))
        if reuse == "group":
            groups.append(og)
        elif reuse == "members":
            groups.append(GroupState(og.group_id, og.members, ng.grants))
        elif reuse == "grants":
            groups.append(GroupState(og.group_id, ng.members, og.grants))
        else:
            groups.append(ng)
    clients = other.all_clients | {m for g in groups for m in g.members}
    new = DesiredState(
        prefix=P,
        tunnel_networks=(TUN,),
        uplink="eth0",
        nat_members=old.nat_members if old.nat_members <= clients else other.nat_members,
        all_clients=old.all_clients if clients == old.all_clients else clients,
        groups=tuple(groups),
    )
    assert fwplan.diff(old, new) == fwplan.diff(rebuilt(old), rebuilt(new))
    assert fwplan.render_full(new) == fwplan.render_full(rebuilt(new))


# --- kernel snapshots, resync, drift --------------------------------------------------------


def kernel_from(s: DesiredState, jump_count: int = 1) -> KernelState:
    specs = fwplan.desired_sets(s)
    return KernelState(
        prefix=P,
        sets={n: KernelSet(n, sp.type, sp.maxelem, sp.elements) for n, sp in specs.items()},
        chains=dict(fwplan.expected_rules(s)),
        jumps={j: jump_count for j in fwplan.jumps(P)},
    )


def test_resync_swaps_existing_sets_and_cleans_up() -> None:
    s = state({1: ({ip(0)}, [WEB])})
    old = state({1: ({ip(0)}, [WEB]), 9: ({ip(0)}, [DNS])})
    k = kernel_from(old)
    leftover = KernelSet("vpnf-g1-m.new", "hash:ip", 65536, frozenset())
    k = KernelState(P, {**k.sets, leftover.name: leftover}, k.chains, k.jumps)
    ipset_text, iptables_text = fwplan.render_full(s, k)
    lines = ipset_text.splitlines()
    assert lines[0] == "destroy vpnf-g1-m.new"
    assert "create vpnf-g1-m.new hash:ip family inet maxelem 65536" in lines
    assert lines.index(f"add vpnf-g1-m.new {ip(0)}") < lines.index("swap vpnf-g1-m.new vpnf-g1-m")
    assert "flush vpnf-g9-m" in lines and not any(li.startswith("destroy vpnf-g9") for li in lines)
    assert "-I FORWARD" not in iptables_text  # jump already there
    assert ":VPNF-FWD - [0:0]" in iptables_text
    assert fwplan.render_cleanup(s, k).splitlines() == [
        f"destroy vpnf-g9-{kind}" for kind in ("d", "i", "m", "n", "t", "u")
    ]


def test_jumps_are_inserted_when_missing_and_deduplicated() -> None:
    s = state({}, clients=set())
    missing = fwplan.render_iptables(s, kernel_from(s, jump_count=0))
    assert "-I FORWARD 1 -j VPNF-FWD" in missing and "-I POSTROUTING 1 -j VPNF-POST" in missing
    doubled = fwplan.render_iptables(s, kernel_from(s, jump_count=3))
    assert doubled.count("-D FORWARD -j VPNF-FWD") == 2 and "-I FORWARD" not in doubled


def test_wrong_set_type_is_detected() -> None:
    s = state({1: ({ip(0)}, [WEB])})
    k = kernel_from(s)
    bad = KernelSet("vpnf-g1-d", "hash:ip", 65536, frozenset())
    k = KernelState(P, {**k.sets, bad.name: bad}, k.chains, k.jumps)
    assert fwplan.mismatched_sets(s, k) == ["vpnf-g1-d"]
    with pytest.raises(SetTypeMismatch):
        fwplan.render_ipset(s, k)
    assert "ipset vpnf-g1-d has type hash:ip, expected hash:net,port" in fwplan.drift(s, k)
    lockdown = fwplan.render_lockdown(P, s.tunnel_networks, k)
    assert "--match-set" not in lockdown and f"-A VPNF-FWD -s {TUN} -j DROP" in lockdown


def test_drift_reports_each_kind_of_difference() -> None:
    s = state({1: ({ip(0)}, [WEB])})
    assert fwplan.drift(s, kernel_from(s)) == []
    k = kernel_from(s)
    sets = dict(k.sets)
    del sets["vpnf-g1-t"]
    sets["vpnf-g1-d"] = KernelSet(
        "vpnf-g1-d", "hash:net,port", 65536, frozenset({"10.1.0.0/24,tcp:80", "10.9.9.9,tcp:1"})
    )
    sets["vpnf-g5-m"] = KernelSet("vpnf-g5-m", "hash:ip", 65536, frozenset())
    fwd = list(k.chains[("filter", "VPNF-FWD")])
    fwd[1], fwd[2] = fwd[2], fwd[1]
    chains = {("filter", "VPNF-FWD"): tuple(fwd)}  # nat chain missing
    jumps = {fwplan.jumps(P)[0]: 2, fwplan.jumps(P)[1]: 0}
    report = fwplan.drift(s, KernelState(P, sets, chains, jumps))
    assert report == [
        "ipset vpnf-g1-d lacks 1 element(s): 10.1.0.0/24,tcp:81",
        "ipset vpnf-g1-d has 1 unexpected element(s): 10.9.9.9,tcp:1",
        "ipset vpnf-g1-t is missing",
        "ipset vpnf-g5-m is stale (not in the desired state)",
        "chain VPNF-FWD has its rules out of order",
        "chain VPNF-POST is missing from table nat",
        "jump FORWARD -> VPNF-FWD (filter) appears 2 times",
        "jump POSTROUTING -> VPNF-POST (nat) is missing",
    ]


def test_teardown_removes_only_what_exists() -> None:
    s = state({1: ({ip(0)}, [WEB])})
    ipt, ipset = fwplan.render_teardown(kernel_from(s, jump_count=2))
    assert ipt.count("-D FORWARD -j VPNF-FWD") == 2
    assert "-X VPNF-FWD" in ipt and "-X VPNF-POST" in ipt
    assert "destroy vpnf-g1-m" in ipset and "destroy vpnf-tun" in ipset
    assert fwplan.render_teardown(KernelState(P)) == ("", "")


# --- parsers ----------------------------------------------------------------------------------

IPSET_SAVE = """\
create other-set hash:ip family inet hashsize 1024 maxelem 65536 bucketsize 12 initval 0x1
add other-set 10.0.0.1
create vpnf-g1-d hash:net,port family inet hashsize 1024 maxelem 131072 bucketsize 12 initval 0x2
add vpnf-g1-d 10.1.0.0/24,tcp:80
add vpnf-g1-d 10.1.2.3,udp:53
create vpnf-clients hash:ip family inet hashsize 1024 maxelem 65536 bucketsize 12 initval 0x3
create vpnfx-nat hash:ip family inet hashsize 1024 maxelem 65536 bucketsize 12 initval 0x4
create vpnf-g2-m.new hash:ip family inet hashsize 1024 maxelem 65536 bucketsize 12 initval 0x5
"""


def test_parse_ipset_save_keeps_only_our_sets() -> None:
    sets = fwplan.parse_ipset_save(IPSET_SAVE, P)
    assert sorted(sets) == ["vpnf-clients", "vpnf-g1-d", "vpnf-g2-m.new"]
    assert sets["vpnf-g1-d"] == KernelSet(
        "vpnf-g1-d", "hash:net,port", 131072, frozenset({"10.1.0.0/24,tcp:80", "10.1.2.3,udp:53"})
    )
    assert sets["vpnf-clients"].elements == frozenset()


def test_parse_iptables_s() -> None:
    text = """\
# Warning: iptables-legacy tables present, use iptables-legacy to see them
-P FORWARD ACCEPT
-N VPNF-FWD
-N VPNFX-FWD
-A FORWARD -j VPNF-FWD
-A FORWARD -i eth0 -j VPNF-FWD
-A FORWARD -j VPNFX-FWD
-A VPNF-FWD -j DROP
-A VPNFX-FWD -j ACCEPT
"""
    chains, jumps = fwplan.parse_iptables_s(text, "filter", P)
    assert chains == {("filter", "VPNF-FWD"): ("-A VPNF-FWD -j DROP",)}
    assert jumps == {fwplan.jumps(P)[0]: 1}
    empty_chain, _ = fwplan.parse_iptables_s("-N VPNF-FWD\n", "filter", P)
    assert empty_chain == {("filter", "VPNF-FWD"): ()}
    assert fwplan.parse_iptables_s("-P FORWARD ACCEPT\n", "filter", P)[0] == {}


def test_parse_conntrack() -> None:
    text = (
        "tcp      6 431999 ESTABLISHED src=10.8.0.2 dst=10.1.0.5 sport=40000 dport=80 "
        "src=10.1.0.5 dst=192.0.2.1 sport=80 dport=40000 [ASSURED] mark=0 use=1\n"
        "icmp     1 29 src=10.8.0.3 dst=10.1.0.5 type=8 code=0 id=7 src=10.1.0.5 "
        "dst=10.8.0.3 type=0 code=0 id=7 mark=0 use=1\n"
        "gre      47 179 src=10.8.0.4 dst=10.2.0.1 srckey=0x0 dstkey=0x0 src=10.2.0.1 "
        "dst=10.8.0.4 srckey=0x0 dstkey=0x0 mark=0 use=1\n"
        "conntrack v1.4.7 (conntrack-tools): 3 flow entries have been shown.\n"
    )
    flows = fwplan.parse_conntrack(text)
    assert [(f.proto, str(f.src), str(f.dst), f.sport, f.dport) for f in flows] == [
        ("tcp", "10.8.0.2", "10.1.0.5", 40000, 80),
        ("icmp", "10.8.0.3", "10.1.0.5", None, None),
        ("gre", "10.8.0.4", "10.2.0.1", None, None),
    ]


def test_flows_to_cut_after_a_restart() -> None:
    s = state({1: ({ip(0)}, [WEB])}, clients={ip(0), ip(1)}, nat={ip(0)})
    text = "\n".join(
        f"tcp 6 100 ESTABLISHED src={src} dst={dst} sport=40000 dport={dport} "
        f"src={dst} dst={src} sport={dport} dport=40000 [ASSURED] mark=0 use=1"
        for src, dst, dport in [
            (ip(0), "10.1.0.5", 80),  # allowed
            (ip(0), "10.1.0.5", 22),  # port not granted
            (ip(1), "10.1.0.5", 80),  # connected, no group
            (ip(7), "10.1.0.5", 80),  # not connected any more
            ("192.0.2.9", ip(1), 22),  # inbound to a gateway client: allowed
            ("192.0.2.9", ip(0), 22),  # inbound to a NAT client
            ("192.0.2.9", ip(9), 22),  # inbound to a free tunnel address
            ("192.0.2.9", "192.0.2.10", 22),  # not ours
        ]
    )
    cut = fwplan.flows_to_cut(s, fwplan.parse_conntrack(text))
    assert [(str(f.src), str(f.dst), f.dport) for f in cut] == [
        (str(ip(0)), "10.1.0.5", 22),
        (str(ip(1)), "10.1.0.5", 80),
        (str(ip(7)), "10.1.0.5", 80),
        ("192.0.2.9", str(ip(0)), 22),
        ("192.0.2.9", str(ip(9)), 22),
    ]
