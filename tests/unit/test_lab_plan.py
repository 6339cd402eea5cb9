"""The lab plan: names, addresses, load-balancer rules and input validation (pure, no root)."""

from __future__ import annotations

import re
from fractions import Fraction
from ipaddress import IPv4Address, IPv4Network

import pytest

from vpnfleet.lab.topology import (
    CLUSTER_NET,
    MAX_PODS,
    PUBLIC_NET,
    LabPlan,
    lab_role,
    validate_prefix,
)


def test_default_plan_addresses() -> None:
    plan = LabPlan()
    assert plan.prefix == "vfl"
    assert plan.clients == ("alice", "bob")
    assert plan.namespaces == (
        "vfl-fab", "vfl-lb", "vfl-cp", "vfl-svc", "vfl-rtr", "vfl-pod1", "vfl-pod2",
        "vfl-c-alice", "vfl-c-bob",
    )  # fmt: skip
    assert plan.cp.address() == IPv4Address("10.99.0.2")
    assert plan.lb.address("cluster") == IPv4Address("10.99.0.3")
    assert plan.lb.address("public") == IPv4Address("198.51.100.1")
    assert plan.svc.address() == IPv4Address("10.99.0.100")
    assert plan.router.address() == IPv4Address("10.99.0.4")
    assert plan.pod_ips == (IPv4Address("10.99.0.11"), IPv4Address("10.99.0.12"))
    assert plan.client_ip("alice") == IPv4Address("198.51.100.11")
    assert plan.client_ip("bob") == IPv4Address("198.51.100.12")
    assert plan.vpn_endpoint == (IPv4Address("198.51.100.1"), 1194)
    assert plan.control_plane_url == "https://10.99.254.2:8000"
    assert str(plan.admin.root_address) == "10.99.254.1/30"
    assert str(plan.admin.ns_address) == "10.99.254.2/30"
    assert plan.admin.root_ifname == "vfl-adm"


def test_routes_point_where_replies_must_go() -> None:
    plan = LabPlan(pods=3, clients=["a", "b"])
    for i in range(1, 4):
        pod = plan.pod(i)
        assert pod.gateway == plan.lb_cluster_ip  # replies to clients pass the LB's conntrack
        assert dict(pod.sysctls)["net.ipv4.ip_forward"] == "1"
        assert dict(pod.sysctls)["net.netfilter.nf_conntrack_acct"] == "1"
        assert dict(pod.sysctls)["net.netfilter.nf_conntrack_timestamp"] == "1"
    for c in plan.clients:
        assert plan.client(c).gateway == plan.lb_public_ip
    assert dict(plan.lb.sysctls)["net.ipv4.ip_forward"] == "1"
    # The service only gets per-user /32 routes; no default route to hide a missing one.
    assert plan.svc.gateway is None


def test_every_address_is_unique_and_inside_the_lab_networks() -> None:
    plan = LabPlan(pods=MAX_PODS, clients=[f"c{i}" for i in range(50)])
    seen: list[IPv4Address] = []
    for node in plan.nodes:
        for att in node.attachments:
            net = CLUSTER_NET if att.bridge == "cluster" else PUBLIC_NET
            assert att.address.network == net
            assert att.address.ip not in (net.network_address, net.broadcast_address)
            seen.append(att.address.ip)
    assert len(seen) == len(set(seen))


def test_interface_names_fit_and_fabric_ports_are_unique() -> None:
    plan = LabPlan(prefix="abcdefgh", pods=MAX_PODS, clients=[f"client{i:04d}" for i in range(50)])
    assert all(len(n) <= 15 for n in plan.interface_names())
    ports = [att.port for node in plan.nodes for att in node.attachments]
    assert len(ports) == len(set(ports))
    assert not set(ports) & {"cluster", "public"}


@pytest.mark.parametrize("pods", [1, 2, 3, 5, 20])
def test_dnat_rules_spread_new_flows_evenly(pods: int) -> None:
    plan = LabPlan(pods=pods)
    all_rules = [r for r in plan.lb_ruleset().splitlines() if r.startswith("-A PREROUTING")]
    assert len(all_rules) == 2 * pods  # UDP 1194 and the TCP fallback, each over every pod
    tcp = [r for r in all_rules if "-p tcp -m tcp --dport 443" in r]
    rules = [r for r in all_rules if "-p udp -m udp --dport 1194" in r]
    assert [r.replace("tcp", "udp").replace("443", "1194") for r in tcp] == rules
    targets = [re.search(r"--to-destination (\S+)", r).group(1) for r in rules]  # type: ignore[union-attr]
    assert targets == [str(ip) for ip in plan.pod_ips]
    assert "--probability" not in rules[-1]  # the last pod takes whatever is left
    # Each rule takes its share of what earlier rules passed on: every pod gets 1/N.
    remaining = Fraction(1)
    shares = []
    for rule in rules:
        m = re.search(r"--probability (\S+)", rule)
        p = Fraction(m.group(1)) if m else Fraction(1)
        shares.append(remaining * p)
        remaining -= remaining * p
    assert remaining == 0
    for share in shares:
        assert abs(share - Fraction(1, pods)) < Fraction(1, 10**8)


