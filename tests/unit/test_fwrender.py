"""Rendering a desired state: the layout (sets, element encoding, rules), resync text, teardown."""

from __future__ import annotations

import random

import pytest

from tests.unit.fw_examples import (
    DNS,
    TUN,
    WEB,
    P,
    fwd_rules,
    ip,
    kernel_from,
    net,
    nth_net,
    sets_of,
    state,
)
from vpnfleet.core import fwkernel, fwrender
from vpnfleet.core.fwkernel import KernelSet, KernelState
from vpnfleet.core.fwrender import SetTypeMismatch
from vpnfleet.core.fwstate import DesiredState, GroupAccess
from vpnfleet.core.grants import Grant

# --- layout -----------------------------------------------------------------------------------


def test_rendering_is_deterministic_whatever_the_input_order() -> None:
    members = [ip(i) for i in range(50)]
    grants = [WEB, DNS, Grant(net("10.2.0.0/16"), "any")]
    one = state({1: (set(members), grants), 2: ({members[0]}, [DNS])})
    random.Random(7).shuffle(members)
    two = state({2: ({members[members.index(ip(0))]}, [DNS]), 1: (set(members), grants[::-1])})
    assert fwrender.render_full(one) == fwrender.render_full(two)
    assert fwrender.render_full(one) == fwrender.render_full(one)


@pytest.mark.parametrize("n_groups", [1, 200])
def test_rule_count_depends_on_groups_not_members_or_destinations(n_groups: int) -> None:
    def build(members: int, dests: int) -> DesiredState:
        clients = [ip(i) for i in range(members)]
        grants = [Grant(nth_net("10.100.0.0", d), "tcp", 443) for d in range(dests)]
        return state({g: (set(clients), grants) for g in range(n_groups)})

    small, large = build(10, 1), build(5000, 50)
    per_group = 5
    fixed = 6 + 2  # preamble, log, drop
    for s in (small, large):
        assert len(fwd_rules(s)) == fixed + per_group * n_groups
    assert fwrender.render_iptables(small).count("\n") == fwrender.render_iptables(large).count(
        "\n"
    )
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
    specs = fwrender.desired_sets(s)
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
    with_uplink = fwrender.expected_rules(state({}, clients={ip(0)}))[("nat", "VPNF-POST")]
    assert with_uplink == (
        "-A VPNF-POST -o eth0 -m set --match-set vpnf-nat src "
        "-m set ! --match-set vpnf-tun dst -j MASQUERADE",
    )
    bare = fwrender.expected_rules(state({}, clients={ip(0)}, uplink=None))[("nat", "VPNF-POST")]
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
    spec = fwrender.desired_sets(state({1: ({ip(0)}, [wide])}))["vpnf-g1-d"]
    assert len(spec.elements) == 40000
    assert f"create vpnf-g1-d hash:net,port family inet maxelem {spec.maxelem}" in (
        fwrender.render_ipset(state({1: ({ip(0)}, [wide])}))
    )
    assert spec.maxelem >= 2 * 40000
    too_wide = [Grant(nth_net("10.1.0.0", i), "tcp", 2, 65534) for i in range(17)]
    with pytest.raises(ValueError, match="would need 1114061 firewall set elements"):
        GroupAccess(1, frozenset(), tuple(too_wide))


# --- kernel snapshots, resync, drift --------------------------------------------------------


def test_resync_swaps_existing_sets_and_cleans_up() -> None:
    s = state({1: ({ip(0)}, [WEB])})
    old = state({1: ({ip(0)}, [WEB]), 9: ({ip(0)}, [DNS])})
    k = kernel_from(old)
    leftover = KernelSet("vpnf-g1-m.new", "hash:ip", 65536, frozenset())
    k = KernelState(P, {**k.sets, leftover.name: leftover}, k.chains, k.jumps)
    ipset_text, iptables_text = fwrender.render_full(s, k)
    lines = ipset_text.splitlines()
    assert lines[0] == "destroy vpnf-g1-m.new"
    assert "create vpnf-g1-m.new hash:ip family inet maxelem 65536" in lines
    assert lines.index(f"add vpnf-g1-m.new {ip(0)}") < lines.index("swap vpnf-g1-m.new vpnf-g1-m")
    assert "flush vpnf-g9-m" in lines and not any(li.startswith("destroy vpnf-g9") for li in lines)
    assert "-I FORWARD" not in iptables_text  # jump already there
    assert ":VPNF-FWD - [0:0]" in iptables_text
    assert fwrender.render_cleanup(s, k).splitlines() == [
        f"destroy vpnf-g9-{kind}" for kind in ("d", "i", "m", "n", "t", "u")
    ]


def test_jumps_are_inserted_when_missing_and_deduplicated() -> None:
    s = state({}, clients=set())
    missing = fwrender.render_iptables(s, kernel_from(s, jump_count=0))
    assert "-I FORWARD 1 -j VPNF-FWD" in missing and "-I POSTROUTING 1 -j VPNF-POST" in missing
    doubled = fwrender.render_iptables(s, kernel_from(s, jump_count=3))
    assert doubled.count("-D FORWARD -j VPNF-FWD") == 2 and "-I FORWARD" not in doubled


def test_wrong_set_type_is_detected() -> None:
    s = state({1: ({ip(0)}, [WEB])})
    k = kernel_from(s)
    bad = KernelSet("vpnf-g1-d", "hash:ip", 65536, frozenset())
    k = KernelState(P, {**k.sets, bad.name: bad}, k.chains, k.jumps)
    assert fwrender.mismatched_sets(s, k) == ["vpnf-g1-d"]
    with pytest.raises(SetTypeMismatch):
        fwrender.render_ipset(s, k)
    assert "ipset vpnf-g1-d has type hash:ip, expected hash:net,port" in fwkernel.drift(s, k)
    lockdown = fwrender.render_lockdown(P, s.tunnel_networks, k)
    assert "--match-set" not in lockdown and f"-A VPNF-FWD -s {TUN} -j DROP" in lockdown


def test_teardown_removes_only_what_exists() -> None:
    s = state({1: ({ip(0)}, [WEB])})
    ipt, ipset = fwrender.render_teardown(kernel_from(s, jump_count=2))
    assert ipt.count("-D FORWARD -j VPNF-FWD") == 2
    assert "-X VPNF-FWD" in ipt and "-X VPNF-POST" in ipt
    assert "destroy vpnf-g1-m" in ipset and "destroy vpnf-tun" in ipset
    assert fwrender.render_teardown(KernelState(P)) == ("", "")
