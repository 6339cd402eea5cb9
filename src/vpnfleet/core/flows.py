"""NAT audit: conntrack flow events, their ctnetlink decoding, and the flow records we keep.

Three pure pieces, no I/O (the socket lives in :mod:`vpnfleet.agent.conntrack`):

- :class:`FlowEvent`: one conntrack NEW or DESTROY, as the kernel reported it.
- :func:`decode_ctnetlink`: netlink datagram bytes -> events. Hand-written over ``struct``
  because pyroute2's generic ``nfct_msg`` decoder costs ~50x more per message (measured in
  ``bench/flow_listener.py --decode-only``), and the listener must keep up with a NAT pod's
  connection rate on one core.
- :class:`FlowTracker`: events + "which session owns this tunnel IP" -> :class:`FlowRecord`.
  A record is emitted when a flow starts (so it is attributed even if its end is never seen)
  and when it ends (with bytes and end time). Both carry the same ``flow_id``; the receiver
  upserts on it, which makes at-least-once delivery idempotent.

Why the tracker attributes at NEW time: the tunnel IP may belong to somebody else by the time
the flow ends (disconnect, then the address is leased again). The owner at the start is the
one who opened the connection.
"""

from __future__ import annotations

import datetime as dt
import enum
import ipaddress
import operator
import socket
import struct
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Literal, NamedTuple

# --- events -------------------------------------------------------------------------------


class FlowEventKind(enum.Enum):
    """What happened to a conntrack entry."""

    NEW = "new"
    DESTROY = "destroy"


PROTO_NAMES: dict[int, str] = {socket.IPPROTO_TCP: "tcp", socket.IPPROTO_UDP: "udp", 1: "icmp"}


def proto_name(number: int) -> str:
    """``tcp``, ``udp``, ``icmp``, or the protocol number as text for anything else."""
    return PROTO_NAMES.get(number) or str(number)


