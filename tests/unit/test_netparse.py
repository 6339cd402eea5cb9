"""Parsing of names, destinations, protocols and ports: examples and properties."""

from __future__ import annotations

import contextlib
import ipaddress
import itertools

import pytest
from hypothesis import given
from hypothesis import strategies as st

from vpnfleet.core import ipam, netparse
from vpnfleet.core.netparse import PortRange


@pytest.mark.parametrize("name", ["a", "alice", "bob.smith", "x_1-y", "a" * 64])
def test_valid_names(name: str) -> None:
    assert netparse.validate_name(name) == name


@pytest.mark.parametrize("name", ["", "A", "-a", "a-", "a b", "a/b", "a" * 65, "é", "a\n"])
def test_invalid_names(name: str) -> None:
    with pytest.raises(ValueError, match="invalid name"):
        netparse.validate_name(name)


def test_destinations() -> None:
    assert str(netparse.parse_destination("10.0.0.5")) == "10.0.0.5/32"
    assert str(netparse.parse_destination(" 10.0.0.0/8 ")) == "10.0.0.0/8"
    with pytest.raises(ValueError, match=r"did you mean 10\.0\.0\.0/24"):
        netparse.parse_destination("10.0.0.5/24")
    with pytest.raises(ValueError, match="IPv6"):
        netparse.parse_destination("::1")
    with pytest.raises(ValueError, match="empty"):
        netparse.parse_destination("  ")


def test_ports_merge_and_errors() -> None:
    assert netparse.parse_ports("443,80,81-90,85,91") == (PortRange(80, 91), PortRange(443, 443))
    assert netparse.parse_ports(None) == () and netparse.parse_ports(" ") == ()
    for bad, words in [
        ("0", "out of range"),
        ("65536", "out of range"),
        ("9-1", "reversed"),
        ("a", "not a number"),
        ("1,", "empty"),
        ("-5", "not a number"),
    ]:
        with pytest.raises(ValueError, match=words):
            netparse.parse_ports(bad)
    with pytest.raises(ValueError, match="tcp or udp"):
        netparse.check_ports_for_protocol("icmp", netparse.parse_ports("80"))


port = st.integers(min_value=1, max_value=65535)


@given(st.lists(st.tuples(port, port), min_size=1, max_size=20))
def test_port_parsing_roundtrips_and_covers_exactly(pairs: list[tuple[int, int]]) -> None:
    spec = ",".join(f"{min(a, b)}-{max(a, b)}" if a != b else str(a) for a, b in pairs)
    ranges = netparse.parse_ports(spec)
    wanted = {p for a, b in pairs for p in range(min(a, b), max(a, b) + 1)}
    covered = {p for r in ranges for p in range(r.lo, r.hi + 1)}
    assert covered == wanted
    # Canonical: sorted, disjoint, non-adjacent, and stable under a second parse.
    assert all(x.hi + 1 < y.lo for x, y in itertools.pairwise(ranges))
    assert netparse.parse_ports(netparse.format_ports(ranges)) == ranges


@given(st.integers(min_value=0, max_value=2**32 - 1), st.integers(min_value=0, max_value=32))
def test_cidr_parsing_accepts_exactly_the_strict_networks(value: int, prefix: int) -> None:
    addr = ipaddress.IPv4Address(value)
    text = f"{addr}/{prefix}"
    net = ipaddress.ip_network(text, strict=False)
    if net.network_address == addr:
        assert netparse.parse_destination(text) == net
    else:
        with pytest.raises(ValueError, match="host bits"):
            netparse.parse_destination(text)


@given(st.text(max_size=30))
def test_garbage_never_crashes_parsers(text: str) -> None:
    for parse in (
        netparse.parse_destination,
        netparse.parse_ports,
        netparse.parse_protocol,
        netparse.parse_mode,
        netparse.parse_endpoint,
    ):
        with contextlib.suppress(ValueError):
            parse(text)


def test_endpoints() -> None:
    assert netparse.parse_endpoint("vpn.example.com") == ("vpn.example.com", 1194)
    assert netparse.parse_endpoint("10.0.0.1:443") == ("10.0.0.1", 443)
    with pytest.raises(ValueError):
        netparse.parse_endpoint("bad host:1")


def test_ipam_allocates_lowest_free_and_reports_exhaustion() -> None:
    pool = ipaddress.IPv4Network("10.9.0.0/29")
    assert ipam.server_address(pool) == ipaddress.IPv4Address("10.9.0.1")
    assert ipam.capacity(pool) == 5
    used = [ipaddress.IPv4Address("10.9.0.2"), ipaddress.IPv4Address("10.9.0.4")]
    assert ipam.allocate(pool, used) == ipaddress.IPv4Address("10.9.0.3")
    full = list(ipam.client_addresses(pool))
    assert full[0] == ipaddress.IPv4Address("10.9.0.2") and full[-1] == ipaddress.IPv4Address(
        "10.9.0.6"
    )
    with pytest.raises(ipam.PoolExhausted, match="exhausted"):
        ipam.allocate(pool, full)
    assert not ipam.is_client_address(pool, ipaddress.IPv4Address("10.9.0.1"))
    assert not ipam.is_client_address(pool, ipaddress.IPv4Address("10.9.0.7"))
