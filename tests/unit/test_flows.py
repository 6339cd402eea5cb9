"""NAT audit, pure part: ctnetlink decoding and the flow tracker (attribution, privacy, late
start, eviction, resync, malformed input).

The byte fixtures are real messages captured from Linux 6.18 in network namespaces (a UDP,
TCP and ICMP flow from 10.77.0.2 through a MASQUERADE to 198.18.0.2, pod address
198.18.0.1, with nf_conntrack_acct and nf_conntrack_timestamp on). Synthetic messages are
built with pyroute2's independent ``nfct_msg`` encoder, and pyroute2's decoder is the oracle
our hand-written decoder is checked against.
"""

from __future__ import annotations

import datetime as dt
import json
import socket
import struct
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pyroute2.netlink.nfnetlink.nfctsocket import nfct_msg

from vpnfleet.core import flows
from vpnfleet.core.flows import (
    FlowEvent,
    FlowEventKind,
    FlowRecord,
    FlowTracker,
    Resync,
    decode_ctnetlink,
    flow_id,
)

AT = dt.datetime(2026, 11, 26, 15, 21, 36, tzinfo=dt.UTC)

# fmt: off
UDP_NEW = bytes.fromhex(
    "a0000000000100060000000000000000020000003400018014000180080001000a4d000208000200c6120002"
    "1c000280050001001100000006000200d91c00000600030013880000340002801400018008000100c6120002"
    "08000200c61200011c0002800500010011000000060002001388000006000300d91c000008000c003b03ee25"
    "080003000000019808000700000000010c001b0018eba18b077627f9"
)
TCP_NEW = bytes.fromhex(
    "d0000000000100060000000000000000020000003400018014000180080001000a4d000208000200c6120002"
    "1c000280050001000600000006000200a00a00000600030013890000340002801400018008000100c6120002"
    "08000200c61200011c0002800500010006000000060002001389000006000300a00a000008000c0079295465"
    "08000300000001980800070000000078300004802c0001800500010001000000050002000a00000005000300"
    "00000000060004000300000006000500000000000c001b0018eba18b08e69831"
)
ICMP_NEW = bytes.fromhex(
    "b0000000000100060000000000000000020000003c00018014000180080001000a4d000208000200c6120002"
    "2400028005000100010000000600040042420000050005000800000005000600000000003c00028014000180"
    "08000100c612000208000200c612000124000280050001000100000006000400424200000500050000000000"
    "050006000000000008000c00a3739a4f080003000000019808000700000000010c001b0018eba18b0c50f569"
)
DUMP_ENTRY = bytes.fromhex(
    "1c0100000001220007000000281407ed020000003400018014000180080001000a4d000208000200c6120002"
    "1c000280050001000600000006000200a00c00000600030013890000340002801400018008000100c6120002"
    "08000200c61200011c0002800500010006000000060002001389000006000300a00c0000080003000000019e"
    "080008000000000008000c00740aaaab08000b0000000001080007000000003b300004802c00018005000100"
    "05000000050002000a000000050003000a000000060004002300000006000500270000001c0009800c000100"
    "00000000000000050c00020000000000000001161c000a800c00010000000000000000040c00020000000000"
    "000000e2100014800c00010018eba18b100ff026"
)
DUMP_DONE = bytes.fromhex(
    "140000000300020007000000281407ed00000000"
)
UDP_DESTROY = bytes.fromhex(
    "ec000000020100000000000000000000020000003400018014000180080001000a4d000208000200c6120002"
    "1c000280050001001100000006000200d91c00000600030013880000340002801400018008000100c6120002"
    "08000200c61200011c0002800500010011000000060002001388000006000300d91c000008000c003b03ee25"
    "080003000000039a1c0009800c00010000000000000000010c00020000000000000000801c000a800c000100"
    "00000000000000010c00020000000000000000801c0014800c00010018eba18b077627340c00020018eba18b"
    "43345d670c001b0018eba18b48b02ed1"
)
TCP_DESTROY = bytes.fromhex(
    "fc000000020100000000000000000000020000003400018014000180080001000a4d000208000200c6120002"
    "1c000280050001000600000006000200a00a00000600030013890000340002801400018008000100c6120002"
    "08000200c61200011c0002800500010006000000060002001389000006000300a00a000008000c0079295465"
    "080003000000039e1c0009800c00010000000000000000050c00020000000000000003001c000a800c000100"
    "00000000000000050c00020000000000000003001c0014800c00010018eba18b08e6d69a0c00020018eba18b"
    "44b4d452100004800c00018005000100070000000c001b0018eba18b48c26edd"
)
ICMP_DESTROY = bytes.fromhex(
    "fc000000020100000000000000000000020000003c00018014000180080001000a4d000208000200c6120002"
    "2400028005000100010000000600040042420000050005000800000005000600000000003c00028014000180"
    "08000100c612000208000200c612000124000280050001000100000006000400424200000500050000000000"
    "050006000000000008000c00a3739a4f080003000000039a1c0009800c00010000000000000000010c000200"
    "000000000000001c1c000a800c00010000000000000000010c000200000000000000001c1c0014800c000100"
    "18eba18b0c50f4fe0c00020018eba18b47e930fd0c001b0018eba18b48dd55a8"
)
# fmt: on

