"""Incremental changes between states: set operations, their order, full-apply triggers and
revocations, checked against random states."""

from __future__ import annotations

import dataclasses
from ipaddress import IPv4Address, IPv4Network
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.unit.fw_examples import DNS, TUN, WEB, P, ip, net, sets_of, state, states
from vpnfleet.core import fwdiff, fwrender, fwstate
from vpnfleet.core.fwstate import DesiredState, GroupAccess
from vpnfleet.core.grants import Grant
from vpnfleet.core.revocation import RevokedFlow

# --- diff -------------------------------------------------------------------------------------


def apply_ops(
    sets: dict[str, frozenset[str]], ops: tuple[fwdiff.SetOp, ...]
) -> dict[str, frozenset[str]]:
    out = {n: set(e) for n, e in sets.items()}
    for op in ops:
        (out[op.set_name].add if op.op == "add" else out[op.set_name].discard)(op.element)
    return {n: frozenset(e) for n, e in out.items()}


def test_connect_adds_nat_before_access() -> None:
    old = state({1: ({ip(0)}, [WEB])})
    new = state({1: ({ip(0), ip(1)}, [WEB])})
    d = fwdiff.diff(old, new)
    assert not d.needs_full and d.revoked_flows == ()
    assert [(o.op, o.set_name, o.element) for o in d.ops] == [
        ("add", "vpnf-nat", str(ip(1))),
        ("add", "vpnf-clients", str(ip(1))),
        ("add", "vpnf-g1-m", str(ip(1))),
    ]
    assert fwdiff.render_ops(d.ops) == (
        f"add vpnf-nat {ip(1)}\nadd vpnf-clients {ip(1)}\nadd vpnf-g1-m {ip(1)}\n"
    )


def test_disconnect_removes_access_before_nat_and_revokes_everything() -> None:
    old = state({1: ({ip(0), ip(1)}, [WEB])})
    new = state({1: ({ip(0)}, [WEB])})
    d = fwdiff.diff(old, new)
    assert [o.set_name for o in d.ops] == ["vpnf-clients", "vpnf-g1-m", "vpnf-nat"]
    assert all(o.op == "del" for o in d.ops)
    assert d.revoked_flows == (RevokedFlow(ip(1), None),)


def test_grant_change_updates_destinations_and_revokes_what_was_lost() -> None:
    narrower = Grant(net("10.1.0.0/24"), "tcp", 80)
    old = state({1: ({ip(0)}, [WEB, DNS])})
    new = state({1: ({ip(0)}, [narrower, DNS])})
    d = fwdiff.diff(old, new)
    assert not d.needs_full
    assert [o.line() for o in d.ops] == ["del vpnf-g1-d 10.1.0.0/24,tcp:81"]
    assert d.revoked_flows == (RevokedFlow(ip(0), WEB),)
    assert apply_ops(sets_of(old), d.ops) == sets_of(new)


def test_grant_moved_between_groups_is_not_revoked() -> None:
    wider = Grant(net("10.1.0.0/16"), "tcp")
    old = state({1: ({ip(0)}, [WEB]), 2: ({ip(0)}, [])})
    new = state({1: ({ip(0)}, []), 2: ({ip(0)}, [wider])})
    assert fwdiff.diff(old, new).revoked_flows == ()


def test_leaving_a_group_revokes_its_grants() -> None:
    old = state({1: ({ip(0), ip(1)}, [WEB])})
    new = state({1: ({ip(1)}, [WEB])}, clients={ip(0), ip(1)})
    assert fwdiff.diff(old, new).revoked_flows == (RevokedFlow(ip(0), WEB),)


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
    d = fwdiff.diff(old, state({1: ({ip(0)}, [WEB])}, **kwargs))
    assert d.needs_full and reason in d.reasons and d.ops == ()


def test_group_added_needs_full_apply_and_leaving_allow_all_revokes() -> None:
    d = fwdiff.diff(state({1: ({ip(0)}, [WEB])}), state({1: ({ip(0)}, [WEB]), 2: (set(), [])}))
    assert d.needs_full and "groups added or removed" in d.reasons
    opened = state({}, clients={ip(0)}, allow_all=True)
    d = fwdiff.diff(opened, state({1: ({ip(0)}, [WEB])}))
    assert d.needs_full
    assert [(rf.client, rf.grant and rf.grant.proto) for rf in d.revoked_flows] == [(ip(0), "any")]


def test_growing_past_capacity_needs_full_apply() -> None:
    old = state({1: ({ip(0)}, [Grant(net("10.1.0.0/24"), "tcp", 1000, 1999)])})
    new = state({1: ({ip(0)}, [Grant(net("10.1.0.0/24"), "tcp", 1000, 60999)])})
    d = fwdiff.diff(old, new)
    assert d.needs_full and any("maxelem" in r for r in d.reasons)


@settings(max_examples=150, deadline=None)
@given(data=st.data())
def test_diff_ops_turn_old_sets_into_new_sets(data: st.DataObject) -> None:
    ids = data.draw(st.lists(st.integers(0, 9), unique=True, max_size=4))
    old, new = data.draw(states(ids)), data.draw(states(ids))
    d = fwdiff.diff(old, new)
    assert not d.needs_full
    assert apply_ops(sets_of(old), d.ops) == sets_of(new)
    # Every flow that loses access is covered by a revocation entry.
    dsts = [IPv4Address("10.1.0.5"), IPv4Address("10.1.2.5"), IPv4Address("10.2.1.5")]
    for client in old.all_clients:
        for proto, port in (("tcp", 3), ("udp", 50), ("icmp", None), ("gre", None)):
            for dst in dsts:
                lost = fwstate.is_allowed(old, client, proto, dst, port) and not fwstate.is_allowed(
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
        groups=tuple(
            GroupAccess(g.group_id, frozenset(set(g.members)), g.grants) for g in s.groups
        ),
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
    fwrender.render_full(old)  # warm the caches of the objects ``new`` reuses
    fwdiff.diff(old, other)
    groups = []
    for og, ng in zip(old.sorted_groups, other.sorted_groups, strict=True):
        reuse = data.draw(st.sampled_from(["group", "members", "grants", "nothing"]))
        if reuse == "group":
            groups.append(og)
        elif reuse == "members":
            groups.append(GroupAccess(og.group_id, og.members, ng.grants))
        elif reuse == "grants":
            groups.append(GroupAccess(og.group_id, ng.members, og.grants))
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
    assert fwdiff.diff(old, new) == fwdiff.diff(rebuilt(old), rebuilt(new))
    assert fwrender.render_full(new) == fwrender.render_full(rebuilt(new))


def test_a_new_tunnel_network_is_added_to_the_tunnel_set() -> None:
    old = state({1: ({ip(0)}, [WEB])})
    extra = IPv4Network("10.77.0.0/24")
    new = dataclasses.replace(old, tunnel_networks=(*old.tunnel_networks, extra))
    d = fwdiff.diff(old, new)
    assert not d.needs_full
    assert [(o.op, o.set_name, o.element) for o in d.ops] == [("add", "vpnf-tun", str(extra))]
    back = fwdiff.diff(new, old)
    assert [(o.op, o.set_name, o.element) for o in back.ops] == [("del", "vpnf-tun", str(extra))]