class FlowEvent(NamedTuple):
    """One conntrack event.

    ``orig_*`` is the tuple as the client sent it (pre-NAT); ``reply_*`` is the tuple of the
    answer, so ``reply_dst:reply_dport`` is the post-NAT source the outside world saw and
    ``reply_src:reply_sport`` the peer really reached (differs from ``orig_dst`` under DNAT).
    For ICMP the echo identifier plays the source port (``orig_sport``, ``reply_dport``) and
    destination ports are 0. The kernel puts counters and start/stop times (wall clock, ns)
    only in DESTROY events and dumps, and only with ``nf_conntrack_acct``/
    ``nf_conntrack_timestamp`` on; otherwise they are None. ``event_ns`` is when the kernel
    generated the event (Linux >= 6.14 with timestamps on): for a NEW event, the best start
    time there is. ``at`` is when the listener read the event. ``from_dump``
    marks entries listed by a table dump (a resync), not a live event.

    A NamedTuple, not a dataclass: one is built per event and construction cost matters
    (a frozen dataclass with 19 fields costs ~6x more).
    """

    kind: FlowEventKind
    proto: int
    orig_src: str
    orig_sport: int
    orig_dst: str
    orig_dport: int
    reply_src: str
    reply_sport: int
    reply_dst: str
    reply_dport: int
    ct_id: int
    start_ns: int | None
    stop_ns: int | None
    event_ns: int | None
    packets_orig: int | None
    bytes_orig: int | None
    packets_reply: int | None
    bytes_reply: int | None
    at: dt.datetime
    from_dump: bool = False

    @property
    def proto_name(self) -> str:
        """The protocol as text (``tcp``, ``udp``, ``icmp`` or its number)."""
        return proto_name(self.proto)

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready form (debug output, tests)."""
        return {
            "kind": self.kind.value,
            "proto": self.proto,
            "orig_src": self.orig_src,
            "orig_sport": self.orig_sport,
            "orig_dst": self.orig_dst,
            "orig_dport": self.orig_dport,
            "reply_src": self.reply_src,
            "reply_sport": self.reply_sport,
            "reply_dst": self.reply_dst,
            "reply_dport": self.reply_dport,
            "ct_id": self.ct_id,
            "start_ns": self.start_ns,
            "stop_ns": self.stop_ns,
            "event_ns": self.event_ns,
            "packets_orig": self.packets_orig,
            "bytes_orig": self.bytes_orig,
            "packets_reply": self.packets_reply,
            "bytes_reply": self.bytes_reply,
            "at": self.at.isoformat(),
            "from_dump": self.from_dump,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> FlowEvent:
        """Inverse of :meth:`as_dict`."""
        return cls(
            **{**d, "kind": FlowEventKind(d["kind"]), "at": dt.datetime.fromisoformat(d["at"])}
        )


@dataclass(frozen=True, slots=True)
class Resync:
    """Marks a table dump in the event stream: ``begin``, then the dumped entries as
    ``from_dump`` NEW events, then ``end`` (or ``abort`` if the dump failed). Lets the tracker
    find flows whose DESTROY was lost in an overrun: tracked before, absent from the dump."""

    phase: Literal["begin", "end", "abort"]
    at: dt.datetime


FlowItem = FlowEvent | Resync

# --- ctnetlink decoding -------------------------------------------------------------------
# Layouts from linux/netlink.h, linux/netfilter/nfnetlink.h and nfnetlink_conntrack.h.

_NLMSG = struct.Struct("=IHHII")  # len, type, flags, seq, pid (host byte order)
_NLA = struct.Struct("=HH")  # len, type
_BE16 = struct.Struct(">H")
_BE32 = struct.Struct(">I")
_BE64 = struct.Struct(">Q")
_NFGENMSG_LEN = 4
NLMSG_ERROR = 2
NLMSG_DONE = 3
_NLA_TYPE_MASK = 0x3FFF  # strip NLA_F_NESTED / NLA_F_NET_BYTEORDER
NFNL_SUBSYS_CTNETLINK = 1
IPCTNL_MSG_CT_NEW = 0
IPCTNL_MSG_CT_GET = 1
IPCTNL_MSG_CT_DELETE = 2
MSG_CT_NEW = (NFNL_SUBSYS_CTNETLINK << 8) | IPCTNL_MSG_CT_NEW
MSG_CT_DELETE = (NFNL_SUBSYS_CTNETLINK << 8) | IPCTNL_MSG_CT_DELETE

# CTA_* (top level)
_CTA_TUPLE_ORIG, _CTA_TUPLE_REPLY = 1, 2
_CTA_COUNTERS_ORIG, _CTA_COUNTERS_REPLY = 9, 10
_CTA_ID = 12
_CTA_TIMESTAMP = 20
_CTA_TIMESTAMP_EVENT = 27  # Linux >= 6.14
# CTA_TUPLE_*, CTA_IP_*, CTA_PROTO_*, CTA_COUNTERS_*, CTA_TIMESTAMP_*
_TUPLE_IP, _TUPLE_PROTO = 1, 2
_IP_V4_SRC, _IP_V4_DST, _IP_V6_SRC, _IP_V6_DST = 1, 2, 3, 4
_PROTO_NUM, _PROTO_SRC_PORT, _PROTO_DST_PORT, _PROTO_ICMP_ID = 1, 2, 3, 4
_PROTO_ICMPV6_ID = 7
_COUNTERS_PACKETS, _COUNTERS_BYTES, _COUNTERS32_PACKETS, _COUNTERS32_BYTES = 1, 2, 3, 4
_TS_START, _TS_STOP = 1, 2


class MalformedMessage(ValueError):
    """A ctnetlink message whose attributes do not parse."""


@dataclass(slots=True)
class Decoded:
    """What one netlink datagram held."""

    events: list[FlowEvent] = field(default_factory=list)
    errors: int = 0  # conntrack messages that did not decode (skipped, never fatal)
    done: bool = False  # NLMSG_DONE: a dump is complete
    error_code: int = 0  # from NLMSG_ERROR: 0 is an ACK, negative is -errno


def _attrs(buf: Any, off: int, end: int) -> dict[int, tuple[int, int]]:
    """Attribute type -> (payload start, payload end) for the attributes in [off, end)."""
    out: dict[int, tuple[int, int]] = {}
    unpack = _NLA.unpack_from
    while off + 4 <= end:
        ln, ty = unpack(buf, off)
        if ln < 4 or off + ln > end:
            raise MalformedMessage(f"attribute length {ln} at offset {off} overruns {end}")
        out[ty & _NLA_TYPE_MASK] = (off + 4, off + ln)
        off += (ln + 3) & ~3
    return out


def _addr(buf: Any, span: tuple[int, int] | None, v6: bool) -> str:
    if span is None:
        raise MalformedMessage("tuple without an address")
    start, end = span
    if end - start != (16 if v6 else 4):
        raise MalformedMessage("address of the wrong size")
    raw = bytes(buf[start:end])
    return socket.inet_ntop(socket.AF_INET6, raw) if v6 else socket.inet_ntoa(raw)


def _u16(buf: Any, span: tuple[int, int] | None) -> int:
    if span is None:
        return 0
    if span[1] - span[0] < 2:
        raise MalformedMessage("short 16-bit attribute")
    return int(_BE16.unpack_from(buf, span[0])[0])


def _counter(buf: Any, a: dict[int, tuple[int, int]], wide: int, narrow: int) -> int | None:
    span = a.get(wide)
    if span is not None and span[1] - span[0] >= 8:
        return int(_BE64.unpack_from(buf, span[0])[0])
    span = a.get(narrow)
    if span is not None and span[1] - span[0] >= 4:
        return int(_BE32.unpack_from(buf, span[0])[0])
    return None


def _tuple(buf: Any, span: tuple[int, int] | None, reply: bool) -> tuple[int, str, int, str, int]:
    """(proto, src, sport, dst, dport) of a CTA_TUPLE_* attribute.

    ICMP has an echo identifier instead of ports; NAT rewrites it like a source port, so it
    goes where the client's port is: the source of the original tuple, the destination of
    the reply tuple.
    """
    if span is None:
        raise MalformedMessage("message without a tuple")
    t = _attrs(buf, span[0], span[1])
    ip_span, proto_span = t.get(_TUPLE_IP), t.get(_TUPLE_PROTO)
    if ip_span is None or proto_span is None:
        raise MalformedMessage("tuple without address or protocol")
    ip = _attrs(buf, ip_span[0], ip_span[1])
    v6 = _IP_V6_SRC in ip
    src = _addr(buf, ip.get(_IP_V6_SRC if v6 else _IP_V4_SRC), v6)
    dst = _addr(buf, ip.get(_IP_V6_DST if v6 else _IP_V4_DST), v6)
    p = _attrs(buf, proto_span[0], proto_span[1])
    num_span = p.get(_PROTO_NUM)
    if num_span is None or num_span[1] <= num_span[0]:
        raise MalformedMessage("tuple without a protocol number")
    proto = buf[num_span[0]]
    if _PROTO_SRC_PORT in p:
        return proto, src, _u16(buf, p[_PROTO_SRC_PORT]), dst, _u16(buf, p.get(_PROTO_DST_PORT))
    icmp_id = _u16(buf, p.get(_PROTO_ICMP_ID) or p.get(_PROTO_ICMPV6_ID))
    return (proto, src, 0, dst, icmp_id) if reply else (proto, src, icmp_id, dst, 0)


# Fast path. The kernel lays out an IPv4 tuple of a port-based protocol always the same way
# (IP{V4_SRC, V4_DST}, PROTO{NUM, SRC_PORT, DST_PORT}, 52 bytes): one unpack plus a check of
# all 16 attribute headers replaces ~10 attribute walks and makes decoding ~3x cheaper.
# Anything else (ICMP, IPv6, zones, a kernel that adds attributes) takes the generic path.
_NLA_F_NESTED = 0x8000
# Each attribute header (len, type) is read as one 32-bit word; the two tuples are one unpack.
_TUPLE4_FMT = "I I I4s I4s I I B3x I H2x I H2x"
_TUPLES4 = struct.Struct(">" + _TUPLE4_FMT + _TUPLE4_FMT)
_TUPLE4_LEN = _TUPLES4.size // 2
# Header words of both tuples; values: (proto, src, sport, dst, dport) x 2.
_TUPLES4_HEADERS = operator.itemgetter(0, 1, 2, 4, 6, 7, 9, 11, 13, 14, 15, 17, 19, 20, 22, 24)
_TUPLES4_VALUES = operator.itemgetter(8, 3, 10, 5, 12, 21, 16, 23, 18, 25)


def _tuples4_headers() -> tuple[int, ...]:
    # Headers are in host byte order but _TUPLES4 reads big-endian: read the expected native
    # bytes the same way, so the comparison holds on either endianness.
    words: list[int] = []
    for tuple_type in (_CTA_TUPLE_ORIG, _CTA_TUPLE_REPLY):
        native = struct.pack(
            "=16H",
            _TUPLE4_LEN, tuple_type | _NLA_F_NESTED,
            20, _TUPLE_IP | _NLA_F_NESTED, 8, _IP_V4_SRC, 8, _IP_V4_DST,
            28, _TUPLE_PROTO | _NLA_F_NESTED, 5, _PROTO_NUM, 6, _PROTO_SRC_PORT,
            6, _PROTO_DST_PORT,
        )  # fmt: skip
        words.extend(struct.unpack(">8I", native))
    return tuple(words)


_HEADERS4 = _tuples4_headers()


def _conntrack(buf: Any, off: int, end: int, kind: FlowEventKind, at: dt.datetime,
               from_dump: bool) -> FlowEvent:  # fmt: skip
    fast = False
    if off + 2 * _TUPLE4_LEN <= end:
        v = _TUPLES4.unpack_from(buf, off)
        if _TUPLES4_HEADERS(v) == _HEADERS4:
            proto, o_src, o_sport, o_dst, o_dport, _, r_src, r_sport, r_dst, r_dport = (
                _TUPLES4_VALUES(v)
            )
            ntoa = socket.inet_ntoa
            o_src, o_dst, r_src, r_dst = ntoa(o_src), ntoa(o_dst), ntoa(r_src), ntoa(r_dst)
            off += 2 * _TUPLE4_LEN
            fast = True
    a = _attrs(buf, off, end)
    if not fast:
        proto, o_src, o_sport, o_dst, o_dport = _tuple(buf, a.get(_CTA_TUPLE_ORIG), False)
        _, r_src, r_sport, r_dst, r_dport = _tuple(buf, a.get(_CTA_TUPLE_REPLY), True)
    id_span = a.get(_CTA_ID)
    ct_id = 0
    if id_span is not None and id_span[1] - id_span[0] >= 4:
        ct_id = int(_BE32.unpack_from(buf, id_span[0])[0])
    start_ns = stop_ns = None
    ts_span = a.get(_CTA_TIMESTAMP)
    if ts_span is not None:
        ts = _attrs(buf, ts_span[0], ts_span[1])
        if (s := ts.get(_TS_START)) and s[1] - s[0] >= 8:
            start_ns = int(_BE64.unpack_from(buf, s[0])[0])
        if (s := ts.get(_TS_STOP)) and s[1] - s[0] >= 8:
            stop_ns = int(_BE64.unpack_from(buf, s[0])[0])
    event_ns = None
    if (s := a.get(_CTA_TIMESTAMP_EVENT)) and s[1] - s[0] >= 8:
        event_ns = int(_BE64.unpack_from(buf, s[0])[0])
    p_o = b_o = p_r = b_r = None
    if c_span := a.get(_CTA_COUNTERS_ORIG):
        c = _attrs(buf, c_span[0], c_span[1])
        p_o = _counter(buf, c, _COUNTERS_PACKETS, _COUNTERS32_PACKETS)
        b_o = _counter(buf, c, _COUNTERS_BYTES, _COUNTERS32_BYTES)
    if c_span := a.get(_CTA_COUNTERS_REPLY):
        c = _attrs(buf, c_span[0], c_span[1])
        p_r = _counter(buf, c, _COUNTERS_PACKETS, _COUNTERS32_PACKETS)
        b_r = _counter(buf, c, _COUNTERS_BYTES, _COUNTERS32_BYTES)
    return FlowEvent(kind, proto, o_src, o_sport, o_dst, o_dport, r_src, r_sport, r_dst, r_dport,
                     ct_id, start_ns, stop_ns, event_ns, p_o, b_o, p_r, b_r, at,
                     from_dump)  # fmt: skip


def decode_ctnetlink(buf: Any, length: int, at: dt.datetime, from_dump: bool = False) -> Decoded:
    """Decode the netlink messages in ``buf[:length]`` (one datagram from the socket).

    ``buf`` is any bytes-like object (the listener passes a reused ``bytearray``). Messages
    other than conntrack NEW/DELETE are skipped; a malformed conntrack message is counted in
    ``errors`` and skipped; a broken netlink header ends the datagram (counted too). Never
    raises on bad input.
    """
    out = Decoded()
    off = 0
    end = min(length, len(buf))
    while off + 16 <= end:
        msg_len, msg_type, _flags, _seq, _pid = _NLMSG.unpack_from(buf, off)
        if msg_len < 16 or off + msg_len > end:
            out.errors += 1
            break
        body, msg_end = off + 16, off + msg_len
        off += (msg_len + 3) & ~3
        if msg_type in (MSG_CT_NEW, MSG_CT_DELETE):
            kind = FlowEventKind.NEW if msg_type == MSG_CT_NEW else FlowEventKind.DESTROY
            try:
                out.events.append(
                    _conntrack(buf, body + _NFGENMSG_LEN, msg_end, kind, at, from_dump)
                )
            except (MalformedMessage, struct.error, IndexError, OSError, ValueError):
                out.errors += 1
        elif msg_type == NLMSG_DONE:
            out.done = True
        elif msg_type == NLMSG_ERROR:
            if msg_end - body >= 4:
                out.error_code = struct.unpack_from("=i", buf, body)[0]
            else:
                out.errors += 1
    return out


# --- records ------------------------------------------------------------------------------

RecordKind = Literal["start", "end"]


class FlowRecord(NamedTuple):
    """One NAT'd connection as stored and shipped (RFC 8158 NAT44 fields plus identity).

    ``kind="start"`` is sent when the flow opens (no end, no counters); ``kind="end"`` when it
    closes and is complete on its own (a flow whose start was missed gets only this one).
    ``flow_id`` (``pod:ct_id:start second``) is identical in both, so the receiver upserts.
    Seconds, not ms: the kernel's NEW event carries no start time, so a start record's
    ``start_ms`` is when the listener read it (a few µs to ms late) while a record built from
    a dump or a late DESTROY has the kernel's exact start; the coarser clock keeps both ids
    equal except across a second boundary, and a ct_id is not reused for the same tuple
    within a second (the old entry must time out first). The end record's ``start_ms`` is the
    kernel's when known.
    ``user``/``session_uid`` are None when no session owned the tunnel IP at the start.
    ``end_inferred``: the DESTROY event was lost (socket overrun) and a later table dump
    showed the flow gone; ``end_ms`` is then when that was noticed (an upper bound) and the
    counters are unknown. ``dst_*`` are None when the pod does not record destinations.
    A NamedTuple for the same reason as :class:`FlowEvent`.
    """

    kind: RecordKind
    flow_id: str
    pod: str
    user: str | None
    session_uid: str | None
    proto: str
    start_ms: int
    end_ms: int | None
    tunnel_ip: str
    tunnel_port: int
    nat_ip: str
    nat_port: int
    dst_ip: str | None
    dst_port: int | None
    packets_out: int | None = None
    bytes_out: int | None = None
    packets_in: int | None = None
    bytes_in: int | None = None
    end_inferred: bool = False

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready form (spool line, log line)."""
        return {
            "kind": self.kind,
            "flow_id": self.flow_id,
            "pod": self.pod,
            "user": self.user,
            "session_uid": self.session_uid,
            "proto": self.proto,
            "start_ms": self.start_ms,
            "end_ms": self.end_ms,
            "tunnel_ip": self.tunnel_ip,
            "tunnel_port": self.tunnel_port,
            "nat_ip": self.nat_ip,
            "nat_port": self.nat_port,
            "dst_ip": self.dst_ip,
            "dst_port": self.dst_port,
            "packets_out": self.packets_out,
            "bytes_out": self.bytes_out,
            "packets_in": self.packets_in,
            "bytes_in": self.bytes_in,
            "end_inferred": self.end_inferred,
        }


