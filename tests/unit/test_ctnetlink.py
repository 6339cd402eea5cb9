"""ctnetlink, pure part: decoding events and dumps (fast path against the reference walk,
both against pyroute2, malformed input), and the targeted-delete encoder and ack parser.

The byte fixtures are real kernel messages (tests/unit/ctnetlink_captures.py). Synthetic
messages are built with pyroute2's independent ``nfct_msg`` encoder, and pyroute2's decoder is
the oracle our hand-written decoder and encoder are checked against.
"""

from __future__ import annotations

import datetime as dt
import errno
import json
import socket
import struct
from ipaddress import IPv4Address
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pyroute2.netlink import nlmsgerr
from pyroute2.netlink.nfnetlink.nfctsocket import nfct_msg

from tests.unit.ctnetlink_captures import (
    DUMP_DONE,
    DUMP_ENTRY,
    ICMP_NEW,
    REAL_EVENTS,
    TCP_DESTROY,
    UDP_DESTROY,
    UDP_NEW,
)
from vpnfleet.core import ctnetlink
from vpnfleet.core.ctnetlink import CtnetlinkDecoder, MalformedMessage, encode_ct_delete, parse_acks
from vpnfleet.core.flowevents import FlowEvent, FlowEventKind

AT = dt.datetime(2026, 11, 26, 15, 21, 36, tzinfo=dt.UTC)


def one(data: bytes, decoder: CtnetlinkDecoder | None = None, **kw: Any) -> FlowEvent:
    """The one event in ``data``, decoded by ``decoder`` (a fresh one by default)."""
    decoded = (decoder or CtnetlinkDecoder()).decode(data, len(data), AT, **kw)
    assert decoded.errors == 0
    assert len(decoded.events) == 1
    return decoded.events[0]


def both_paths(data: bytes, **kw: Any) -> FlowEvent:
    """The one event in ``data``, decoded by the reference walk (a fresh decoder's first
    message) and by the layout it learned from it (the second): they must agree."""
    decoder = CtnetlinkDecoder()
    first = one(data, decoder, **kw)
    assert decoder.learned_layouts == 1
    assert one(data, decoder, **kw) == first
    return first


def learned_decoder() -> CtnetlinkDecoder:
    """A decoder that has learned the layouts of every captured kernel message."""
    decoder = CtnetlinkDecoder()
    for data in (*REAL_EVENTS, DUMP_ENTRY):
        one(data, decoder, from_dump=data is DUMP_ENTRY)
    # TCP and ICMP DESTROY have the same length: the first one's layout takes the slot.
    assert decoder.learned_layouts == len(REAL_EVENTS)
    return decoder


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
    ev = both_paths(UDP_NEW)
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
    ev = both_paths(TCP_DESTROY)
    assert ev.kind is FlowEventKind.DESTROY and ev.proto_name == "tcp"
    assert (ev.packets_orig, ev.bytes_orig, ev.packets_reply) == (5, 768, 5)
    assert ev.bytes_reply is not None and ev.bytes_reply > 500  # 500 bytes echoed + headers
    assert ev.start_ns == 1795706494959146650
    assert ev.stop_ns is not None and ev.stop_ns > ev.start_ns


def test_icmp_echo_id_plays_the_source_port() -> None:
    ev = both_paths(ICMP_NEW)
    assert ev.proto_name == "icmp"
    assert (ev.orig_sport, ev.orig_dport, ev.reply_sport, ev.reply_dport) == (0x4242, 0, 0, 0x4242)


def test_dump_entries_and_end_of_dump() -> None:
    datagram = DUMP_ENTRY + DUMP_DONE  # the kernel may pack both in one datagram
    decoded = CtnetlinkDecoder().decode(datagram, len(datagram), AT, from_dump=True)
    assert decoded.done and decoded.errors == 0
    (ev,) = decoded.events
    assert ev.from_dump and ev.kind is FlowEventKind.NEW
    assert ev.start_ns == 1795706495079280678  # dumps carry the real start time
    assert ev.bytes_orig == 278


