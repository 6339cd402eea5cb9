"""Decoding NFLOG messages into denied packets, and aggregating those into audit events."""

from __future__ import annotations

import socket
import struct
import sys
from collections import Counter
from ipaddress import IPv4Address

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vpnfleet.agent.nflog import (
    NFULA_CFG_CMD,
    NFULA_CFG_MODE,
    NFULNL_CFG_CMD_BIND,
    NFULNL_COPY_PACKET,
    encode_config,
)
from vpnfleet.core.denied import (
    NFGENMSG,
    NFULA_PACKET_HDR,
    NFULA_PAYLOAD,
    NFULA_PREFIX,
    NFULA_TIMESTAMP,
    NFULNL_PACKET_TYPE,
    NLATTR,
    NLMSG_DONE,
    NLMSGHDR,
    DeniedAggregator,
    DeniedEvent,
    DeniedPacket,
    decode_datagram,
    iter_netlink,
    nl_align,
    parse_attributes,
    parse_nflog_packet,
)

CLIENT, OTHER = IPv4Address("198.18.8.2"), IPv4Address("198.18.8.3")
SERVER = IPv4Address("198.18.20.2")
NOW = 1_750_000_000.0

# --- message builders: the wire layout written out independently of the decoder -----------


def attr(atype: int, value: bytes) -> bytes:
    raw = NLATTR.pack(NLATTR.size + len(value), atype) + value
    return raw + b"\0" * (nl_align(len(raw)) - len(raw))


def nlmsg(mtype: int, body: bytes, seq: int = 0) -> bytes:
    raw = NLMSGHDR.pack(NLMSGHDR.size + len(body), mtype, 0, seq, 0) + body
    return raw + b"\0" * (nl_align(len(raw)) - len(raw))


def ipv4(
    proto: int,
    l4: bytes,
    src: IPv4Address = CLIENT,
    dst: IPv4Address = SERVER,
    *,
    options: bytes = b"",
    frag: int = 0,
    total: int | None = None,
    version: int = 4,
) -> bytes:
    ihl = (20 + len(options)) // 4
    length = 20 + len(options) + len(l4) if total is None else total
    head = struct.pack(
        "!BBHHHBBH4s4s",
        version << 4 | ihl,
        0,
        length,
        0x1234,
        frag,
        64,
        proto,
        0,
        src.packed,
        dst.packed,
    )
    return head + options + l4


def tcp_syn(sport: int, dport: int) -> bytes:
    return struct.pack("!HHIIBBHHH", sport, dport, 1000, 0, 5 << 4, 0x02, 64240, 0, 0)


def udp(sport: int, dport: int, data: bytes = b"hi") -> bytes:
    return struct.pack("!HHHH", sport, dport, 8 + len(data), 0) + data


def icmp_echo(ident: int = 7) -> bytes:
    return struct.pack("!BBHHH", 8, 0, 0, ident, 1) + b"vpnfleet"


def nflog_body(
    payload: bytes | None,
    *,
    prefix: bytes | None = b"vpnf-deny\0",
    ts: tuple[int, int] | None = (int(NOW), 250_000),
    hw_protocol: int = 0x0800,
    group: int = 7,
) -> bytes:
    body = NFGENMSG.pack(socket.AF_INET, 0, group)
    body += attr(NFULA_PACKET_HDR, struct.pack("!HBx", hw_protocol, 2))  # hook 2 = FORWARD
    if prefix is not None:
        body += attr(NFULA_PREFIX, prefix)
    if ts is not None:
        body += attr(NFULA_TIMESTAMP, struct.pack("!QQ", *ts))
    if payload is not None:
        body += attr(NFULA_PAYLOAD, payload)
    return body


def decode(body: bytes, received_at: float = NOW) -> tuple[DeniedPacket | None, Counter[str]]:
    reasons: Counter[str] = Counter()
    return parse_nflog_packet(body, received_at, reasons), reasons


# --- decoding ---------------------------------------------------------------------------------


def test_tcp_syn_gives_the_full_tuple_and_kernel_time() -> None:
    pkt, reasons = decode(nflog_body(ipv4(6, tcp_syn(41000, 8080))))
    assert pkt == DeniedPacket(
        at=NOW + 0.25,
        src=CLIENT,
        dst=SERVER,
        proto="tcp",
        sport=41000,
        dport=8080,
        icmp_type=None,
        prefix="vpnf-deny",
    )
    assert not reasons