def test_dnat_only_for_the_vpn_port_on_the_public_side_and_no_snat() -> None:
    ruleset = LabPlan(pods=2).lb_ruleset()
    for rule in (r for r in ruleset.splitlines() if r.startswith("-A PREROUTING")):
        assert ("-d 198.51.100.1/32 -i eth1 -p udp -m udp --dport 1194" in rule) != (
            "-d 198.51.100.1/32 -i eth1 -p tcp -m tcp --dport 443" in rule
        )
    assert "SNAT" not in ruleset
    assert "MASQUERADE" not in ruleset
    # The internet reaches the pod network only through the Service (DNAT).
    assert ":FORWARD DROP" in ruleset
    assert "-A FORWARD -i eth1 -o eth0 -m conntrack --ctstate DNAT -j ACCEPT" in ruleset


def test_probabilities_for_three_pods() -> None:
    assert LabPlan(pods=3).dnat_probabilities() == (1 / 3, 1 / 2, None)
    assert LabPlan(pods=1).dnat_probabilities() == (None,)


@pytest.mark.parametrize("prefix", ["", "Vfl", "1ab", "a-b", "abcdefghi", "a_b", "ab c"])
def test_bad_prefix_is_rejected(prefix: str) -> None:
    with pytest.raises(ValueError, match="prefix"):
        LabPlan(prefix=prefix)


@pytest.mark.parametrize("pods", [0, -1, 21, True])
def test_bad_pod_count_is_rejected(pods: int) -> None:
    with pytest.raises(ValueError, match="pods"):
        LabPlan(pods=pods)


@pytest.mark.parametrize("name", ["", "Alice", "a_b", "-ab", "ab-", "abcdefghijk", "a b", "ä"])
def test_bad_client_name_is_rejected(name: str) -> None:
    with pytest.raises(ValueError, match="client name"):
        LabPlan(clients=[name])


def test_client_list_rules() -> None:
    with pytest.raises(ValueError, match="unique, repeated: alice"):
        LabPlan(clients=["alice", "bob", "alice"])
    with pytest.raises(ValueError, match="at most 50"):
        LabPlan(clients=[f"c{i}" for i in range(51)])
    with pytest.raises(ValueError, match="list of names"):
        LabPlan(clients="alice")
    assert LabPlan(clients=[]).clients == ()
    assert LabPlan(clients=["a-b", "0x", "abcdefghij"]).clients == ("a-b", "0x", "abcdefghij")


def test_lookups_of_unknown_members_fail_clearly() -> None:
    plan = LabPlan(pods=2, clients=["alice"])
    with pytest.raises(ValueError, match="pod index"):
        plan.pod_ip(3)
    with pytest.raises(ValueError, match="no client named 'bob'"):
        plan.client_ip("bob")


def test_lab_role_recognises_only_this_labs_namespaces() -> None:
    assert lab_role("vfl", "vfl-fab") == "fab"
    assert lab_role("vfl", "vfl-pod12") == "pod12"
    assert lab_role("vfl", "vfl-c-alice") == "c-alice"
    assert lab_role("vfl", "vfl-svc") == "svc"
    assert lab_role("vfl", "vfl-rtr") == "rtr"
    # Other labs, other tests' namespaces and look-alikes are never touched by teardown.
    for other in ("vfl2-fab", "vflx-cp", "vfl-", "vfl-pod0", "vfl-podx", "vfl-mg-8d7b3b-c",
                  "xvfl-cp", "vfl-c-", "vfl-cp-extra", "vft-dp-abc-gw"):  # fmt: skip
        assert lab_role("vfl", other) is None, other
    plan = LabPlan(prefix="vt", pods=3, clients=["x", "y-z"])
    assert all(lab_role("vt", ns) is not None for ns in plan.namespaces)


def test_validate_prefix_returns_it() -> None:
    assert validate_prefix("vt1") == "vt1"


def test_gateway_pool_is_outside_the_lab_networks() -> None:
    from vpnfleet.lab.topology import ADMIN_NET, GATEWAY_POOL

    for net in (CLUSTER_NET, PUBLIC_NET, ADMIN_NET):
        assert not GATEWAY_POOL.overlaps(net)
    assert IPv4Network("10.201.0.0/16") == GATEWAY_POOL


def test_admin_network_can_be_moved_for_a_second_lab() -> None:
    plan = LabPlan(prefix="vt", admin_net="10.99.254.8/30")
    assert str(plan.admin.root_address) == "10.99.254.9/30"
    assert str(plan.admin.ns_address) == "10.99.254.10/30"
    assert plan.control_plane_url == "https://10.99.254.10:8000"
    for bad in ("10.99.254.0/29", "10.98.0.0/30", "10.99.254.1/30", "nope"):
        with pytest.raises(ValueError, match="admin network"):
            LabPlan(admin_net=bad)
