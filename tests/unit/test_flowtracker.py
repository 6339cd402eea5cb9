"""The flow tracker: attribution, privacy, late start, eviction, resync, the open-flow index
for revocation, and the records' JSON."""

from __future__ import annotations

import datetime as dt
import json
from ipaddress import IPv4Address, IPv4Network
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vpnfleet.core.flowevents import FlowEvent, FlowEventKind, Resync
from vpnfleet.core.flowtracker import FlowRecord, FlowTracker, TrackerCounters, flow_id
from vpnfleet.core.fwstate import DesiredState
from vpnfleet.core.revocation import Flow, flows_to_cut

AT = dt.datetime(2026, 11, 26, 15, 21, 36, tzinfo=dt.UTC)

TUNNEL = "10.77.0.0/24"
START_NS = 1_795_706_494_934_984_500


def event(
    kind: FlowEventKind,
    *,
    src: str = "10.77.0.2",
    sport: int = 40000,
    dst: str = "192.0.2.10",
    dport: int = 443,
    proto: int = 6,
    ct_id: int = 1,
    nat_port: int = 61000,
    start_ns: int | None = None,
    stop_ns: int | None = None,
    event_ns: int | None = None,
    counters: tuple[int, int, int, int] | None = None,
    at: dt.datetime = AT,
    from_dump: bool = False,
) -> FlowEvent:
    p_o, b_o, p_r, b_r = counters if counters else (None, None, None, None)
    return FlowEvent(kind, proto, src, sport, dst, dport, dst, dport, "198.18.0.1", nat_port,
                     ct_id, start_ns, stop_ns, event_ns, p_o, b_o, p_r, b_r, at,
                     from_dump)  # fmt: skip


def new(**kw: Any) -> FlowEvent:
    return event(FlowEventKind.NEW, **kw)


def destroy(**kw: Any) -> FlowEvent:
    kw.setdefault("start_ns", START_NS)
    kw.setdefault("stop_ns", START_NS + 5_000_000_000)
    kw.setdefault("counters", (10, 1000, 8, 5000))
    return event(FlowEventKind.DESTROY, **kw)


class Owners:
    """The lookup the agent gives: tunnel IP -> (user, session uid), changeable."""

    def __init__(self) -> None:
        self.by_ip: dict[str, tuple[str, str]] = {"10.77.0.2": ("alice", "sess-a")}
        self.calls = 0

    def __call__(self, ip: str) -> tuple[str, str] | None:
        self.calls += 1
        return self.by_ip.get(ip)


def tracker(**kw: Any) -> tuple[FlowTracker, Owners]:
    owners = Owners()
    return FlowTracker("pod-1", [TUNNEL], owners, **kw), owners