def test_udp_and_icmp() -> None:
    u, _ = decode(nflog_body(ipv4(17, udp(5000, 53))))
    assert u is not None and (u.proto, u.sport, u.dport, u.icmp_type) == ("udp", 5000, 53, None)
    i, _ = decode(nflog_body(ipv4(1, icmp_echo())))
    assert i is not None and (i.proto, i.sport, i.dport, i.icmp_type) == ("icmp", None, None, 8)


def test_ports_are_read_after_ip_options() -> None:
    options = b"\x01\x01\x01\x00"  # NOP NOP NOP EOL: one extra 32-bit word
    pkt, _ = decode(nflog_body(ipv4(6, tcp_syn(1234, 443), options=options)))
    assert pkt is not None and (pkt.sport, pkt.dport) == (1234, 443)


def test_snapped_payload_still_decodes() -> None:
    # The copy range cuts the packet; the IP total length then exceeds what was captured.
    full = ipv4(17, udp(5000, 9999, b"x" * 1000))
    pkt, _ = decode(nflog_body(full[:128]))
    assert pkt is not None and (pkt.proto, pkt.dport) == ("udp", 9999)


def test_bytes_past_the_ip_total_length_are_not_the_transport_header() -> None:
    # A total length of 20 says "no transport header", whatever trails the capture.
    pkt, reasons = decode(nflog_body(ipv4(6, tcp_syn(1, 2), total=20)))
    assert pkt is None and reasons == Counter(truncated_l4=1)


def test_non_first_fragment_has_no_ports() -> None:
    pkt, reasons = decode(nflog_body(ipv4(17, b"\x00" * 16, frag=185)))
    assert pkt is not None and (pkt.proto, pkt.sport, pkt.dport) == ("udp", None, None)
    assert not reasons


def test_first_fragment_with_more_fragments_flag_has_ports() -> None:
    pkt, _ = decode(nflog_body(ipv4(17, udp(7, 9), frag=0x2000)))
    assert pkt is not None and (pkt.sport, pkt.dport) == (7, 9)


def test_other_protocols_are_named_by_number() -> None:
    pkt, _ = decode(nflog_body(ipv4(47, b"\x00\x00\x08\x00")))
    assert pkt is not None and (pkt.proto, pkt.sport, pkt.dport, pkt.icmp_type) == (
        "47",
        None,
        None,
        None,
    )


@pytest.mark.parametrize(
    ("ts", "expected"),
    [
        (None, NOW),  # no kernel timestamp: receive time
        ((0, 0), NOW),  # zero: not a wall-clock time
        ((int(NOW) - 3600, 0), NOW),  # an hour off: not trusted
        ((int(NOW), 2_000_000), NOW),  # usec out of range
        ((int(NOW) - 5, 500_000), NOW - 4.5),  # plausible: the kernel's time wins
    ],
)
def test_timestamp_falls_back_to_receive_time(ts: tuple[int, int] | None, expected: float) -> None:
    pkt, _ = decode(nflog_body(ipv4(6, tcp_syn(1, 2)), ts=ts))
    assert pkt is not None and pkt.at == pytest.approx(expected)


def test_prefix_missing_or_without_nul() -> None:
    none, _ = decode(nflog_body(ipv4(6, tcp_syn(1, 2)), prefix=None))
    bare, _ = decode(nflog_body(ipv4(6, tcp_syn(1, 2)), prefix=b"vpnf-deny"))
    assert none is not None and none.prefix == ""
    assert bare is not None and bare.prefix == "vpnf-deny"


def test_attribute_flag_bits_are_ignored() -> None:
    # NLA_F_NET_BYTEORDER (0x4000) on the payload attribute must not hide it.
    body = NFGENMSG.pack(socket.AF_INET, 0, 7) + attr(NFULA_PAYLOAD | 0x4000, ipv4(1, icmp_echo()))
    pkt, _ = decode(body)
    assert pkt is not None and pkt.icmp_type == 8 and pkt.prefix == ""