REAL_EVENTS = [UDP_NEW, TCP_NEW, ICMP_NEW, UDP_DESTROY, TCP_DESTROY, ICMP_DESTROY]


def one(data: bytes, **kw: Any) -> FlowEvent:
    decoded = decode_ctnetlink(data, len(data), AT, **kw)
    assert decoded.errors == 0
    assert len(decoded.events) == 1
    return decoded.events[0]


def _tuple(src: str, dst: str, proto: int, sport: int, dport: int, v6: bool = False) -> Any:
    keys = ("CTA_IP_V6_SRC", "CTA_IP_V6_DST") if v6 else ("CTA_IP_V4_SRC", "CTA_IP_V4_DST")
    return {
        "attrs": [
            ("CTA_TUPLE_IP", {"attrs": [(keys[0], src), (keys[1], dst)]}),
            ("CTA_TUPLE_PROTO", {"attrs": [("CTA_PROTO_NUM", proto),
                                           ("CTA_PROTO_SRC_PORT", sport),
                                           ("CTA_PROTO_DST_PORT", dport)]}),
        ]
    }  # fmt: skip


def encode(msg_type: int, attrs: list[Any], family: int = socket.AF_INET) -> bytes:
    """A ctnetlink message built by pyroute2 (no NLA_F_NESTED flags: the generic path)."""
    msg = nfct_msg()
    msg["header"]["type"] = msg_type
    msg["nfgen_family"] = family
    msg["attrs"] = attrs
    msg.encode()
    return bytes(msg.data)


# --- decoding -----------------------------------------------------------------------------


def test_new_event_has_pre_and_post_nat_tuples() -> None:
    ev = one(UDP_NEW)
    assert ev.kind is FlowEventKind.NEW
    assert (ev.proto, ev.proto_name) == (17, "udp")
    assert (ev.orig_src, ev.orig_sport, ev.orig_dst, ev.orig_dport) == (
        "10.77.0.2", 55580, "198.18.0.2", 5000)  # fmt: skip
    # The reply goes to the pod's address: that is the post-NAT source the server saw.
    assert (ev.reply_src, ev.reply_sport, ev.reply_dst, ev.reply_dport) == (
        "198.18.0.2", 5000, "198.18.0.1", 55580)  # fmt: skip
    assert ev.ct_id == 990113317
    # NEW carries no counters or start time, only the kernel's event time (Linux >= 6.14).
    assert ev.start_ns is None and ev.packets_orig is None
    assert ev.event_ns == 1795706494934984697
    assert ev.at == AT and not ev.from_dump


def test_destroy_event_has_counters_and_times() -> None:
    ev = one(TCP_DESTROY)
    assert ev.kind is FlowEventKind.DESTROY and ev.proto_name == "tcp"
    assert (ev.packets_orig, ev.bytes_orig, ev.packets_reply) == (5, 768, 5)
    assert ev.bytes_reply is not None and ev.bytes_reply > 500  # 500 bytes echoed + headers
    assert ev.start_ns == 1795706494959146650
    assert ev.stop_ns is not None and ev.stop_ns > ev.start_ns


def test_icmp_echo_id_plays_the_source_port() -> None:
    ev = one(ICMP_NEW)
    assert ev.proto_name == "icmp"
    assert (ev.orig_sport, ev.orig_dport, ev.reply_sport, ev.reply_dport) == (0x4242, 0, 0, 0x4242)


def test_dump_entries_and_end_of_dump() -> None:
    datagram = DUMP_ENTRY + DUMP_DONE  # the kernel may pack both in one datagram
    decoded = decode_ctnetlink(datagram, len(datagram), AT, from_dump=True)
    assert decoded.done and decoded.errors == 0
    (ev,) = decoded.events
    assert ev.from_dump and ev.kind is FlowEventKind.NEW
    assert ev.start_ns == 1795706495079280678  # dumps carry the real start time
    assert ev.bytes_orig == 278


