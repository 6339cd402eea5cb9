"""Which open flows must go: after a restart (no old state) and after a change."""

from __future__ import annotations

import dataclasses

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


flows = st.builds(
    lambda src, proto, base, n, host, port: revocation.Flow(
        proto,
        {"tcp": 6, "udp": 17, "icmp": 1}[proto],
        src,
        nth_net(base, n)[host],
        40000,
        None if proto == "icmp" else port,
    ),
    addresses,
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
        gid = data.draw(st.sampled_from(ids))
        g = old.groups_by_id[gid]
        members = data.draw(st.sets(st.sampled_from(sorted(old.all_clients) or [ip(0)])))
        members &= old.all_clients
        grant_list = data.draw(st.lists(st.sampled_from(list(g.grants) or [WEB]), max_size=3))
        new_groups = {
            x.group_id: (set(x.members), list(x.grants)) for x in old.groups if x.group_id != gid
        }
        new_groups[gid] = (members, grant_list)
        new = state(new_groups, clients=set(old.all_clients), nat=set(old.nat_members))
    if data.draw(st.booleans()):
        old = dataclasses.replace(old, allow_all=True)
    revoked = fwdiff.diff(old, new).revoked_flows
    for f in data.draw(st.lists(flows, max_size=20)):
        before = fwstate.is_allowed(old, f.src, f.proto, f.dst, f.dport)
        after = fwstate.is_allowed(new, f.src, f.proto, f.dst, f.dport)
        if before and not after:
            assert any(
                r.client == f.src and (r.grant is None or r.grant.matches(f.proto, f.dst, f.dport))
                for r in revoked
            ), (f, revoked)