MALFORMED = {
    "truncated_nfgenmsg": b"\x02\x00",
    "bad_attribute (length past the end)": NFGENMSG.pack(2, 0, 7) + NLATTR.pack(200, 9) + b"ab",
    "bad_attribute (length below header)": NFGENMSG.pack(2, 0, 7) + NLATTR.pack(2, 9) + b"abcd",
    "bad_attribute (short packet header)": NFGENMSG.pack(2, 0, 7) + attr(NFULA_PACKET_HDR, b"\x08"),
    "no_payload": nflog_body(None),
    "not_ipv4 (hw protocol)": nflog_body(ipv4(6, tcp_syn(1, 2)), hw_protocol=0x86DD),
    "not_ipv4 (version)": nflog_body(ipv4(6, tcp_syn(1, 2), version=6)),
    "truncated_ip": nflog_body(ipv4(6, tcp_syn(1, 2))[:19]),
    "truncated_ip (options cut off)": nflog_body(ipv4(6, b"", options=b"\x01" * 8)[:24]),
    "bad_ip_header (ihl < 5)": nflog_body(b"\x44" + ipv4(6, tcp_syn(1, 2))[1:]),
    "bad_ip_header (total < ihl)": nflog_body(ipv4(6, tcp_syn(1, 2), total=12)),
    "truncated_l4 (tcp)": nflog_body(ipv4(6, tcp_syn(1, 2))[:23]),
    "truncated_l4 (icmp)": nflog_body(ipv4(1, b"\x08")),
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_malformed_messages_are_counted_not_raised(case: str) -> None:
    pkt, reasons = decode(MALFORMED[case])
    assert pkt is None
    assert reasons == Counter({case.split(" ")[0]: 1})


def test_decoding_without_a_counter_still_returns_none() -> None:
    assert parse_nflog_packet(b"", NOW) is None


VALID = nlmsg(NFULNL_PACKET_TYPE, nflog_body(ipv4(6, tcp_syn(41000, 8080))))


@given(cut=st.integers(min_value=0, max_value=len(VALID)))
def test_every_truncation_of_a_datagram_is_handled(cut: int) -> None:
    reasons: Counter[str] = Counter()
    packets = decode_datagram(VALID[:cut], NOW, reasons)
    # Either the whole packet survived (only padding was cut) or nothing did, with a reason.
    assert packets == [] or packets[0].dport == 8080
    assert packets or reasons or cut < NLMSGHDR.size


@settings(max_examples=300)
@given(data=st.binary(max_size=256), flip=st.integers(min_value=0, max_value=len(VALID) - 1))
def test_garbage_never_raises(data: bytes, flip: int) -> None:
    decode_datagram(data, NOW, Counter())
    parse_nflog_packet(data, NOW, Counter())
    corrupted = bytearray(VALID)
    corrupted[flip] ^= 0xFF
    decode_datagram(bytes(corrupted), NOW, Counter())


def test_datagram_with_several_messages_and_done() -> None:
    data = (
        nlmsg(NFULNL_PACKET_TYPE, nflog_body(ipv4(6, tcp_syn(1, 80))), seq=1)
        + nlmsg(NFULNL_PACKET_TYPE, nflog_body(ipv4(17, udp(2, 53))), seq=2)
        + nlmsg(NLMSG_DONE, b"\0\0\0\0", seq=3)
    )
    assert [m.seq for m in iter_netlink(data)] == [1, 2, 3]
    packets = decode_datagram(data, NOW)
    assert [(p.proto, p.dport) for p in packets] == [("tcp", 80), ("udp", 53)]


def test_datagram_cut_in_the_second_message_keeps_the_first() -> None:
    first = nlmsg(NFULNL_PACKET_TYPE, nflog_body(ipv4(6, tcp_syn(1, 80))))
    second = nlmsg(NFULNL_PACKET_TYPE, nflog_body(ipv4(17, udp(2, 53))))
    reasons: Counter[str] = Counter()
    packets = decode_datagram(first + second[:30], NOW, reasons)
    assert [p.dport for p in packets] == [80]
    assert reasons == Counter(truncated_netlink=1)


# A message captured from the kernel (6.18, iptables-nft, `-j NFLOG --nflog-group 7
# --nflog-prefix vpnf-deny`, copy range 128): a 1-byte UDP datagram 198.18.70.2:40001 ->
# 198.18.71.2:5353. It carries interface, hardware and timestamp attributes the builders omit.
KERNEL_MSG = bytes.fromhex(
    "a80000000004000000000000000000000200000708000100080002000e000a0076706e662d64656e7900000008"
    "0004000000000208000500000000031000080000060000d262c6206478000006000f000001000006001100000e"
    "00001200100052dce63cfe8dd262c62064780800000014000300000000006b084d17000000000003fd20210009"
    "004500001d59fe40003f11c8a8c6124602c61247029c4114e90009194478000000"
)
KERNEL_TS = 1795706135 + 261408 / 1e6


@pytest.mark.skipif(sys.byteorder != "little", reason="capture has little-endian netlink headers")
def test_real_kernel_message() -> None:
    reasons: Counter[str] = Counter()
    (pkt,) = decode_datagram(KERNEL_MSG, KERNEL_TS + 0.1, reasons)
    assert pkt == DeniedPacket(
        at=pytest.approx(KERNEL_TS),  # type: ignore[arg-type]
        src=IPv4Address("198.18.70.2"),
        dst=IPv4Address("198.18.71.2"),
        proto="udp",
        sport=40001,
        dport=5353,
        icmp_type=None,
        prefix="vpnf-deny",
    )
    assert not reasons


def test_config_request_layout() -> None:
    msg = encode_config(
        5,
        socket.AF_UNSPEC,
        7,
        (NFULA_CFG_CMD, bytes([NFULNL_CFG_CMD_BIND])),
        (NFULA_CFG_MODE, struct.pack("!IBx", 128, NFULNL_COPY_PACKET)),
    )
    (m,) = iter_netlink(msg)
    assert m.type == (4 << 8) | 1 and m.seq == 5 and m.flags == 0x1 | 0x4  # REQUEST | ACK
    assert NFGENMSG.unpack_from(m.body) == (socket.AF_UNSPEC, 0, 7)
    assert parse_attributes(m.body, NFGENMSG.size) == {
        NFULA_CFG_CMD: b"\x01",
        NFULA_CFG_MODE: b"\x00\x00\x00\x80\x02\x00",
    }
    assert len(msg) % 4 == 0


# --- aggregation ------------------------------------------------------------------------------

SESSIONS = {CLIENT: ("alice", "pod-1-aaaa"), OTHER: ("bob", "pod-1-bbbb")}


def pkt(
    at: float,
    dport: int | None = 22,
    *,
    src: IPv4Address = CLIENT,
    dst: IPv4Address = SERVER,
    proto: str = "tcp",
) -> DeniedPacket:
    return DeniedPacket(at, src, dst, proto, 40000, dport, None, "vpnf-deny")


def agg(**kw: float) -> DeniedAggregator:
    return DeniedAggregator(SESSIONS.get, window=10.0, **kw)  # type: ignore[arg-type]


def test_repeated_attempts_become_one_event() -> None:
    a = agg()
    for t in (0.0, 1.0, 4.5):
        assert a.add(pkt(NOW + t)) == []
    assert a.flush(NOW + 9.9) == []  # window still open
    (event,) = a.flush(NOW + 10.0)
    assert event == DeniedEvent("alice", "pod-1-aaaa", CLIENT, SERVER, "tcp", 22, NOW, NOW + 4.5, 3)
    assert a.flush(NOW + 100) == []  # nothing left


def test_distinct_destinations_users_and_unknown_sources() -> None:
    a = agg()
    stranger = IPv4Address("198.18.8.99")
    for p in (
        pkt(NOW, 22),
        pkt(NOW + 1, 80),
        pkt(NOW + 1, 80),
        pkt(NOW + 2, None, proto="icmp"),
        pkt(NOW + 3, 22, src=OTHER),
        pkt(NOW + 4, 22, src=stranger),
    ):
        a.add(p)
    events = a.drain()
    got = {(e.user, e.session_uid, str(e.src), e.proto, e.dport): e.count for e in events}
    assert got == {
        ("alice", "pod-1-aaaa", str(CLIENT), "tcp", 22): 1,
        ("alice", "pod-1-aaaa", str(CLIENT), "tcp", 80): 2,
        ("alice", "pod-1-aaaa", str(CLIENT), "icmp", None): 1,
        ("bob", "pod-1-bbbb", str(OTHER), "tcp", 22): 1,
        (None, None, str(stranger), "tcp", 22): 1,
    }
    assert [e.first_at for e in events] == sorted(e.first_at for e in events)
    assert a.unattributed_packets == 1 and a.packets == 6 and a.events == 5


def test_a_later_packet_closes_the_window() -> None:
    a = agg()
    a.add(pkt(NOW))
    a.add(pkt(NOW + 9))
    closed = a.add(pkt(NOW + 12))
    assert [(e.count, e.first_at, e.last_at) for e in closed] == [(2, NOW, NOW + 9)]
    assert a.deadline == NOW + 22  # the new window starts at its first packet
    (rest,) = a.drain()
    assert (rest.count, rest.first_at) == (1, NOW + 12)


def test_clock_going_back_closes_the_window() -> None:
    a = agg()
    a.add(pkt(NOW))
    assert a.flush(NOW - 5) == []  # a little jitter is tolerated
    assert [e.count for e in a.flush(NOW - 3600)] == [1]
    assert a.deadline is None


def test_attribution_is_taken_when_the_packet_arrives() -> None:
    owners: dict[IPv4Address, tuple[str, str]] = {CLIENT: ("alice", "s1")}
    a = DeniedAggregator(owners.get)
    a.add(pkt(NOW))
    owners[CLIENT] = ("carol", "s2")  # alice left, carol got her tunnel IP
    a.add(pkt(NOW + 1))
    assert sorted((e.user, e.session_uid, e.count) for e in a.drain()) == [
        ("alice", "s1", 1),
        ("carol", "s2", 1),
    ]


def test_port_scan_is_capped_with_a_summary_per_session() -> None:
    a = agg(max_keys=3)
    for port in range(1, 101):
        a.add(pkt(NOW + port / 100, port))
    a.add(pkt(NOW + 2, 1))  # a key already tracked is still counted exactly
    for port in range(1, 11):
        a.add(pkt(NOW + 3, port, src=OTHER))
    events = a.drain()
    regular = [e for e in events if not e.overflow]
    summaries = [e for e in events if e.overflow]
    assert [(e.dport, e.count) for e in regular] == [(1, 2), (2, 1), (3, 1)]
    assert [(e.user, e.src, e.dst, e.proto, e.dport, e.count) for e in summaries] == [
        ("alice", CLIENT, None, None, None, 97),
        ("bob", OTHER, None, None, None, 10),
    ]
    assert summaries[0].first_at == NOW + 0.04 and summaries[0].last_at == NOW + 1.0
    assert len(events) == 5 and a.overflow_packets == 107
    # The cap is per window: the next window tracks keys again.
    a.add(pkt(NOW + 60, 5000))
    assert [(e.dport, e.overflow) for e in a.drain()] == [(5000, False)]


def test_overflow_from_several_unknown_sources_shares_one_summary() -> None:
    a = agg(max_keys=1)
    a.add(pkt(NOW, 1))
    for i in range(10, 15):
        a.add(pkt(NOW + 1, 2, src=IPv4Address(f"198.18.8.{i}")))
    summaries = [e for e in a.drain() if e.overflow]
    assert [(e.user, e.src, e.count) for e in summaries] == [(None, None, 5)]


def test_records_are_json_ready() -> None:
    a = agg(max_keys=1)
    a.add(pkt(NOW, 22))
    a.add(pkt(NOW + 0.5, 23))
    regular, summary = a.drain()
    assert regular.as_record() == {
        "event": "denied",
        "user": "alice",
        "session_uid": "pod-1-aaaa",
        "src": "198.18.8.2",
        "dst": "198.18.20.2",
        "proto": "tcp",
        "dport": 22,
        "first_at": "2025-06-15T15:06:40.000+00:00",
        "last_at": "2025-06-15T15:06:40.000+00:00",
        "count": 1,
    }
    assert summary.as_record()["event"] == "denied_overflow"
    assert summary.as_record()["dst"] is None
    assert pkt(NOW).as_record()["at"] == "2025-06-15T15:06:40.000+00:00"


@pytest.mark.parametrize("kw", [{"window": 0.0}, {"max_keys": 0}])
def test_aggregator_rejects_nonsense_settings(kw: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        DeniedAggregator(SESSIONS.get, **kw)  # type: ignore[arg-type]
