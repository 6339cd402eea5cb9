"""The desired state: what is refused at construction, what it allows, and its client memo."""

from __future__ import annotations

import dataclasses
from ipaddress import IPv4Address, IPv4Network

import pytest

from tests.unit.fw_examples import DNS, TUN, WEB, P, ip, state
from vpnfleet.core import fwstate
from vpnfleet.core.fwstate import ClientCheck, DesiredState, GroupAccess


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
            (GroupAccess(1, frozenset(), ()), GroupAccess(1, frozenset(), ())),
        )
    with pytest.raises(ValueError, match="group id"):
        GroupAccess(-1, frozenset(), ())
    with pytest.raises(ValueError, match="uplink"):
        state({}, clients=set(), uplink="eth0; rm -rf /")
    with pytest.raises(ValueError, match="tunnel_networks"):
        DesiredState(P, (), None, frozenset(), frozenset(), ())


def test_is_allowed_follows_group_membership() -> None:
    s = state({1: ({ip(0)}, [WEB]), 2: ({ip(1)}, [DNS])}, clients={ip(0), ip(1), ip(2)})
    web_host = IPv4Address("10.1.0.9")
    assert fwstate.is_allowed(s, ip(0), "tcp", web_host, 80)
    assert not fwstate.is_allowed(s, ip(1), "tcp", web_host, 80)
    assert not fwstate.is_allowed(s, ip(2), "tcp", web_host, 80)
    assert not fwstate.is_allowed(s, ip(9), "tcp", web_host, 80)  # not connected
    s_all = state({}, clients={ip(2)}, allow_all=True)
    assert fwstate.is_allowed(s_all, ip(2), "gre", web_host, None)


def _with_check(
    clients: set[IPv4Address], check: ClientCheck | None, *nets: IPv4Network
) -> DesiredState:
    return DesiredState(
        P, nets or (TUN,), None, frozenset(), frozenset(clients), (), client_check=check
    )


def test_a_client_check_never_changes_what_is_refused() -> None:
    check = ClientCheck()
    first = _with_check({ip(0), ip(1)}, check)
    # Only newcomers are checked again, but they are checked.
    assert check.unchecked(frozenset({ip(0), ip(1), ip(2)}), (TUN,)) == {ip(2)}
    with pytest.raises(ValueError, match=r"outside the tunnel networks: 192\.0\.2\.1"):
        _with_check({ip(0), ip(1), IPv4Address("192.0.2.1")}, check)
    with pytest.raises(ValueError, match="frozenset of IPv4Address"):
        _with_check({ip(0), ip(1), "10.8.0.9"}, check)  # type: ignore[arg-type]
    # What was checked against other tunnel networks counts for nothing: ip(0) and ip(1)
    # are outside this one.
    narrow = IPv4Network("10.8.128.0/17")
    assert check.unchecked(first.all_clients, (narrow,)) == first.all_clients
    with pytest.raises(ValueError, match="outside the tunnel networks"):
        _with_check({ip(0), ip(1)}, check, narrow)
    # The refusals above did not make the memo forget or believe anything wrong.
    assert _with_check({ip(0), ip(1), ip(3)}, check) == _with_check({ip(0), ip(1), ip(3)}, None)


def test_a_client_check_is_not_part_of_the_state() -> None:
    check = ClientCheck()
    s = _with_check({ip(0)}, check)
    plain = _with_check({ip(0)}, None)
    assert s == plain and hash(s) == hash(plain) and repr(s) == repr(plain)
    # States derived with dataclasses.replace keep using it (the agent's and the benchmark's
    # way of building the next state).
    grown = dataclasses.replace(s, all_clients=s.all_clients | {ip(1)})
    assert grown.client_check is check
    assert check.unchecked(grown.all_clients, (TUN,)) == frozenset()


