"""The agent's fleet view and CONNECT decisions."""

from __future__ import annotations

import datetime as dt
import ipaddress

import pytest
from pydantic import ValidationError

from vpnfleet.core import authz, ipam
from vpnfleet.core.fleet import FleetView
from vpnfleet.wire import (
    CrlUpdate,
    CrlUpsert,
    GroupDelete,
    GroupKey,
    GroupState,
    GroupUpsert,
    LiveSession,
    MembershipDelete,
    MembershipState,
    MembershipUpsert,
    RuleDelete,
    RuleKey,
    RuleState,
    RuleUpsert,
    SessionDelete,
    SessionKey,
    SessionUpsert,
    Snapshot,
    UserDelete,
    UserKey,
    UserState,
    UserUpsert,
)

AT = dt.datetime(2026, 1, 31, 12, 0, tzinfo=dt.UTC)


def view(
    *users: UserState,
    sessions: tuple[LiveSession, ...] = (),
    groups: tuple[GroupState, ...] = (),
    rules: tuple[RuleState, ...] = (),
) -> FleetView:
    return FleetView.from_snapshot(
        Snapshot(
            revision=7,
            users=list(users),
            groups=list(groups),
            rules=list(rules),
            pools=[],
            sessions=list(sessions),
            pods=[],
        )
    )


def user(name: str = "alice", **fields: object) -> UserState:
    base: dict[str, object] = {
        "id": 1,
        "name": name,
        "enabled": True,
        "mode": "nat",
        "max_sessions": 1,
        "groups": [],
        "gateway_address": None,
        "cert_serial": "123",
        "auth": "cert",
    }
    return UserState.model_validate({**base, **fields})


def session(uid: str, name: str = "alice", **fields: object) -> LiveSession:
    base: dict[str, object] = {
        "uid": uid,
        "user": name,
        "pod": "pod2",
        "tunnel_ip": "10.200.0.2",
        "mode": "nat",
        "real_ip": None,
        "kill": None,
    }
    return LiveSession.model_validate({**base, **fields})