Attribution = tuple[str, str]  # (user, session uid)
Lookup = Callable[[str], Attribution | None]
_FlowKey = tuple[int, int, str, int, str, int]  # ct_id + original tuple


@dataclass
class TrackerCounters:
    """What the tracker did, for metrics."""

    records: int = 0
    ignored: int = 0  # events of flows not from a tunnel address
    unattributed: int = 0  # flows from a tunnel address nobody owned
    late: int = 0  # DESTROY without a NEW: one complete record
    evicted: int = 0  # tracked flows dropped to bound memory
    inferred_ends: int = 0  # flows found gone by a resync (their DESTROY was lost)


def _ms(ns: int | None, fallback: dt.datetime) -> int:
    return ns // 1_000_000 if ns is not None else int(fallback.timestamp() * 1000)


def flow_id(pod: str, ct_id: int, start_ms: int) -> str:
    """The idempotency key of a flow's records (see :class:`FlowRecord`)."""
    return f"{pod}:{ct_id}:{start_ms // 1000}"


class FlowTracker:
    """Turns conntrack events into attributed :class:`FlowRecord` s.

    ``networks``: the tunnel networks (events of other sources are ignored). ``lookup``: tunnel
    IP -> (user, session uid) of the session holding it now, or None; it is asked when a flow
    is first seen. ``max_flows`` bounds the open flows remembered; beyond it the oldest is
    forgotten (counted in ``evicted``). A forgotten flow already has its start record; its
    DESTROY then yields a complete record with the same ``flow_id`` (kernel start time), but
    attributed to whoever owns the tunnel IP at that moment, so keep ``max_flows`` at or
    above ``nf_conntrack_max``. ``record_destination=False`` leaves destinations out of the
    records and out of memory (privacy).
    """

    def __init__(
        self,
        pod: str,
        networks: Iterable[ipaddress.IPv4Network | str],
        lookup: Lookup,
        *,
        record_destination: bool = True,
        max_flows: int = 262_144,
    ) -> None:
        if max_flows < 1:
            raise ValueError("max_flows must be at least 1")
        self.pod = pod
        self.lookup = lookup
        self.record_destination = record_destination
        self.max_flows = max_flows
        self.counters = TrackerCounters()
        self._nets: list[tuple[int, int]] = []
        for n in networks:
            net = ipaddress.IPv4Network(n)
            self._nets.append((int(net.network_address), int(net.netmask)))
        self._flows: OrderedDict[_FlowKey, FlowRecord] = OrderedDict()
        # Resync bookkeeping: flows tracked when the dump began and not heard of since, and
        # flows that ended during the dump (so a stale dump entry does not revive them).
        self._pending: set[_FlowKey] | None = None
        self._ended_in_resync: set[_FlowKey] = set()

    def __len__(self) -> int:
        return len(self._flows)

    def is_tunnel(self, address: str) -> bool:
        """Is ``address`` inside one of the tunnel networks?"""
        try:
            value = int.from_bytes(socket.inet_aton(address), "big")
        except (OSError, TypeError):
            return False  # IPv6 or garbage: not a tunnel address of this IPv4-only pod
        # A loop, not any(genexpr): this runs per event and the generator costs ~3x more.
        for net, mask in self._nets:  # noqa: SIM110
            if value & mask == net:
                return True
        return False

    def feed(self, item: FlowItem) -> list[FlowRecord]:
        """Account one event (or resync marker); returns the records to ship (0, 1 or many)."""
        if isinstance(item, Resync):
            return self._resync(item)
        if not self.is_tunnel(item.orig_src):
            self.counters.ignored += 1
            return []
        key: _FlowKey = (item.ct_id, item.proto, item.orig_src, item.orig_sport,
                         item.orig_dst, item.orig_dport)  # fmt: skip
        if self._pending is not None:
            self._pending.discard(key)
        if item.kind is FlowEventKind.NEW:
            return self._on_new(key, item)
        return self._on_destroy(key, item)

    def _start_record(self, ev: FlowEvent) -> FlowRecord:
        owner = self.lookup(ev.orig_src)
        if owner is None:
            self.counters.unattributed += 1
        start_ms = _ms(ev.start_ns if ev.start_ns is not None else ev.event_ns, ev.at)
        keep_dst = self.record_destination
        return FlowRecord(
            kind="start",
            flow_id=flow_id(self.pod, ev.ct_id, start_ms),
            pod=self.pod,
            user=owner[0] if owner else None,
            session_uid=owner[1] if owner else None,
            proto=proto_name(ev.proto),
            start_ms=start_ms,
            end_ms=None,
            tunnel_ip=ev.orig_src,
            tunnel_port=ev.orig_sport,
            nat_ip=ev.reply_dst,
            nat_port=ev.reply_dport,
            dst_ip=ev.reply_src if keep_dst else None,
            dst_port=ev.reply_sport if keep_dst else None,
        )

    def _on_new(self, key: _FlowKey, ev: FlowEvent) -> list[FlowRecord]:
        if key in self._flows:
            return []  # already known (a dump re-listing an open flow)
        if ev.from_dump and key in self._ended_in_resync:
            return []  # the dump snapshot predates this flow's DESTROY
        record = self._start_record(ev)
        if len(self._flows) >= self.max_flows:
            self._flows.popitem(last=False)
            self.counters.evicted += 1
        self._flows[key] = record
        self.counters.records += 1
        return [record]

    def _on_destroy(self, key: _FlowKey, ev: FlowEvent) -> list[FlowRecord]:
        start = self._flows.pop(key, None)
        if self._pending is not None and len(self._ended_in_resync) < self.max_flows:
            self._ended_in_resync.add(key)
        if start is None:
            self.counters.late += 1
            start = self._start_record(ev)
        self.counters.records += 1
        return [
            FlowRecord(
                "end", start.flow_id, start.pod, start.user, start.session_uid, start.proto,
                start.start_ms if ev.start_ns is None else ev.start_ns // 1_000_000,
                _ms(ev.stop_ns, ev.at), start.tunnel_ip, start.tunnel_port,
                start.nat_ip, start.nat_port, start.dst_ip, start.dst_port,
                ev.packets_orig, ev.bytes_orig, ev.packets_reply, ev.bytes_reply,
            )
        ]  # fmt: skip

    def _resync(self, mark: Resync) -> list[FlowRecord]:
        if mark.phase == "begin":
            self._pending = set(self._flows)
            self._ended_in_resync.clear()
            return []
        pending, self._pending = self._pending, None
        self._ended_in_resync.clear()
        if mark.phase == "abort" or pending is None:
            return []
        # Tracked before the dump, neither listed by it nor heard of since: gone while we were
        # deaf. Say so rather than leave the flow open forever.
        end_ms = int(mark.at.timestamp() * 1000)
        out: list[FlowRecord] = []
        for key in pending:
            start = self._flows.pop(key, None)
            if start is None:
                continue
            out.append(
                FlowRecord(
                    "end", start.flow_id, start.pod, start.user, start.session_uid,
                    start.proto, start.start_ms, max(end_ms, start.start_ms), start.tunnel_ip,
                    start.tunnel_port, start.nat_ip, start.nat_port, start.dst_ip,
                    start.dst_port, end_inferred=True,
                )
            )  # fmt: skip
        self.counters.inferred_ends += len(out)
        self.counters.records += len(out)
        return out