def test_group_covers_through_its_index() -> None:
    from vpnfleet.core.grants import Grant

    wide = Grant(IPv4Network("10.1.0.0/16"), "tcp")
    narrow = Grant(IPv4Network("10.2.3.0/24"), "udp", 53)
    g = GroupAccess(1, frozenset(), (wide, narrow))
    assert g.covers(Grant(IPv4Network("10.1.0.0/16"), "tcp", 443))  # same prefix length
    assert g.covers(Grant(IPv4Network("10.1.255.255/32"), "tcp", 22))  # last address
    assert g.covers(Grant(IPv4Network("10.2.3.0/24"), "udp", 53))
    assert not g.covers(Grant(IPv4Network("10.2.3.0/24"), "udp", 54))
    assert not g.covers(Grant(IPv4Network("10.0.0.0/8"), "tcp", 22))  # wider than held
    assert not g.covers(Grant(IPv4Network("10.3.0.0/24"), "tcp", 22))


def test_addresses_outside_the_tunnel_networks_are_named_at_the_edges() -> None:
    a, b = IPv4Network("10.8.0.0/24"), IPv4Network("10.9.0.0/24")
    inside = {IPv4Address("10.8.0.0"), IPv4Address("10.8.0.255"), IPv4Address("10.9.0.0")}
    assert fwstate._outside(frozenset(inside), (a, b)) == []
    ends = frozenset({IPv4Address("10.8.0.0"), IPv4Address("10.8.0.255")})
    assert fwstate._outside(ends, (a,)) == []
    before, after = IPv4Address("10.7.255.255"), IPv4Address("10.8.1.0")
    found = fwstate._outside(frozenset(inside | {before, after}), (a, b))
    assert sorted(found) == [before, after]


def test_a_group_may_use_the_whole_set_element_limit_and_no_more() -> None:
    from vpnfleet.core.grants import Grant

    limit = fwstate.MAX_SET_ELEMENTS  # 2**20 = 16 x 65534 + 32
    full = tuple(Grant(IPv4Network(f"10.{i}.0.0/16"), "tcp", 2, 65535) for i in range(16))
    assert GroupAccess(1, frozenset(), (*full, Grant(IPv4Network("10.99.0.0/16"), "udp", 1, 32)))
    with pytest.raises(ValueError, match=f"would need {limit + 1} firewall set elements"):
        GroupAccess(1, frozenset(), (*full, Grant(IPv4Network("10.99.0.0/16"), "udp", 1, 33)))
    # 0.0.0.0/0 is two set elements per port (ipset cannot hold a /0).
    world = Grant(IPv4Network("0.0.0.0/0"), "tcp", 1, 17)
    with pytest.raises(ValueError, match=f"would need {limit + 2} firewall set elements"):
        GroupAccess(1, frozenset(), (*full, world))
    with pytest.raises(ValueError, match="group id"):
        GroupAccess(fwstate.MAX_GROUP_ID + 1, frozenset(), ())
    assert GroupAccess(fwstate.MAX_GROUP_ID, frozenset(), ())
    with pytest.raises(ValueError, match="group id"):
        GroupAccess(True, frozenset(), ())  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="members must be"):
        GroupAccess(1, frozenset({"10.0.0.1"}), ())  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="grants must be"):
        GroupAccess(1, frozenset(), ("10.0.0.0/8",))  # type: ignore[arg-type]


def test_nflog_group_spans_0_to_65535() -> None:
    base = state({})
    for ok in (0, 65535):
        assert dataclasses.replace(base, nflog_group=ok).nflog_group == ok
    for bad in (-1, 65536):
        with pytest.raises(ValueError, match=f"nflog_group must be in 0..65535, not {bad}"):
            dataclasses.replace(base, nflog_group=bad)


def test_refusals_name_at_most_five_addresses() -> None:
    six = [IPv4Address(f"192.0.2.{i}") for i in range(1, 7)]
    assert fwstate._ip_list(six[:5]) == ", ".join(str(a) for a in six[:5])
    assert fwstate._ip_list(six) == ", ".join(str(a) for a in six[:5]) + " and 1 more"