ALICE = user()
GW = user(
    "gw", id=2, mode="gateway", max_sessions=2, cert_serial="55", gateway_address="10.201.0.2"
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
    v = view(ALICE, sessions=(session("pod2-abcdefgh"),))
    assert authz.decide(v, "alice", "123", 0).reason == "session limit reached (1)"
    v.apply(SessionDelete(revision=8, at=AT, key=SessionKey(uid="pod2-abcdefgh")))
    assert authz.decide(v, "alice", "123", 0).allow and v.revision == 8


def test_user_changes_name_the_user_to_re_judge() -> None:
    v = view(ALICE)
    e = v.apply(UserUpsert(revision=8, at=AT, object=user(enabled=False)))
    assert e.users == {"alice"} and not e.dataplane and not e.crl
    e = v.apply(UserUpsert(revision=9, at=AT, object=user(cert_serial="999")))
    assert e.users == {"alice"} and e.crl
    e = v.apply(UserUpsert(revision=10, at=AT, object=user(cert_serial="999", groups=["devs"])))
    assert e.users == {"alice"} and e.dataplane and not e.crl
    e = v.apply(
        UserUpsert(
            revision=11,
            at=AT,
            object=user(
                cert_serial="999", groups=["devs"], mode="gateway", gateway_address="10.201.0.9"
            ),
        )
    )
    assert e.users == {"alice"} and v.users["alice"].mode == "gateway"
    e = v.apply(UserDelete(revision=12, at=AT, key=UserKey(id=1, name="alice")))
    assert e.users == {"alice"} and e.dataplane and "alice" not in v.users
    assert v.revision == 12


def test_a_killed_session_is_kicked_and_stops_counting() -> None:
    """A kill is state: the session upsert that carries it kicks the session (not the user's
    other sessions), the session no longer holds a place in the limit, and `killed()` lists it
    for an agent that learns it from a snapshot."""
    v = view(ALICE, GW, sessions=(session("pod2-abcdefgh"), session("pod2-gw000001", "gw")))
    assert not authz.decide(v, "alice", "123", 0).allow
    assert v.killed() == {}
    killed = session("pod2-abcdefgh", kill="disconnected by an administrator")
    e = v.apply(SessionUpsert(revision=8, at=AT, object=killed))
    assert e.sessions == {"pod2-abcdefgh"}
    assert not e.users and not e.dataplane
    assert "pod2-abcdefgh" in v.sessions  # live until its pod closes it
    assert authz.decide(v, "alice", "123", 0).allow
    assert v.killed() == {"pod2-abcdefgh": "disconnected by an administrator"}
    again = view(ALICE, sessions=(killed,))  # an agent restarting after the kill
    assert again.killed() == {"pod2-abcdefgh": "disconnected by an administrator"}
    e = v.apply(SessionUpsert(revision=9, at=AT, object=session("pod2-new00000")))
    assert not e.sessions


def test_the_same_address_reconnecting_replaces_its_old_session() -> None:
    old = session("pod1-old00000", pod="pod1", real_ip="198.51.100.7")
    v = view(ALICE, sessions=(old,))
    assert not authz.decide(v, "alice", "123", 0).allow
    assert authz.decide(v, "alice", "123", 0, frozenset({"pod1-old00000"})).allow
    replaced = old.model_copy(update={"kill": "replaced by a new connection from the same address"})
    e = v.apply(SessionUpsert(revision=9, at=AT, object=replaced))
    assert e.sessions == {"pod1-old00000"} and not e.users
    assert v.killed() == {"pod1-old00000": "replaced by a new connection from the same address"}


def test_rules_keep_exactly_what_they_grant() -> None:
    v = view(ALICE, groups=(GroupState(id=3, name="devs"),))
    ssh = RuleState(id=5, group_id=3, destination="10.0.0.0/8", proto="tcp", ports="22")
    e = v.apply(RuleUpsert(revision=8, at=AT, object=ssh))
    assert e.dataplane and v.rules == {5: ssh}
    assert v.rules[5].ports == "22"  # a port-limited grant never widens to all ports
    e = v.apply(RuleDelete(revision=9, at=AT, key=RuleKey(id=5, group_id=3)))
    assert e.dataplane and v.rules == {}


def test_memberships_and_group_deletes_keep_users_groups_current() -> None:
    devs, ops = GroupState(id=3, name="devs"), GroupState(id=4, name="ops")
    rule = RuleState(id=5, group_id=3, destination="10.0.0.0/8", proto="any", ports=None)
    v = view(ALICE, groups=(devs, ops), rules=(rule,))
    m = MembershipState(group_id=4, group="ops", user_id=1, user="alice")
    e = v.apply(MembershipUpsert(revision=8, at=AT, object=m))
    assert e.dataplane and v.users["alice"].groups == ["ops"]
    m = m.model_copy(update={"group_id": 3, "group": "devs"})
    v.apply(MembershipUpsert(revision=9, at=AT, object=m))
    assert v.users["alice"].groups == ["devs", "ops"]
    e = v.apply(GroupDelete(revision=10, at=AT, key=GroupKey(id=3, name="devs")))
    assert e.dataplane and v.users["alice"].groups == ["ops"]
    assert 3 not in v.groups and v.rules == {}
    m = m.model_copy(update={"group_id": 4, "group": "ops"})
    v.apply(MembershipDelete(revision=11, at=AT, key=m))
    assert v.users["alice"].groups == []


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


def test_events_the_view_already_contains_are_not_replayed() -> None:
    """After a resync the watch stream may replay events older than the new snapshot:
    passing through those old states again would kick users who are fine now."""
    v = view(ALICE)
    v.revision = 20  # a snapshot that already has alice disabled at 18 and re-enabled at 19
    disabled = UserUpsert(revision=18, at=AT, object=user(enabled=False))
    e = v.apply(disabled)
    assert not e.users and v.users["alice"].enabled and v.revision == 20
    e = v.apply(disabled.model_copy(update={"revision": 21}))
    assert e.users == {"alice"} and not v.users["alice"].enabled and v.revision == 21


def test_a_gateway_user_without_a_lease_is_refused_and_limits_count_exactly() -> None:
    no_lease = authz.decide(view(GW.model_copy(update={"gateway_address": None})), "gw", "55", 0)
    assert (no_lease.allow, no_lease.client_reason) == (False, "no gateway address")
    two = ALICE.model_copy(update={"max_sessions": 2})
    # One session elsewhere, limit two: the second is allowed, the third is not.
    assert authz.decide(view(two, sessions=(session("pod2-abcdefgh"),)), "alice", "123", 0).allow
    both = (session("pod2-abcdefgh"), session("pod2-abcdefgi"))
    assert not authz.decide(view(two, sessions=both), "alice", "123", 0).allow


def test_what_each_event_asks_the_agent_to_do() -> None:
    v = view(ALICE)
    e = v.apply(GroupUpsert(revision=8, at=AT, object=GroupState(id=3, name="devs")))
    assert e.dataplane and not e.users
    e = v.apply(CrlUpsert(revision=9, at=AT, object=CrlUpdate(revoked=["12"])))
    assert e.crl and not e.dataplane
    # Deleting what the view does not hold is harmless (the view may be newer than the event).
    v.apply(UserDelete(revision=10, at=AT, key=UserKey(id=9, name="nobody")))
    v.apply(SessionDelete(revision=11, at=AT, key=SessionKey(uid="pod9-unknown0")))
    v.apply(GroupDelete(revision=12, at=AT, key=GroupKey(id=99, name="gone")))
    v.apply(RuleDelete(revision=13, at=AT, key=RuleKey(id=99, group_id=99)))
    assert v.revision == 13
    # An event at the view's own revision is already in it.
    e = v.apply(UserUpsert(revision=13, at=AT, object=user(enabled=False)))
    assert not e.users and v.users["alice"].enabled


def test_a_cert_sso_user_is_refused_at_connect_and_kept_at_reauth() -> None:
    """Until the web-auth login exists, the certificate alone never admits a cert+sso user;
    a renegotiation of a connection that was admitted is not refused for it."""
    v = view(ALICE.model_copy(update={"auth": "cert+sso"}), GW)
    d = authz.decide(v, "alice", "123", 0)
    assert (d.allow, d.reason, d.client_reason) == (
        False,
        "single sign-on required",
        "single sign-on login required",
    )
    assert d.label == "single_sign-on_required"
    assert authz.decide(v, "alice", "123", 0, reauth=True).allow
    assert authz.decide(v, "gw", "55", 0).allow  # other users are not affected
    # A disabled user is refused as disabled, whatever the policy.
    off = view(ALICE.model_copy(update={"auth": "cert+sso", "enabled": False}))
    assert authz.decide(off, "alice", "123", 0, reauth=True).reason == "user disabled"


def test_the_auth_field_is_required_and_checked_on_the_wire() -> None:
    base = ALICE.model_dump()
    del base["auth"]
    with pytest.raises(ValidationError):
        UserState.model_validate(base)
    with pytest.raises(ValidationError):
        UserState.model_validate({**base, "auth": "sso"})


def test_a_users_devices_connect_with_their_own_certificates() -> None:
    with_devices = user(device_serials=["700", "701"])
    v = view(with_devices)
    for serial in ("123", "700", "0701"):  # main, devices; OpenVPN's decimal may be padded
        assert authz.decide(v, "alice", serial, 0).allow, serial
    refused = authz.decide(v, "alice", "702", 0)
    assert (refused.allow, refused.client_reason) == (False, "certificate revoked or replaced")
    # A device removed: the event says the CRL changed; that serial is refused from now on.
    e = v.apply(UserUpsert(revision=9, at=AT, object=user(device_serials=["701"])))
    assert e.crl and e.users == {"alice"}
    assert not authz.decide(v, "alice", "700", 0).allow
    assert authz.decide(v, "alice", "701", 0).allow


def test_device_serials_stay_off_the_wire_when_there_are_none() -> None:
    # Agents from before devices refuse unknown fields: a user without devices looks the same.
    assert "device_serials" not in user().model_dump(mode="json")
    assert user(device_serials=["7"]).model_dump(mode="json")["device_serials"] == ["7"]
    assert UserState.model_validate(user().model_dump(mode="json")).device_serials == []
