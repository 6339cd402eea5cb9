"""The agent's fleet view and CONNECT decisions."""

from __future__ import annotations

import ipaddress

import pytest

from vpnfleet.core import authz, ipam
from vpnfleet.core.fleet import FleetView
from vpnfleet.wire import LiveSession, Snapshot, UserState


def view(*users: UserState, sessions: tuple[LiveSession, ...] = ()) -> FleetView:
    return FleetView.from_snapshot(
        Snapshot(
            revision=7, users=list(users), groups=[], rules=[], pools=[], sessions=list(sessions)
        )
    )


ALICE = UserState(id=1, name="alice", enabled=True, mode="nat", max_sessions=1, cert_serial="123")
GW = UserState(
    id=2,
    name="gw",
    enabled=True,
    mode="gateway",
    max_sessions=2,
    cert_serial="55",
    gateway_address="10.201.0.2",
)


def test_decisions() -> None:
    v = view(ALICE, GW)
    assert authz.decide(v, "alice", "123", 0).allow
    assert authz.decide(v, "gw", "55", 1).allow
    cases = [
        ("nobody", "1", 0, "unknown user", "unknown account"),
        ("alice", "124", 0, "certificate not current", "certificate revoked or replaced"),
        ("alice", None, 0, "certificate not current", "certificate revoked or replaced"),
        ("alice", "junk", 0, "certificate not current", "certificate revoked or replaced"),
        ("alice", "123", 1, "session limit reached (1)", "too many sessions"),
    ]
    for cn, serial, local, reason, client_reason in cases:
        d = authz.decide(v, cn, serial, local)
        assert (d.allow, d.reason, d.client_reason) == (False, reason, client_reason)
    assert authz.decide(v, "alice", "123", 1).label == "session_limit_reached"
    disabled = view(ALICE.model_copy(update={"enabled": False}))
    assert authz.decide(disabled, "alice", "123", 0).client_reason == "account disabled"
    no_lease = view(GW.model_copy(update={"gateway_address": None}))
    assert authz.decide(no_lease, "gw", "55", 0).reason == "no gateway address leased"


def test_fleet_wide_session_count_comes_from_the_view() -> None:
    other_pod = LiveSession(
        uid="pod2-abcdefgh", user="alice", pod="pod2", tunnel_ip="10.200.0.2", mode="nat"
    )
    v = view(ALICE, sessions=(other_pod,))
    assert authz.decide(v, "alice", "123", 0).reason == "session limit reached (1)"
    v.apply(
        {
            "type": "change",
            "revision": 8,
            "kind": "session",
            "op": "delete",
            "id": 1,
            "data": {"uid": "pod2-abcdefgh"},
        }
    )
    assert authz.decide(v, "alice", "123", 0).allow and v.revision == 8


def test_user_changes_produce_kicks() -> None:
    v = view(ALICE)
    base = {"type": "change", "kind": "user", "op": "upsert", "id": 1}
    e = v.apply(
        {
            **base,
            "revision": 8,
            "data": {
                "name": "alice",
                "enabled": False,
                "mode": "nat",
                "max_sessions": 1,
                "cert_serial": "123",
            },
        }
    )
    assert e.kick == {"alice": "account disabled"}
    e = v.apply(
        {
            **base,
            "revision": 9,
            "data": {
                "name": "alice",
                "enabled": True,
                "mode": "nat",
                "max_sessions": 1,
                "cert_serial": "999",
            },
        }
    )
    assert e.kick == {"alice": "certificate revoked or replaced"} and e.crl
    e = v.apply(
        {
            **base,
            "revision": 10,
            "data": {
                "name": "alice",
                "enabled": True,
                "mode": "nat",
                "max_sessions": 1,
                "cert_serial": "999",
                "groups": ["devs"],
            },
        }
    )
    assert not e.kick and e.dataplane
    e = v.apply({**base, "op": "delete", "revision": 11, "data": {"name": "alice"}})
    assert e.kick == {"alice": "account deleted"} and "alice" not in v.users
    e = v.apply(
        {
            "type": "change",
            "revision": 12,
            "kind": "kill",
            "op": "upsert",
            "id": 1,
            "data": {"user": "bob"},
        }
    )
    assert e.kick == {"bob": "disconnected by an administrator"}
    assert not v.apply({"type": "change", "revision": 13, "kind": "martian", "op": "x"}).kick
    assert v.revision == 13


def test_allocator_rotates_and_exhausts() -> None:
    alloc = ipam.AddressAllocator(ipaddress.IPv4Network("10.0.0.0/29"))
    got = [alloc.allocate() for _ in range(5)]
    assert [str(a) for a in got] == ["10.0.0.2", "10.0.0.3", "10.0.0.4", "10.0.0.5", "10.0.0.6"]
    with pytest.raises(ipam.PoolExhausted):
        alloc.allocate()
    alloc.release(got[1])
    assert str(alloc.allocate()) == "10.0.0.3"
    alloc.release(got[0])
    alloc.release(got[2])
    # The cursor moves on from where it stopped (.4) instead of going back to the lowest (.2).
    assert str(alloc.allocate()) == "10.0.0.4"
    assert str(alloc.allocate()) == "10.0.0.2"
    assert not alloc.reserve(ipaddress.IPv4Address("10.0.0.1"))
    assert alloc.reserve(ipaddress.IPv4Address("10.0.0.4"))


def test_the_same_address_reconnecting_replaces_its_old_session() -> None:
    old = LiveSession(
        uid="pod1-old00000",
        user="alice",
        pod="pod1",
        tunnel_ip="10.200.0.2",
        mode="nat",
        real_ip="198.51.100.7",
    )
    v = view(ALICE, sessions=(old,))
    assert not authz.decide(v, "alice", "123", 0).allow
    assert authz.decide(v, "alice", "123", 0, frozenset({"pod1-old00000"})).allow
    e = v.apply(
        {
            "type": "change",
            "revision": 9,
            "kind": "kill",
            "op": "upsert",
            "id": 1,
            "data": {"user": "alice", "sessions": ["pod1-old00000"]},
        }
    )
    assert e.kick_sessions == {"pod1-old00000": "disconnected by the control plane"}
    assert not e.kick


def test_events_the_view_already_contains_are_not_replayed() -> None:
    """After a resync the watch stream may replay events older than the new snapshot:
    passing through those old states again would kick users who are fine now."""
    v = view(ALICE)
    v.revision = 20  # a snapshot that already has alice disabled at 18 and re-enabled at 19
    disabled = {
        "type": "change", "kind": "user", "op": "upsert", "id": 1, "revision": 18,
        "data": {"name": "alice", "enabled": False, "mode": "nat", "max_sessions": 1,
                 "cert_serial": "123"},
    }  # fmt: skip
    e = v.apply(disabled)
    assert not e.kick and v.users["alice"].enabled and v.revision == 20
    e = v.apply({**disabled, "revision": 21})
    assert e.kick == {"alice": "account disabled"} and v.revision == 21
