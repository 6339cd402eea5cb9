"""Which open flows must go: after a restart (no old state) and after a change."""

from __future__ import annotations

import dataclasses

from hypothesis import given, settings
from hypothesis import strategies as st

from tests.unit.fw_examples import WEB, ip, state, states
from vpnfleet.core import fwdiff, fwkernel, revocation


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