@pytest.mark.parametrize("data", [*REAL_EVENTS, DUMP_ENTRY])
def test_agrees_with_pyroute2(data: bytes) -> None:
    ours = one(data)
    ref = nfct_msg(data)
    ref.decode()

    def ref_tuple(name: str) -> tuple[Any, ...]:
        t = ref.get_attr(name)
        ip, proto = t.get_attr("CTA_TUPLE_IP"), t.get_attr("CTA_TUPLE_PROTO")
        port = proto.get_attr("CTA_PROTO_SRC_PORT") or proto.get_attr("CTA_PROTO_ICMP_ID")
        src, dst = ip.get_attr("CTA_IP_V4_SRC"), ip.get_attr("CTA_IP_V4_DST")
        return proto.get_attr("CTA_PROTO_NUM"), src, port, dst

    o, r = ref_tuple("CTA_TUPLE_ORIG"), ref_tuple("CTA_TUPLE_REPLY")
    assert o == (ours.proto, ours.orig_src, ours.orig_sport, ours.orig_dst)
    assert (r[1], r[3]) == (ours.reply_src, ours.reply_dst)
    # The post-NAT port: a reply's destination port, or the reply's ICMP id.
    nat_port = (
        r[2]
        if ours.proto == 1
        else ref.get_attr("CTA_TUPLE_REPLY")
        .get_attr("CTA_TUPLE_PROTO")
        .get_attr("CTA_PROTO_DST_PORT")
    )
    assert nat_port == ours.reply_dport
    assert ref.get_attr("CTA_ID") == ours.ct_id
    counters = ref.get_attr("CTA_COUNTERS_ORIG")
    if counters is not None:
        assert counters.get_attr("CTA_COUNTERS_BYTES") == ours.bytes_orig
    ts = ref.get_attr("CTA_TIMESTAMP")
    if ts is not None:
        assert ts.get_attr("CTA_TIMESTAMP_START") == ours.start_ns


def test_generic_path_matches_fast_path() -> None:
    # Clearing NLA_F_NESTED on the original tuple changes a header, so a learned layout no
    # longer matches and the generic walk decodes it: to the same event.
    flows._LAYOUTS.clear()
    one(UDP_DESTROY)  # learn
    slow = bytearray(UDP_DESTROY)
    nla_type_offset = 16 + 4 + 2  # nlmsghdr, nfgenmsg, nla_len
    (t,) = struct.unpack_from("=H", slow, nla_type_offset)
    struct.pack_into("=H", slow, nla_type_offset, t & 0x3FFF)
    assert one(bytes(slow)) == one(UDP_DESTROY)


@pytest.mark.parametrize("data", [*REAL_EVENTS, DUMP_ENTRY])
def test_kernel_layouts_are_learned_and_used(data: bytes, monkeypatch: pytest.MonkeyPatch) -> None:
    # The speed of the listener rests on this: after the first message of a shape, the
    # generic attribute walk is not used any more.
    flows._LAYOUTS.clear()
    first = one(data)
    assert list(flows._LAYOUTS.values()) != [None]

    def generic(*_: Any) -> Any:
        raise AssertionError("generic path used")

    monkeypatch.setattr(flows, "_conntrack_generic", generic)
    assert one(data) == first


def _generic_only(data: bytes) -> tuple[list[FlowEvent], int]:
    """Decode with learning disabled: every key is marked as not compilable."""
    flows._LAYOUTS.clear()
    for msg_type in (flows.MSG_CT_NEW, flows.MSG_CT_DELETE):
        for length in range(len(data) + 1):
            flows._LAYOUTS[flows._layout_key(msg_type, length, False)] = None
    try:
        d = decode_ctnetlink(data, len(data), AT)
        assert not any(flows._LAYOUTS.values())  # really nothing learned or used
        return d.events, d.errors
    finally:
        flows._LAYOUTS.clear()


@settings(max_examples=500, deadline=None)
@given(
    base=st.sampled_from([*REAL_EVENTS, DUMP_ENTRY]),
    flips=st.lists(st.tuples(st.integers(0, 300), st.integers(0, 255)), min_size=1, max_size=4),
)
def test_learned_layouts_never_change_the_result(base: bytes, flips: list[tuple[int, int]]) -> None:
    # Whatever bytes change (values or headers), decoding with a layout learned from the
    # original gives what the generic walk alone gives.
    data = bytearray(base)
    for pos, value in flips:
        if pos < len(data):
            data[pos] = value
    expected = _generic_only(bytes(data))
    one(base)  # learn the original's layout
    d = decode_ctnetlink(bytes(data), len(data), AT)
    assert (d.events, d.errors) == expected