@pytest.mark.parametrize("data", [*REAL_EVENTS, DUMP_ENTRY])
def test_agrees_with_pyroute2(data: bytes) -> None:
    ours = both_paths(data)
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
    decoder = CtnetlinkDecoder()
    learned = one(UDP_DESTROY, decoder)
    slow = bytearray(UDP_DESTROY)
    nla_type_offset = 16 + 4 + 2  # nlmsghdr, nfgenmsg, nla_len
    (t,) = struct.unpack_from("=H", slow, nla_type_offset)
    struct.pack_into("=H", slow, nla_type_offset, t & 0x3FFF)
    assert one(bytes(slow), decoder) == learned == one(UDP_DESTROY, decoder)


@pytest.mark.parametrize("data", [*REAL_EVENTS, DUMP_ENTRY])
def test_kernel_layouts_are_learned_and_used(data: bytes, monkeypatch: pytest.MonkeyPatch) -> None:
    # The speed of the listener rests on this: after the first message of a shape, the
    # generic attribute walk is not used any more.
    decoder = CtnetlinkDecoder()
    first = one(data, decoder)
    assert decoder.learned_layouts == 1

    def generic(*_: Any) -> Any:
        raise AssertionError("generic path used")

    monkeypatch.setattr(ctnetlink, "_conntrack_generic", generic)
    assert one(data, decoder) == first
    with pytest.raises(AssertionError, match="generic path used"):
        one(data)  # a fresh decoder has learned nothing: the monkeypatch is in the way


def _generic_only(data: bytes) -> tuple[list[FlowEvent], int]:
    """Decode with learning disabled: the reference walk alone."""
    reference = CtnetlinkDecoder(max_layouts=0)
    d = reference.decode(data, len(data), AT)
    assert reference.learned_layouts == 0  # really nothing learned or used
    return d.events, d.errors


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
    decoder = CtnetlinkDecoder()
    one(base, decoder)  # learn the original's layout
    d = decoder.decode(bytes(data), len(data), AT)
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
    decoder = CtnetlinkDecoder()
    decoded = decoder.decode(ack + stats + UDP_NEW, 20 + len(stats) + len(UDP_NEW), AT)
    assert (len(decoded.events), decoded.errors, decoded.error_code) == (1, 0, 0)
    assert decoder.decode(refused, 20, AT).error_code == -1


def test_a_message_without_tuples_is_an_error_not_a_crash() -> None:
    data = encode(0x100, [("CTA_ID", 9)])
    decoded = CtnetlinkDecoder().decode(data + UDP_NEW, len(data) + len(UDP_NEW), AT)
    assert decoded.errors == 1 and len(decoded.events) == 1  # the next message still counts


def test_only_the_given_length_is_read() -> None:
    buf = bytearray(4096)
    buf[: len(UDP_NEW)] = UDP_NEW
    buf[len(UDP_NEW) : 2 * len(UDP_NEW)] = UDP_NEW  # stale bytes from an earlier read
    assert len(CtnetlinkDecoder().decode(buf, len(UDP_NEW), AT).events) == 1


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
    decoded = learned_decoder().decode(bytes(data), len(data), AT)  # both paths see it
    for ev in decoded.events:
        assert isinstance(ev.orig_src, str) and 0 <= ev.orig_sport <= 0xFFFF


@given(st.binary(max_size=300))
def test_random_bytes_never_raise(data: bytes) -> None:
    learned_decoder().decode(data, len(data), AT)


def test_event_round_trips_through_json() -> None:
    ev = one(TCP_DESTROY)
    assert FlowEvent.from_dict(json.loads(json.dumps(ev.as_dict()))) == ev


# --- targeted deletion --------------------------------------------------------------------

NESTED = 0x8000


def attr_tree(slots: Any) -> list[tuple[str, int, Any]]:
    """pyroute2's decoded attributes as (name, flags, value or children), recursively."""
    out = []
    for slot in slots:
        value = slot.get_value()
        if hasattr(value, "get") and value.get("attrs") is not None:
            value = attr_tree(value["attrs"])
        out.append((slot.name, slot.get_flags() or 0, value))
    return out


ipv4 = st.integers(0, 2**32 - 1).map(lambda n: str(IPv4Address(n)))
ports = st.integers(0, 65535)


