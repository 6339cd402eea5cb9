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
