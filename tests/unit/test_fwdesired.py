"""The desired firewall state from the fleet view and the session book."""

from __future__ import annotations

import ipaddress

from tests.unit.test_sessionbook import NOW, admit, env, user
from vpnfleet.core import fwdiff, fwstate, grants
from vpnfleet.core.fleet import FleetView
from vpnfleet.core.fwdesired import DesiredStateBuilder
from vpnfleet.core.sessionbook import BookConfig, SessionBook
from vpnfleet.wire import GroupState, RuleState, Snapshot, UserState

NAT = ipaddress.IPv4Network("10.200.0.0/24")
GW = ipaddress.IPv4Network("10.201.0.0/24")
SVC = "10.20.0.5"


def fleet(users: list[UserState], rules: list[RuleState], revision: int = 3) -> FleetView:
    groups = [GroupState(id=1, name="web"), GroupState(id=2, name="ops")]
    return FleetView.from_snapshot(
        Snapshot(
            revision=revision,
            users=users,
            groups=groups,
            rules=rules,
            pools=[],
            sessions=[],
            pods=[],
        )
    )


WEB_8080 = RuleState(id=10, group_id=1, destination=SVC, proto="tcp", ports="8080")
OPS_ALL = RuleState(id=11, group_id=2, destination="10.20.0.0/24", proto="any", ports=None)


def builder() -> DesiredStateBuilder:
    return DesiredStateBuilder("vpnf", (NAT, GW), nflog_group=7007)


def group(state: fwstate.DesiredState, gid: int) -> fwstate.GroupAccess:
    (g,) = [g for g in state.groups if g.group_id == gid]
    return g


def test_a_port_limited_rule_stays_port_limited() -> None:
    v = fleet([user("pa", groups=["web"])], [WEB_8080])
    book = SessionBook(BookConfig(NAT, GW))
    pa = admit(book, v, 1, name="pa")
    state = builder().build(v, book)
    (grant,) = group(state, 1).grants
    assert (grant.proto, grant.port_lo, grant.port_hi) == ("tcp", 8080, 8080)
    addr = ipaddress.IPv4Address(pa.tunnel_ip)
    assert fwstate.is_allowed(state, addr, "tcp", ipaddress.IPv4Address(SVC), 8080)
    assert not fwstate.is_allowed(state, addr, "tcp", ipaddress.IPv4Address(SVC), 22)


def test_connected_clients_join_their_groups_sets_and_nat_users_are_masqueraded() -> None:
    gw_user = user("gb", mode="gateway", gateway_address="10.201.0.9", groups=["ops", "web"])
    v = fleet([user("pa", groups=["web"]), gw_user, user("nobody")], [WEB_8080, OPS_ALL])
    book = SessionBook(BookConfig(NAT, GW))
    pa = admit(book, v, 1, name="pa", ip="192.0.2.1")
    gb = admit(book, v, 2, name="gb", ip="192.0.2.2")
    nobody = admit(book, v, 3, name="nobody", ip="192.0.2.3")
    pending = book.connect(v, 4, env("pa", ip="192.0.2.4"), reauth=False, uid="p", now=NOW)
    assert pending.decision.allow is False or pending.client is not None
    state = builder().build(v, book)
    ip = {c.user: ipaddress.IPv4Address(c.tunnel_ip) for c in (pa, gb, nobody)}
    assert group(state, 1).members == {ip["pa"], ip["gb"]}
    assert group(state, 2).members == {ip["gb"]}
    assert state.nat_members == {ip["pa"], ip["nobody"]}
    assert state.all_clients == set(ip.values())  # only established clients


def test_a_membership_change_reaches_clients_already_connected() -> None:
    v = fleet([user("pa", groups=["web"])], [WEB_8080])
    book = SessionBook(BookConfig(NAT, GW))
    pa = admit(book, v, 1, name="pa")
    b = builder()
    before = b.build(v, book)
    moved = fleet([user("pa", groups=["ops"])], [WEB_8080, OPS_ALL], revision=4)
    after = b.build(moved, book)
    addr = ipaddress.IPv4Address(pa.tunnel_ip)
    assert addr in group(before, 1).members
    assert addr not in group(after, 1).members and addr in group(after, 2).members
    # ops covers what web granted: nothing to cut. Leaving every group revokes the grant.
    assert fwdiff.diff(before, after).revoked_flows == ()
    alone = b.build(fleet([user("pa", groups=[])], [WEB_8080, OPS_ALL], revision=5), book)
    revoked = fwdiff.diff(before, alone).revoked_flows
    assert [(r.client, r.grant) for r in revoked] == [
        (addr, grants.Grant(ipaddress.IPv4Network(SVC), "tcp", 8080, 8080))
    ]


