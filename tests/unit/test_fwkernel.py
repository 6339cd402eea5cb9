"""Reading the kernel: ipset/iptables/conntrack text parsers, and drift from the desired state."""

from __future__ import annotations

from tests.unit.fw_examples import WEB, P, ip, kernel_from, state
from vpnfleet.core import fwkernel, fwnames
from vpnfleet.core.fwkernel import KernelSet, KernelState


def test_drift_reports_each_kind_of_difference() -> None:
    s = state({1: ({ip(0)}, [WEB])})
    assert fwkernel.drift(s, kernel_from(s)) == []
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
    jumps = {fwnames.jumps(P)[0]: 2, fwnames.jumps(P)[1]: 0}
    report = fwkernel.drift(s, KernelState(P, sets, chains, jumps))
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
    sets = fwkernel.parse_ipset_save(IPSET_SAVE, P)
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
    chains, jumps = fwkernel.parse_iptables_s(text, "filter", P)
    assert chains == {("filter", "VPNF-FWD"): ("-A VPNF-FWD -j DROP",)}
    assert jumps == {fwnames.jumps(P)[0]: 1}
    empty_chain, _ = fwkernel.parse_iptables_s("-N VPNF-FWD\n", "filter", P)
    assert empty_chain == {("filter", "VPNF-FWD"): ()}
    assert fwkernel.parse_iptables_s("-P FORWARD ACCEPT\n", "filter", P)[0] == {}


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
    flows = fwkernel.parse_conntrack(text)
    assert [(f.proto, str(f.src), str(f.dst), f.sport, f.dport) for f in flows] == [
        ("tcp", "10.8.0.2", "10.1.0.5", 40000, 80),
        ("icmp", "10.8.0.3", "10.1.0.5", None, None),
        ("gre", "10.8.0.4", "10.2.0.1", None, None),
    ]