def test_ipv6_and_32bit_counters() -> None:
    data = encode(
        0x102,
        [
            ("CTA_TUPLE_ORIG", _tuple("fd00::2", "fd01::2", 6, 1234, 80, v6=True)),
            ("CTA_TUPLE_REPLY", _tuple("fd01::2", "fd00::1", 6, 80, 4321, v6=True)),
            ("CTA_ID", 7),
            (
                "CTA_COUNTERS_ORIG",
                {"attrs": [("CTA_COUNTERS32_PACKETS", 3), ("CTA_COUNTERS32_BYTES", 300)]},
            ),
        ],
        family=socket.AF_INET6,
    )
    ev = one(data)
    assert (ev.kind, ev.orig_src, ev.reply_dst, ev.reply_dport) == (
        FlowEventKind.DESTROY, "fd00::2", "fd00::1", 4321)  # fmt: skip
    assert (ev.ct_id, ev.packets_orig, ev.bytes_orig, ev.bytes_reply) == (7, 3, 300, None)


def test_other_messages_are_skipped_and_errors_reported() -> None:
    ack = struct.pack("=IHHIIi", 20, 2, 0, 1, 0, 0)
    refused = struct.pack("=IHHIIi", 20, 2, 0, 1, 0, -1)  # -EPERM
    stats = encode(0x104, [])  # IPCTNL_MSG_CT_GET_STATS_CPU: not an event
    decoded = decode_ctnetlink(ack + stats + UDP_NEW, 20 + len(stats) + len(UDP_NEW), AT)
    assert (len(decoded.events), decoded.errors, decoded.error_code) == (1, 0, 0)
    assert decode_ctnetlink(refused, 20, AT).error_code == -1


def test_a_message_without_tuples_is_an_error_not_a_crash() -> None:
    data = encode(0x100, [("CTA_ID", 9)])
    decoded = decode_ctnetlink(data + UDP_NEW, len(data) + len(UDP_NEW), AT)
    assert decoded.errors == 1 and len(decoded.events) == 1  # the next message still counts


def test_only_the_given_length_is_read() -> None:
    buf = bytearray(4096)
    buf[: len(UDP_NEW)] = UDP_NEW
    buf[len(UDP_NEW) : 2 * len(UDP_NEW)] = UDP_NEW  # stale bytes from an earlier read
    assert len(decode_ctnetlink(buf, len(UDP_NEW), AT).events) == 1


@settings(max_examples=400, deadline=None)
@given(
    base=st.sampled_from([*REAL_EVENTS, DUMP_ENTRY + DUMP_DONE]),
    flips=st.lists(st.tuples(st.integers(0, 400), st.integers(0, 255)), max_size=6),
    cut=st.integers(0, 400),
)
def test_malformed_bytes_never_raise(base: bytes, flips: list[tuple[int, int]], cut: int) -> None:
    data = bytearray(base)
    for pos, value in flips:
        if pos < len(data):
            data[pos] = value
    data = data[: max(cut, 0)] if cut < len(data) else data
    decoded = decode_ctnetlink(bytes(data), len(data), AT)
    for ev in decoded.events:
        assert isinstance(ev.orig_src, str) and 0 <= ev.orig_sport <= 0xFFFF


@given(st.binary(max_size=300))
def test_random_bytes_never_raise(data: bytes) -> None:
    decode_ctnetlink(data, len(data), AT)


# --- tracker ------------------------------------------------------------------------------

TUNNEL = "10.77.0.0/24"
START_NS = 1_795_706_494_934_984_500


def event(
    kind: FlowEventKind,
    *,
    src: str = "10.77.0.2",
    sport: int = 40000,
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
    return FlowEvent(kind, 6, src, sport, "192.0.2.10", 443, "192.0.2.10", 443, "198.18.0.1",
                     nat_port, ct_id, start_ns, stop_ns, event_ns, p_o, b_o, p_r, b_r, at,
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


def test_event_round_trips_through_json() -> None:
    ev = one(TCP_DESTROY)
    assert FlowEvent.from_dict(json.loads(json.dumps(ev.as_dict()))) == ev


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