def test_a_deleted_user_still_connected_gets_nothing() -> None:
    v = fleet([user("pa", groups=["web"])], [WEB_8080])
    book = SessionBook(BookConfig(NAT, GW))
    pa = admit(book, v, 1, name="pa")
    state = builder().build(fleet([], [WEB_8080]), book)
    addr = ipaddress.IPv4Address(pa.tunnel_ip)
    assert not group(state, 1).members
    assert not fwstate.is_allowed(state, addr, "tcp", ipaddress.IPv4Address(SVC), 8080)


def test_unchanged_groups_are_the_same_objects() -> None:
    v = fleet([user("pa", groups=["web"]), user("qb", groups=[])], [WEB_8080, OPS_ALL])
    book = SessionBook(BookConfig(NAT, GW))
    admit(book, v, 1, name="pa", ip="192.0.2.1")
    b = builder()
    first = b.build(v, book)
    admit(book, v, 2, name="qb", ip="192.0.2.2")  # joins no group
    second = b.build(v, book)
    assert group(second, 1) is group(first, 1) and group(second, 2) is group(first, 2)
    d = fwdiff.diff(first, second)
    assert not d.needs_full and {op.set_name for op in d.ops} == {"vpnf-clients", "vpnf-nat"}


def test_the_pod_settings_reach_the_state_and_a_deleted_user_stops_nobody_else() -> None:
    v = fleet([user("ghost", groups=["web"]), user("pa", groups=["web"])], [WEB_8080])
    book = SessionBook(BookConfig(NAT, GW))
    admit(book, v, 1, name="ghost", ip="192.0.2.1")  # judged first
    pa = admit(book, v, 2, name="pa", ip="192.0.2.2")
    b = DesiredStateBuilder("vpnf", (NAT, GW), uplink="eth1", nflog_group=7007, log_denied=False)
    state = b.build(fleet([user("pa", groups=["web"])], [WEB_8080]), book)
    assert (state.uplink, state.nflog_group, state.log_denied) == ("eth1", 7007, False)
    assert group(state, 1).members == {ipaddress.IPv4Address(pa.tunnel_ip)}


def test_a_long_churn_of_clients_keeps_building_the_same_states() -> None:
    # The builder's address cache is trimmed as clients come and go: states stay right.
    v = fleet([user("pa", groups=["web"], max_sessions=2)], [WEB_8080])
    wide = ipaddress.IPv4Network("10.200.0.0/20")  # 1,200 distinct addresses over time
    book = SessionBook(BookConfig(wide, GW))
    b = DesiredStateBuilder("vpnf", (wide, GW), nflog_group=7007)
    for cid in range(1200):
        c = admit(book, v, cid, name="pa", ip=f"192.0.{cid // 250}.{cid % 250}")
        state = b.build(v, book)
        assert group(state, 1).members == {ipaddress.IPv4Address(c.tunnel_ip)}
        book.forget(cid)
    assert b.build(v, book).all_clients == frozenset()


def _over_limit_fleet(revision: int = 3, extra: list[RuleState] | None = None) -> FleetView:
    # The reproducer, stored before the control plane checked it: 17 x 65,534
    # elements in "web"; "ops" is small.
    wide = [
        RuleState(
            id=100 + nn,
            group_id=1,
            destination=f"10.1{nn:02d}.0.0/16",
            proto="tcp",
            ports="2-65535",
        )
        for nn in range(17)
    ]
    users = [user("pa", groups=["web", "ops"])]
    return fleet(users, [*wide, OPS_ALL, *(extra or [])], revision)


def test_a_group_over_the_firewall_limit_grants_nothing_and_the_others_still_apply() -> None:
    v = _over_limit_fleet()
    book = SessionBook(BookConfig(NAT, GW))
    pa = admit(book, v, 1, name="pa")
    b = builder()
    state = b.build(v, book)  # does not raise
    assert b.over_limit == {"web": 17 * 65534}
    assert b.total_elements == 17 * 65534 + 1  # ops: one network, any protocol
    addr = ipaddress.IPv4Address(pa.tunnel_ip)
    assert group(state, 1).grants == () and group(state, 1).members == {addr}
    assert not fwstate.is_allowed(state, addr, "tcp", ipaddress.IPv4Address("10.100.0.1"), 22)
    assert fwstate.is_allowed(state, addr, "tcp", ipaddress.IPv4Address(SVC), 22)  # ops: any
    # Narrowed (one rule fewer... still over; all ports instead: fits) -> enforced again.
    v2 = fleet(
        [user("pa", groups=["web", "ops"])],
        [RuleState(id=100, group_id=1, destination="10.100.0.0/16", proto="tcp", ports=None)],
        revision=4,
    )
    state2 = b.build(v2, book)
    assert b.over_limit == {}
    assert fwstate.is_allowed(state2, addr, "tcp", ipaddress.IPv4Address("10.100.0.1"), 22)
