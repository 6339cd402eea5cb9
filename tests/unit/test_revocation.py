"""Which open flows must go: after a restart (no old state) and after a change."""

from __future__ import annotations

import dataclasses
from ipaddress import IPv4Address

from hypothesis import given, settings
from hypothesis import strategies as st

from tests.unit.fw_examples import WEB, addresses, ip, nth_net, state, states
from vpnfleet.core import fwdiff, fwkernel, fwstate, revocation


def test_flows_to_cut_after_a_restart() -> None:
    s = state({1: ({ip(0)}, [WEB])}, clients={ip(0), ip(1)}, nat={ip(0)})
    text = "\n".join(
        f"tcp 6 100 ESTABLISHED src={src} dst={dst} sport=40000 dport={dport} "
        f"src={dst} dst={src} sport={dport} dport=40000 [ASSURED] mark=0 use=1"
        for src, dst, dport in [
            (ip(0), "10.1.0.5", 80),  # allowed
            (ip(0), "10.1.0.5", 22),  # port not granted
            (ip(1), "10.1.0.5", 80),  # connected, no group
            (ip(7), "10.1.0.5", 80),  # not connected any more
            ("192.0.2.9", ip(1), 22),  # inbound to a gateway client: allowed
            ("192.0.2.9", ip(0), 22),  # inbound to a NAT client
            ("192.0.2.9", ip(9), 22),  # inbound to a free tunnel address
            ("192.0.2.9", "192.0.2.10", 22),  # not ours
        ]
    )
    cut = revocation.flows_to_cut(s, fwkernel.parse_conntrack(text))
    assert [(str(f.src), str(f.dst), f.dport) for f in cut] == [
        (str(ip(0)), "10.1.0.5", 22),
        (str(ip(1)), "10.1.0.5", 80),
        (str(ip(7)), "10.1.0.5", 80),
        ("192.0.2.9", str(ip(0)), 22),
        ("192.0.2.9", str(ip(9)), 22),
    ]


@settings(max_examples=150, deadline=None)
@given(data=st.data())
def test_revoked_flows_alone_agree_with_the_diff(data: st.DataObject) -> None:
    # diff() hands the set differences it already took to the revocation analysis; the
    # standalone function takes them itself. Same answer either way, allow_all included.
    ids = data.draw(st.lists(st.integers(0, 9), unique=True, max_size=4))
    old, new = data.draw(states(ids)), data.draw(states(ids))
    if data.draw(st.booleans()):
        old = dataclasses.replace(old, allow_all=True)
    assert revocation.revoked_flows(old, new) == list(fwdiff.diff(old, new).revoked_flows)


def flows(sources: st.SearchStrategy[IPv4Address]) -> st.SearchStrategy[revocation.Flow]:
    return st.builds(
        lambda src, proto, base, n, host, port: revocation.Flow(
            proto,
            {"tcp": 6, "udp": 17, "icmp": 1}[proto],
            src,
            nth_net(base, n)[host],
            40000,
            None if proto == "icmp" else port,
        ),
        sources,
        st.sampled_from(["tcp", "udp", "icmp"]),
        st.sampled_from(["10.1.0.0", "10.2.0.0"]),  # where fw_examples' grants point
        st.integers(0, 3),
        st.integers(0, 255),
        st.sampled_from([22, 53, 80, 81, 85, 100, 101, 105, 443]),
    )


@settings(max_examples=400, deadline=None)
@given(data=st.data())
def test_every_flow_a_change_disallows_is_named_by_its_revocations(data: st.DataObject) -> None:
    """Soundness, against the brute-force answer: an open flow the old state allowed and the
    new one does not is covered by a revocation (all of the client's flows, or a grant the
    flow matches). What the runner deletes is then re-checked with is_allowed, so naming
    too much is harmless, but naming too little leaves a revoked connection open."""
    ids = data.draw(st.lists(st.integers(0, 4), unique=True, min_size=1, max_size=4))
    old = data.draw(states(ids))
    # Mostly small changes (one group's members or grants), sometimes anything at all.
    if data.draw(st.booleans()):
        # Groups may vanish or appear too (deleted, created).
        new = data.draw(states(data.draw(st.lists(st.integers(0, 4), unique=True, max_size=4))))
    else:
        # Several groups change at once over the same clients: deleted, given other members,
        # given other grants (some moved from another group), or created.
        clients = sorted(old.all_clients) or [ip(0)]
        every_grant = sorted({g for x in old.groups for g in x.grants} | {WEB}, key=str)
        new_groups = {}
        for x in old.groups:
            action = data.draw(st.sampled_from(["keep", "delete", "members", "grants"]))
            if action == "delete":
                continue
            members, grant_list = set(x.members), list(x.grants)
            if action == "members":
                members = data.draw(st.sets(st.sampled_from(clients))) & old.all_clients
            elif action == "grants":
                grant_list = data.draw(st.lists(st.sampled_from(every_grant), max_size=3))
            new_groups[x.group_id] = (members, grant_list)
        if data.draw(st.booleans()):  # a new group (ids above are 0..4)
            joined = data.draw(st.sets(st.sampled_from(clients))) & old.all_clients
            new_groups[5] = (joined, data.draw(st.lists(st.sampled_from(every_grant), max_size=2)))
        new = state(new_groups, clients=set(old.all_clients), nat=set(old.nat_members))
    if data.draw(st.booleans()):
        old = dataclasses.replace(old, allow_all=True)
    revoked = fwdiff.diff(old, new).revoked_flows
    # Flows of connected clients mostly (those are what a change can revoke), some of others.
    sources = st.sampled_from(sorted(old.all_clients)) if old.all_clients else addresses
    for f in data.draw(st.lists(flows(st.one_of(sources, sources, addresses)), max_size=20)):
        before = fwstate.is_allowed(old, f.src, f.proto, f.dst, f.dport)
        after = fwstate.is_allowed(new, f.src, f.proto, f.dst, f.dport)
        if before and not after:
            assert any(
                r.client == f.src and (r.grant is None or r.grant.matches(f.proto, f.dst, f.dport))
                for r in revoked
            ), (f, revoked)


def test_a_client_that_lost_nothing_does_not_hide_the_next_one() -> None:
    # ip(0) leaves a group that grants nothing; ip(1) leaves one that grants WEB.
    old = state({1: ({ip(0)}, []), 2: ({ip(1)}, [WEB])}, clients={ip(0), ip(1)})
    new = state({1: (set(), []), 2: (set(), [WEB])}, clients={ip(0), ip(1)})
    assert revocation.revoked_flows(old, new) == [revocation.RevokedFlow(ip(1), WEB)]
    assert list(fwdiff.diff(old, new).revoked_flows) == [revocation.RevokedFlow(ip(1), WEB)]