def test_start_and_end_records_attribute_the_flow() -> None:
    t, _ = tracker()
    (start,) = t.feed(new(event_ns=START_NS + 200))
    assert start.kind == "start" and start.end_ms is None and start.bytes_out is None
    assert (start.user, start.session_uid, start.pod) == ("alice", "sess-a", "pod-1")
    assert (start.proto, start.tunnel_ip, start.tunnel_port) == ("tcp", "10.77.0.2", 40000)
    assert (start.nat_ip, start.nat_port, start.dst_ip, start.dst_port) == (
        "198.18.0.1", 61000, "192.0.2.10", 443)  # fmt: skip
    assert start.start_ms == START_NS // 1_000_000  # the kernel's event time, not ours
    assert start.flow_id == flow_id("pod-1", 1, start.start_ms)
    (end,) = t.feed(destroy())
    assert end.kind == "end" and end.flow_id == start.flow_id
    assert (end.user, end.session_uid) == ("alice", "sess-a")
    assert (end.start_ms, end.end_ms) == (START_NS // 1_000_000, START_NS // 1_000_000 + 5000)
    assert (end.packets_out, end.bytes_out, end.packets_in, end.bytes_in) == (10, 1000, 8, 5000)
    assert not end.end_inferred and len(t) == 0
    json.dumps(end.as_dict())  # shippable as is


def test_owner_at_start_keeps_the_flow_after_the_ip_changes_hands() -> None:
    t, owners = tracker()
    t.feed(new())
    owners.by_ip["10.77.0.2"] = ("bob", "sess-b")  # alice left, bob got her address
    (end,) = t.feed(destroy())
    assert (end.user, end.session_uid) == ("alice", "sess-a")
    assert owners.calls == 1  # asked once, at the start


def test_shutdown_ends_every_open_flow_as_inferred() -> None:
    t, _ = tracker()
    (a,) = t.feed(new(event_ns=START_NS))
    t.feed(new(ct_id=2, sport=40001, event_ns=START_NS))
    t.feed(destroy(ct_id=2, sport=40001))
    later = dt.datetime.fromtimestamp(START_NS / 1e9 + 60, dt.UTC)
    (end,) = t.end_all(later)
    assert end.flow_id == a.flow_id and end.end_inferred and end.bytes_out is None
    assert end.end_ms == START_NS // 1_000_000 + 60_000 and end.user == "alice"
    assert len(t) == 0 and t.end_all(later) == []


def test_start_time_falls_back_to_read_time_without_kernel_timestamps() -> None:
    t, _ = tracker()
    (start,) = t.feed(new(at=AT))
    assert start.start_ms == int(AT.timestamp() * 1000)


def test_flows_not_from_the_tunnel_are_ignored() -> None:
    t, owners = tracker()
    assert t.feed(new(src="198.18.0.1")) == []  # the pod's own connection
    assert t.feed(new(src="fd00::2")) == []
    assert t.feed(destroy(src="192.0.2.99")) == []
    assert t.counters.ignored == 3 and owners.calls == 0 and len(t) == 0


def test_flow_from_an_unowned_tunnel_ip_is_still_recorded() -> None:
    t, _ = tracker()
    (start,) = t.feed(new(src="10.77.0.99"))
    assert (start.user, start.session_uid, start.tunnel_ip) == (None, None, "10.77.0.99")
    assert t.counters.unattributed == 1


def test_privacy_option_drops_destinations() -> None:
    t, _ = tracker(record_destination=False)
    (start,) = t.feed(new())
    (end,) = t.feed(destroy())
    for rec in (start, end):
        assert rec.dst_ip is None and rec.dst_port is None
        assert rec.nat_port == 61000 and rec.user == "alice"  # the audit part stays
        assert "192.0.2.10" not in json.dumps(rec.as_dict())


def test_destroy_without_new_gives_one_complete_record() -> None:
    t, _ = tracker()
    records = t.feed(destroy())
    assert len(records) == 1
    (rec,) = records
    assert rec.kind == "end" and rec.user == "alice"
    assert rec.start_ms == START_NS // 1_000_000 and rec.bytes_in == 5000
    assert t.counters.late == 1 and len(t) == 0


def test_flow_id_is_the_same_whether_the_start_was_seen_or_missed() -> None:
    # Seen: start from the NEW event's kernel event time; missed: from the DESTROY's start.
    seen, _ = tracker()
    (start,) = seen.feed(new(event_ns=START_NS + 300))
    missed, _ = tracker()
    (end,) = missed.feed(destroy())
    assert start.flow_id == end.flow_id


def test_memory_is_bounded_by_evicting_the_oldest() -> None:
    t, _ = tracker(max_flows=2)
    for i in range(1, 4):
        t.feed(new(ct_id=i, sport=40000 + i, event_ns=START_NS))
    assert len(t) == 2 and t.counters.evicted == 1
    # The evicted flow still ends with a complete record under the same id.
    (end,) = t.feed(destroy(ct_id=1, sport=40001))
    assert end.flow_id == flow_id("pod-1", 1, START_NS // 1_000_000)
    assert t.counters.late == 1


def test_a_relisted_flow_is_not_reported_twice() -> None:
    t, _ = tracker()
    t.feed(new())
    assert t.feed(new(start_ns=START_NS, from_dump=True)) == []


def _ns(at: dt.datetime) -> int:
    return int(at.timestamp() * 1_000_000_000)


def test_resync_closes_flows_whose_destroy_was_lost() -> None:
    t, _ = tracker()
    before, after = _ns(AT - dt.timedelta(seconds=5)), _ns(AT + dt.timedelta(seconds=1))
    t.feed(new(ct_id=1, sport=1, event_ns=before))  # still open: the dump lists it
    t.feed(new(ct_id=2, sport=2, event_ns=before))  # ended during the overrun: not listed
    t.feed(new(ct_id=3, sport=3, event_ns=before))  # ends during the dump, live event
    t.feed(Resync("begin", AT))
    # Read late, from the backlog: started before the dump, its DESTROY was lost.
    t.feed(new(ct_id=5, sport=5, event_ns=before))
    # Started after the dump began: the dump cannot say anything about it.
    t.feed(new(ct_id=6, sport=6, event_ns=after))
    assert t.feed(destroy(ct_id=3, sport=3))[0].kind == "end"
    assert t.feed(new(ct_id=1, sport=1, start_ns=before, from_dump=True)) == []
    # Listed by the dump but already destroyed (the snapshot is older than the event).
    assert t.feed(new(ct_id=3, sport=3, start_ns=before, from_dump=True)) == []
    # Opened while we were deaf: learned from the dump, with its kernel start time.
    (learned,) = t.feed(new(ct_id=4, sport=4, start_ns=before, from_dump=True))
    assert learned.kind == "start" and learned.start_ms == before // 1_000_000
    end_at = AT + dt.timedelta(seconds=2)
    gone = t.feed(Resync("end", end_at))
    assert sorted(r.tunnel_port for r in gone) == [2, 5]
    for r in gone:
        assert r.kind == "end" and r.end_inferred and r.user == "alice"
        assert r.end_ms == int(end_at.timestamp() * 1000) and r.bytes_out is None
    assert len(t) == 3 and t.counters.inferred_ends == 2  # 1, 4 and 6 are open


def test_aborted_resync_closes_nothing() -> None:
    t, _ = tracker()
    t.feed(new())
    t.feed(Resync("begin", AT))
    assert t.feed(Resync("abort", AT)) == []
    assert len(t) == 1
    assert t.feed(Resync("end", AT)) == []  # an end without a begin is ignored


def test_tunnel_networks_are_checked_exactly() -> None:
    t = FlowTracker("p", ["10.8.0.0/16", "100.64.0.0/30"], lambda _: None)
    assert t.is_tunnel("10.8.255.1") and t.is_tunnel("100.64.0.3")
    assert not t.is_tunnel("10.9.0.1") and not t.is_tunnel("100.64.0.4")
    assert not t.is_tunnel("not an ip") and not t.is_tunnel("::1")
    with pytest.raises(ValueError):
        FlowTracker("p", ["10.8.0.1/16"], lambda _: None)  # host bits: a typo, not a network


_kinds = st.sampled_from([FlowEventKind.NEW, FlowEventKind.DESTROY])
_events = st.builds(
    lambda kind, ct_id, src, dump, start: event(
        kind, ct_id=ct_id, src=src, sport=ct_id, from_dump=dump, start_ns=start
    ),
    _kinds,
    st.integers(0, 20),
    st.sampled_from(["10.77.0.2", "10.77.0.3", "198.18.0.1", "::1", "", "10.77.0.256"]),
    st.booleans(),
    st.one_of(st.none(), st.integers(0, 2**64 - 1)),
)
_items = st.one_of(
    _events, st.builds(Resync, st.sampled_from(["begin", "end", "abort"]), st.just(AT))
)


@settings(max_examples=300, deadline=None)
@given(st.lists(_items, max_size=60))
def test_any_event_sequence_is_handled_within_bounds(items: list[Any]) -> None:
    t, _ = tracker(max_flows=5)
    opened: set[str] = set()
    for item in items:
        for rec in t.feed(item):
            assert isinstance(rec, FlowRecord)
            if rec.kind == "start":
                opened.add(rec.flow_id)
        assert len(t) <= 5
    assert t.counters.records >= len(opened)


_text = st.text(max_size=20)  # quotes, backslashes, control and non-ASCII characters too
_maybe_int = st.one_of(st.none(), st.integers(0, 2**64 - 1))


@given(
    st.builds(
        FlowRecord,
        st.sampled_from(["start", "end"]),
        _text,
        _text,
        st.one_of(st.none(), _text),
        st.one_of(st.none(), _text),
        _text,
        st.integers(0, 2**63),
        _maybe_int,
        _text,
        st.integers(0, 65535),
        _text,
        st.integers(0, 65535),
        st.one_of(st.none(), _text),
        st.one_of(st.none(), st.integers(0, 65535)),
        _maybe_int,
        _maybe_int,
        _maybe_int,
        _maybe_int,
        st.booleans(),
    )
)
def test_record_json_is_exactly_the_dict(record: FlowRecord) -> None:
    assert json.loads(record.to_json()) == record.as_dict()
    line = record.to_log_line()
    assert line.endswith("\n") and line.count("\n") == 1 and line.isascii()
    assert json.loads(line) == {"event": "flow", **record.as_dict()}


# --- the open-flow index (revocation) -----------------------------------------------------

OUTSIDE = "192.0.2.9"
GATEWAY_USER = "10.77.0.3"


def inbound(kind: FlowEventKind = FlowEventKind.NEW, **kw: Any) -> FlowEvent:
    """A connection from outside to a (gateway) user's tunnel address, ssh to it by default."""
    kw = {"src": OUTSIDE, "sport": 50000, "dst": GATEWAY_USER, "dport": 22, **kw}
    if kind is FlowEventKind.DESTROY:
        return destroy(**kw)
    return new(**kw)


def tuples(t: FlowTracker) -> list[tuple[str, str, int | None, str, int | None]]:
    return [(f.proto, str(f.src), f.sport, str(f.dst), f.dport) for f in t.open_flows()]


def test_flows_towards_a_tunnel_address_are_indexed_without_records() -> None:
    t, owners = tracker()
    assert t.feed(inbound(ct_id=5)) == []
    assert (len(t), t.inbound, owners.calls) == (0, 1, 0)
    assert t.counters == TrackerCounters(ignored=1)  # no record, nobody attributed
    assert t.open_flows() == [
        Flow("tcp", 6, IPv4Address(OUTSIDE), IPv4Address(GATEWAY_USER), 50000, 22)
    ]
    assert t.feed(inbound(FlowEventKind.DESTROY, ct_id=5)) == []
    assert (t.inbound, t.open_flows()) == (0, [])
    assert t.counters == TrackerCounters(ignored=2)


def test_open_flows_list_both_directions_with_ports_where_they_are_ports() -> None:
    t, _ = tracker()
    t.feed(new(ct_id=1))
    t.feed(new(ct_id=2, proto=1, sport=0x4242, dport=0))  # ICMP: the "port" is the echo id
    t.feed(new(ct_id=3, proto=47, sport=7, dport=9))  # GRE keys are not ports either
    t.feed(new(ct_id=4, proto=17, sport=5353, dport=53))
    t.feed(new(ct_id=9, src="198.18.0.1", sport=1234))  # the pod's own: not ours
    t.feed(inbound(ct_id=6))
    assert tuples(t) == [
        ("tcp", "10.77.0.2", 40000, "192.0.2.10", 443),
        ("icmp", "10.77.0.2", None, "192.0.2.10", None),
        ("47", "10.77.0.2", None, "192.0.2.10", None),
        ("udp", "10.77.0.2", 5353, "192.0.2.10", 53),
        ("tcp", OUTSIDE, 50000, GATEWAY_USER, 22),
    ]
    # The index is what revocation works from: alice (10.77.0.2, a NAT user with no grant
    # left) and the gateway user's inbound ssh, now that the user is NAT'd, must all go.
    tun = IPv4Network(TUNNEL)
    users = frozenset({IPv4Address("10.77.0.2"), IPv4Address(GATEWAY_USER)})
    state = DesiredState("vpnf", (tun,), None, users, users, ())
    assert flows_to_cut(state, t.open_flows()) == t.open_flows()


def test_synced_once_a_dump_has_completed() -> None:
    t, _ = tracker()
    assert not t.synced
    t.feed(Resync("begin", AT))
    t.feed(Resync("abort", AT))
    assert not t.synced
    t.feed(Resync("end", AT))  # an end without a begin proves nothing
    assert not t.synced
    t.feed(Resync("begin", AT))
    assert not t.synced
    t.feed(Resync("end", AT))
    assert t.synced
    t.feed(Resync("begin", AT))
    t.feed(Resync("abort", AT))
    assert t.synced  # the index was complete once; live events kept it so


def test_resync_drops_inbound_flows_whose_destroy_was_lost() -> None:
    t, _ = tracker()
    before, after = _ns(AT - dt.timedelta(seconds=5)), _ns(AT + dt.timedelta(seconds=1))
    t.feed(inbound(ct_id=1, sport=1, event_ns=before))  # still open: the dump lists it
    t.feed(inbound(ct_id=2, sport=2, event_ns=before))  # ended during the overrun
    t.feed(inbound(ct_id=3, sport=3, event_ns=before))  # ends during the dump, live event
    t.feed(Resync("begin", AT))
    t.feed(inbound(ct_id=6, sport=6, event_ns=after))  # started after the dump began
    t.feed(inbound(FlowEventKind.DESTROY, ct_id=3, sport=3))
    t.feed(inbound(ct_id=1, sport=1, start_ns=before, from_dump=True))
    t.feed(inbound(ct_id=3, sport=3, start_ns=before, from_dump=True))  # stale: not revived
    t.feed(inbound(ct_id=4, sport=4, start_ns=before, from_dump=True))  # opened while deaf
    assert t.feed(Resync("end", AT + dt.timedelta(seconds=2))) == []
    assert sorted(sport for _, _, sport, _, _ in tuples(t)) == [1, 4, 6]
    assert t.counters.inferred_ends == 0 and t.counters.records == 0


def test_inbound_index_is_bounded_and_forgotten_at_shutdown() -> None:
    t, _ = tracker(max_flows=2)
    for i in range(1, 4):
        t.feed(inbound(ct_id=i, sport=i))
    assert t.inbound == 2 and [sport for _, _, sport, _, _ in tuples(t)] == [2, 3]
    assert t.counters.evicted == 0  # evicted counts records, and these have none
    t.feed(new())
    assert len(t.end_all(AT)) == 1 and (t.inbound, t.open_flows()) == (0, [])


_addresses = st.sampled_from(["10.77.0.2", GATEWAY_USER, OUTSIDE, "198.18.0.1"])


@settings(max_examples=300, deadline=None)
@given(
    st.lists(
        st.tuples(_kinds, st.integers(0, 4), _addresses, _addresses, st.integers(1, 3)),
        max_size=60,
    )
)
def test_open_flows_are_those_opened_and_not_closed(
    events: list[tuple[FlowEventKind, int, str, str, int]],
) -> None:
    t, _ = tracker()
    tun = IPv4Network(TUNNEL)
    model: set[tuple[int, str, int, str]] = set()
    for kind, ct_id, src, dst, sport in events:
        t.feed(event(kind, ct_id=ct_id, src=src, dst=dst, sport=sport))
        if IPv4Address(src) in tun or IPv4Address(dst) in tun:
            key = (ct_id, src, sport, dst)
            (model.add if kind is FlowEventKind.NEW else model.discard)(key)
    assert sorted(set(tuples(t))) == sorted(tuples(t))  # each tuple once
    assert set(tuples(t)) == {("tcp", src, sport, dst, 443) for _, src, sport, dst in model}
