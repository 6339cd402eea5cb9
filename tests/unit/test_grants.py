"""Grants: validation, matching new flows, covering each other, and access rules as grants."""

from __future__ import annotations

from ipaddress import IPv4Address

import pytest

from tests.unit.fw_examples import WEB, net
from vpnfleet.core.grants import Grant, grants_of


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


def test_an_access_rule_becomes_one_grant_per_port_range() -> None:
    assert grants_of("10.1.0.0/24", "tcp", "443,8000-8100,22") == [
        Grant(net("10.1.0.0/24"), "tcp", 22, 22),
        Grant(net("10.1.0.0/24"), "tcp", 443, 443),
        Grant(net("10.1.0.0/24"), "tcp", 8000, 8100),
    ]
    # No ports (or an empty list): all ports, one grant.
    assert grants_of("10.1.2.3/32", "udp", None) == [Grant(net("10.1.2.3/32"), "udp")]
    assert grants_of("10.1.2.3/32", "udp", " ") == [Grant(net("10.1.2.3/32"), "udp")]
    assert grants_of("0.0.0.0/0", "any", None) == [Grant(net("0.0.0.0/0"), "any")]


@pytest.mark.parametrize(
    ("destination", "proto", "ports", "message"),
    [
        ("10.1.0.0/24", "icmp", "8", "only valid for tcp and udp"),
        ("10.1.0.0/24", "gre", None, "protocol must be one of"),
        ("10.1.0.1/24", "tcp", None, "host bits set"),
        ("10.1.0.0/24", "tcp", "80-70", "reversed"),
        ("fd00::/64", "tcp", None, "octets"),
    ],
)
def test_bad_access_rules_are_refused(
    destination: str, proto: str, ports: str | None, message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        grants_of(destination, proto, ports)


def test_matching_and_covering_at_the_edges() -> None:
    dst = IPv4Address("10.1.0.7")
    all_tcp = Grant(net("10.1.0.0/24"), "tcp")
    ping = Grant(net("10.1.0.0/24"), "icmp")
    assert all_tcp.matches("tcp", dst, 1) and all_tcp.matches("tcp", dst, 65535)
    assert ping.matches("icmp", dst, None) and not ping.matches("tcp", dst, 80)
    assert not WEB.matches("tcp", dst, None)  # a port-limited grant needs a port
    # A range covers the same range, and ranges sharing either end.
    assert WEB.covers(WEB)
    assert WEB.covers(Grant(net("10.1.0.0/24"), "tcp", 80))
    assert WEB.covers(Grant(net("10.1.0.0/24"), "tcp", 81))
    assert not WEB.covers(Grant(net("10.1.0.0/24"), "tcp", 79, 80))
    assert not WEB.covers(Grant(net("10.1.0.0/24"), "tcp", 81, 82))
    # The network is the same, or a subnet touching either end of it.
    assert all_tcp.covers(Grant(net("10.1.0.0/25"), "tcp", 22))
    assert all_tcp.covers(Grant(net("10.1.0.255/32"), "tcp", 22))
    assert not all_tcp.covers(Grant(net("10.1.1.0/32"), "tcp", 22))
    assert not all_tcp.covers(Grant(net("10.1.0.0/24"), "udp", 22))
    assert not WEB.covers(all_tcp)  # all ports are more than 80-81
    assert ping.covers(Grant(net("10.1.0.9/32"), "icmp"))


def test_port_numbers_span_0_to_65535() -> None:
    assert Grant(net("10.0.0.0/8"), "tcp", 0, 65534).port_count == 65535
    assert Grant(net("10.0.0.0/8"), "tcp", 0, 65535).all_ports
    with pytest.raises(ValueError, match="invalid port range"):
        Grant(net("10.0.0.0/8"), "tcp", 1, 65536)
    with pytest.raises(ValueError, match="must be integers"):
        Grant(net("10.0.0.0/8"), "udp", 1, "2")  # type: ignore[arg-type]