@settings(max_examples=300, deadline=None)
@given(
    seq=st.integers(0, 2**32 - 1),
    proto=st.sampled_from([socket.IPPROTO_TCP, socket.IPPROTO_UDP]),
    src=ipv4,
    dst=ipv4,
    sport=ports,
    dport=ports,
)
def test_delete_request_decodes_to_exactly_that_tuple_with_pyroute2(
    seq: int, proto: int, src: str, dst: str, sport: int, dport: int
) -> None:
    data = encode_ct_delete(seq, proto, src, dst, sport, dport)
    msg = nfct_msg(data)
    msg.decode()
    assert msg["header"] == {
        "length": len(data),
        "type": (1 << 8) | 2,  # NFNL_SUBSYS_CTNETLINK, IPCTNL_MSG_CT_DELETE
        "flags": 0x1 | 0x4,  # NLM_F_REQUEST | NLM_F_ACK
        "sequence_number": seq,
        "pid": 0,
    }
    assert (msg["nfgen_family"], msg["version"], msg["res_id"]) == (socket.AF_INET, 0, 0)
    # Exactly one attribute, the original tuple: a delete without one flushes the table.
    assert attr_tree(msg["attrs"]) == [
        ("CTA_TUPLE_ORIG", NESTED, [
            ("CTA_TUPLE_IP", NESTED, [("CTA_IP_V4_SRC", 0, src), ("CTA_IP_V4_DST", 0, dst)]),
            ("CTA_TUPLE_PROTO", NESTED, [
                ("CTA_PROTO_NUM", 0, proto),
                ("CTA_PROTO_SRC_PORT", 0, sport),
                ("CTA_PROTO_DST_PORT", 0, dport),
            ]),
        ]),
    ]  # fmt: skip
    assert len(data) % 4 == 0


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ((1, socket.IPPROTO_ICMP, "10.0.0.1", "10.0.0.2", 0, 0), "tcp \\(6\\) and udp \\(17\\)"),
        ((1, 47, "10.0.0.1", "10.0.0.2", 0, 0), "not 47"),
        ((1, True, "10.0.0.1", "10.0.0.2", 0, 0), "not True"),
        ((1, 6, "10.0.0.1", "10.0.0.2", 65536, 80), "port out of range"),
        ((1, 6, "10.0.0.1", "10.0.0.2", 80, -1), "port out of range"),
        ((2**32, 6, "10.0.0.1", "10.0.0.2", 80, 80), "sequence number"),
        ((1, 6, "fd00::1", "10.0.0.2", 80, 80), "4 octets"),
        ((1, 6, "10.0.0.1", "10.0.0.256", 80, 80), "Octet 256"),
    ],
)
def test_delete_requests_the_kernel_cannot_take_exactly_are_refused(
    args: tuple[Any, ...], message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        encode_ct_delete(*args)


def ack(seq: int, code: int, echo: bytes = b"") -> bytes:
    """An NLMSG_ERROR reply as pyroute2 encodes one (``code``: 0 or -errno), optionally
    followed by the request it answers, as the kernel sends it without NETLINK_CAP_ACK."""
    msg = nlmsgerr()
    msg["header"]["type"] = 2
    msg["header"]["sequence_number"] = seq
    msg["error"] = code
    msg.encode()
    data = bytearray(msg.data) + echo
    struct.pack_into("=I", data, 0, len(data))
    return bytes(data)


def test_acks_give_each_request_its_errno() -> None:
    request = encode_ct_delete(8, 6, "10.0.0.1", "10.0.0.2", 1000, 80)
    replies = ack(7, 0) + ack(8, -errno.ENOENT, echo=request) + ack(9, -errno.EPERM)
    assert parse_acks(replies) == [(7, 0), (8, errno.ENOENT), (9, errno.EPERM)]
    # Other messages (a dump's end, say) are not acks; nothing is not an error.
    done = struct.pack("=IHHIIi", 20, 3, 0, 1, 0, 0)
    assert parse_acks(done + ack(1, 0)) == [(1, 0)]
    assert parse_acks(b"") == []


@pytest.mark.parametrize("cut", [1, 15, 16, 19])
def test_cut_acks_raise_instead_of_passing_for_missing(cut: int) -> None:
    data = ack(3, 0) + ack(4, 0)
    with pytest.raises(MalformedMessage):
        parse_acks(data[: len(data) - 20 + cut])
