"""NAT audit: conntrack flow events, their ctnetlink decoding, and the flow records we keep.

Three pure pieces, no I/O (the socket lives in :mod:`vpnfleet.agent.conntrack`):

- :class:`FlowEvent`: one conntrack NEW or DESTROY, as the kernel reported it.
- :func:`decode_ctnetlink`: netlink datagram bytes -> events. Hand-written over ``struct``
  (with layouts learned from the kernel's own messages) because pyroute2's generic
  ``nfct_msg`` decoder costs ~8-10x more per message (``bench/flow_listener.py
  --decode-only``), and the listener must keep up with a NAT pod's connection rate on one
  core.
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
from dataclasses import dataclass
from json.encoder import encode_basestring_ascii as _json_str
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
    (a frozen dataclass with 20 fields costs ~5x more).
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
    find flows whose DESTROY was lost in an overrun: started before the dump, not in it."""

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


class Decoded(NamedTuple):
    """What one netlink datagram held (a NamedTuple: one is built per datagram)."""

    events: list[FlowEvent]
    errors: int  # conntrack messages that did not decode (skipped, never fatal)
    done: bool  # NLMSG_DONE: a dump is complete
    error_code: int  # from NLMSG_ERROR: 0 is an ACK, negative is -errno


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


def _conntrack_generic(
    buf: Any, off: int, end: int, kind: FlowEventKind, at: dt.datetime, from_dump: bool
) -> FlowEvent:
    """The reference decoder: walks every attribute. Raises MalformedMessage."""
    a = _attrs(buf, off, end)
    proto, o_src, o_sport, o_dst, o_dport = _tuple(buf, a.get(_CTA_TUPLE_ORIG), False)
    _, r_src, r_sport, r_dst, r_dport = _tuple(buf, a.get(_CTA_TUPLE_REPLY), True)
    ct_id = 0
    if (span := a.get(_CTA_ID)) and span[1] - span[0] >= 4:
        ct_id = int(_BE32.unpack_from(buf, span[0])[0])
    event_ns = start_ns = stop_ns = None
    if (span := a.get(_CTA_TIMESTAMP_EVENT)) and span[1] - span[0] >= 8:
        event_ns = int(_BE64.unpack_from(buf, span[0])[0])
    if span := a.get(_CTA_TIMESTAMP):
        ts = _attrs(buf, span[0], span[1])
        start_ns = _counter(buf, ts, _TS_START, -1)
        stop_ns = _counter(buf, ts, _TS_STOP, -1)
    counters: list[int | None] = [None, None, None, None]
    for i, cta in enumerate((_CTA_COUNTERS_ORIG, _CTA_COUNTERS_REPLY)):
        if span := a.get(cta):
            c = _attrs(buf, span[0], span[1])
            counters[2 * i] = _counter(buf, c, _COUNTERS_PACKETS, _COUNTERS32_PACKETS)
            counters[2 * i + 1] = _counter(buf, c, _COUNTERS_BYTES, _COUNTERS32_BYTES)
    p_o, b_o, p_r, b_r = counters
    return FlowEvent(kind, proto, o_src, o_sport, o_dst, o_dport, r_src, r_sport, r_dst, r_dport,
                     ct_id, start_ns, stop_ns, event_ns, p_o, b_o, p_r, b_r, at,
                     from_dump)  # fmt: skip


# --- learned layouts (the fast path) ------------------------------------------------------
# A kernel sends the same few layouts over and over (UDP NEW, TCP DESTROY, ...): same
# attributes, same order, same sizes. After the generic walk decodes a message, we compile
# its layout: which bytes are attribute headers (they must match exactly: checked with one
# bitmask comparison over the whole message) and where the values sit (read with one
# struct). A message with the same type and length whose headers match is then decoded
# without walking; anything else takes the generic walk. A layout is kept only if it decodes
# the message it was learned from exactly as the generic walk did. This cuts decoding from
# ~60k to ~25k CPU instructions per message (counted with valgrind).

_MAX_LAYOUTS = 64
_NTOA_CACHE_MAX = 65_536
# FlowEvent fields 1..17 come from the message; these name them in the learner.
_EVENT_FIELDS = ("proto", "orig_src", "orig_sport", "orig_dst", "orig_dport", "reply_src",
                 "reply_sport", "reply_dst", "reply_dport", "ct_id", "start_ns", "stop_ns",
                 "event_ns", "packets_orig", "bytes_orig", "packets_reply",
                 "bytes_reply")  # fmt: skip
_V4_FIELDS = {"orig_src", "orig_dst", "reply_src", "reply_dst"}


class _Layout(NamedTuple):
    mask: int  # 0xFF over header bytes
    expected: int  # the header bytes, under the mask
    values: struct.Struct  # reads the value fields, in offset order
    v4: tuple[int, ...]  # indices of IPv4 addresses (read as integers) among the values
    v6: tuple[int, ...]  # indices of IPv6 addresses (read as 16 bytes)
    pick: operator.itemgetter[Any]  # values + constants -> FlowEvent fields, in order


# _layout_key() -> layout, or None when that shape cannot be compiled.
_LAYOUTS: dict[int, _Layout | None] = {}


def _layout_key(msg_type: int, length: int, from_dump: bool) -> int:
    # Dump entries and live NEW events share a message type but not a layout.
    return length << 17 | msg_type << 1 | from_dump


_NTOA: dict[int, str] = {}


def _ntoa(value: int) -> str:
    text = _NTOA.get(value)
    if text is None:
        if len(_NTOA) >= _NTOA_CACHE_MAX:
            _NTOA.clear()  # bounded: many distinct peers only cost the conversion again
        text = _NTOA[value] = socket.inet_ntoa(value.to_bytes(4, "big"))
    return text


def _learn(buf: Any, off: int, end: int) -> _Layout | None:
    """Compile the layout of the message at [off, end), or None if it has an unusual shape
    (duplicate attributes, unexpected sizes) that only the generic walk should handle."""
    fixed = bytearray(end - off)
    found: dict[str, tuple[int, str]] = {}  # field -> (offset, struct code)

    def walk(start: int, stop: int, on_attr: Callable[[int, int, int], bool]) -> bool:
        seen: set[int] = set()
        pos = start
        while pos + 4 <= stop:
            ln, ty = _NLA.unpack_from(buf, pos)
            t = ty & _NLA_TYPE_MASK
            if ln < 4 or pos + ln > stop or t in seen:
                return False
            seen.add(t)
            fixed[pos - off : pos - off + 4] = b"\xff\xff\xff\xff"
            if not on_attr(t, pos + 4, pos + ln):
                return False
            pos += (ln + 3) & ~3
        return True

    def tuple_attr(prefix: str) -> Callable[[int, int, int], bool]:
        ports: dict[int, int] = {}

        def ip(t: int, p: int, q: int) -> bool:
            size = {_IP_V4_SRC: 4, _IP_V4_DST: 4, _IP_V6_SRC: 16, _IP_V6_DST: 16}.get(t)
            if size is None:
                return True
            if q - p != size:
                return False
            name = prefix + ("_src" if t in (_IP_V4_SRC, _IP_V6_SRC) else "_dst")
            if name in found:
                return False  # both v4 and v6 addresses: leave it to the generic walk
            found[name] = (p, "I" if size == 4 else "16s")
            return True

        def proto(t: int, p: int, q: int) -> bool:
            if t == _PROTO_NUM and q - p >= 1:
                found[prefix + "_proto"] = (p, "B")
            elif t in (_PROTO_SRC_PORT, _PROTO_DST_PORT, _PROTO_ICMP_ID, _PROTO_ICMPV6_ID):
                if q - p < 2:
                    return False
                ports[t] = p
            return True

        def on_tuple(t: int, p: int, q: int) -> bool:
            if t == _TUPLE_IP:
                return walk(p, q, ip)
            if t == _TUPLE_PROTO:
                if not walk(p, q, proto):
                    return False
                # The same port semantics as _tuple().
                if _PROTO_SRC_PORT in ports:
                    found[prefix + "_sport"] = (ports[_PROTO_SRC_PORT], "H")
                    if _PROTO_DST_PORT in ports:
                        found[prefix + "_dport"] = (ports[_PROTO_DST_PORT], "H")
                elif _PROTO_ICMP_ID in ports or _PROTO_ICMPV6_ID in ports:
                    pos = ports.get(_PROTO_ICMP_ID, ports.get(_PROTO_ICMPV6_ID, 0))
                    found[prefix + ("_dport" if prefix == "reply" else "_sport")] = (pos, "H")
            return True

        return on_tuple

    def pair(names: dict[int, tuple[str, int, str]]) -> Callable[[int, int, int], bool]:
        # Nested 64-bit (or 32-bit) values: type -> (field, minimum size, struct code).
        def on_value(t: int, p: int, q: int) -> bool:
            spec = names.get(t)
            if spec is not None and q - p >= spec[1]:
                name, _, code = spec
                # A 64-bit value wins over its 32-bit twin, as in _counter().
                if name not in found or code == "Q":
                    found[name] = (p, code)
            return True

        return on_value

    def top(t: int, p: int, q: int) -> bool:
        if t == _CTA_TUPLE_ORIG:
            return walk(p, q, tuple_attr("orig"))
        if t == _CTA_TUPLE_REPLY:
            return walk(p, q, tuple_attr("reply"))
        if t == _CTA_ID and q - p >= 4:
            found["ct_id"] = (p, "I")
        elif t == _CTA_TIMESTAMP_EVENT and q - p >= 8:
            found["event_ns"] = (p, "Q")
        elif t == _CTA_TIMESTAMP:
            return walk(
                p, q, pair({_TS_START: ("start_ns", 8, "Q"), _TS_STOP: ("stop_ns", 8, "Q")})
            )
        elif t in (_CTA_COUNTERS_ORIG, _CTA_COUNTERS_REPLY):
            side = "orig" if t == _CTA_COUNTERS_ORIG else "reply"
            return walk(p, q, pair({
                _COUNTERS_PACKETS: (f"packets_{side}", 8, "Q"),
                _COUNTERS_BYTES: (f"bytes_{side}", 8, "Q"),
                _COUNTERS32_PACKETS: (f"packets_{side}", 4, "I"),
                _COUNTERS32_BYTES: (f"bytes_{side}", 4, "I"),
            }))  # fmt: skip
        return True

    if not walk(off, end, top):
        return None
    if "orig_proto" not in found or "reply_proto" not in found:
        return None
    found["proto"] = found.pop("orig_proto")
    del found["reply_proto"]
    if any(f not in found for f in ("orig_src", "orig_dst", "reply_src", "reply_dst")):
        return None
    order = sorted(found, key=lambda name: found[name][0])
    fmt, cursor = ">", 0
    for name in order:
        pos, code = found[name]
        fmt += f"{pos - off - cursor}x{code}"
        cursor = pos - off + struct.calcsize(">" + code)
    index = {name: i for i, name in enumerate(order)}
    n = len(order)
    none, zero = n, n + 1  # constants appended after the values
    zero_fields = {"orig_sport", "orig_dport", "reply_sport", "reply_dport", "ct_id"}
    picks = [n + 2]  # kind
    for name in _EVENT_FIELDS:
        picks.append(index.get(name, zero if name in zero_fields else none))
    picks += [n + 3, n + 4]  # at, from_dump
    mask = int.from_bytes(fixed, "big")
    return _Layout(
        mask=mask,
        expected=int.from_bytes(bytes(buf[off:end]), "big") & mask,
        values=struct.Struct(fmt),
        v4=tuple(index[f] for f in order if f in _V4_FIELDS and found[f][1] == "I"),
        v6=tuple(index[f] for f in order if f in _V4_FIELDS and found[f][1] == "16s"),
        pick=operator.itemgetter(*picks),
    )


def _apply(layout: _Layout, buf: Any, off: int, kind: FlowEventKind, at: dt.datetime,
           from_dump: bool) -> FlowEvent:  # fmt: skip
    values = list(layout.values.unpack_from(buf, off))
    for i in layout.v4:
        text = _NTOA.get(values[i])
        values[i] = text if text is not None else _ntoa(values[i])
    for i in layout.v6:
        values[i] = socket.inet_ntop(socket.AF_INET6, values[i])
    values += (None, 0, kind, at, from_dump)
    # tuple.__new__ skips the NamedTuple's Python-level __new__ (20 keyword-able arguments).
    return tuple.__new__(FlowEvent, layout.pick(values))


def _conntrack(buf: Any, off: int, end: int, msg_type: int, at: dt.datetime,
               from_dump: bool) -> FlowEvent:  # fmt: skip
    kind = FlowEventKind.NEW if msg_type == MSG_CT_NEW else FlowEventKind.DESTROY
    key = (end - off) << 17 | msg_type << 1 | from_dump  # _layout_key(), inlined
    layout = _LAYOUTS.get(key)
    if layout is not None:
        if int.from_bytes(buf[off:end], "big") & layout.mask == layout.expected:
            return _apply(layout, buf, off, kind, at, from_dump)
        return _conntrack_generic(buf, off, end, kind, at, from_dump)
    event = _conntrack_generic(buf, off, end, kind, at, from_dump)
    if key not in _LAYOUTS and len(_LAYOUTS) < _MAX_LAYOUTS:
        learned = _learn(buf, off, end)
        if learned is not None and _apply(learned, buf, off, kind, at, from_dump) != event:
            learned = None  # never trust a layout that disagrees with the reference
        _LAYOUTS[key] = learned
    return event


def decode_ctnetlink(buf: Any, length: int, at: dt.datetime, from_dump: bool = False) -> Decoded:
    """Decode the netlink messages in ``buf[:length]`` (one datagram from the socket).

    ``buf`` is any bytes-like object (the listener passes a reused ``bytearray``). Messages
    other than conntrack NEW/DELETE are skipped; a malformed conntrack message is counted in
    ``errors`` and skipped; a broken netlink header ends the datagram (counted too). Never
    raises on bad input.
    """
    events: list[FlowEvent] = []
    errors = error_code = 0
    done = False
    off = 0
    end = min(length, len(buf))
    while off + 16 <= end:
        msg_len, msg_type, _flags, _seq, _pid = _NLMSG.unpack_from(buf, off)
        if msg_len < 16 or off + msg_len > end:
            errors += 1
            break
        body, msg_end = off + 16, off + msg_len
        off += (msg_len + 3) & ~3
        if msg_type in (MSG_CT_NEW, MSG_CT_DELETE):
            try:
                events.append(
                    _conntrack(buf, body + _NFGENMSG_LEN, msg_end, msg_type, at, from_dump)
                )
            except (MalformedMessage, struct.error, IndexError, OSError, ValueError):
                errors += 1
        elif msg_type == NLMSG_DONE:
            done = True
        elif msg_type == NLMSG_ERROR:
            if msg_end - body >= 4:
                error_code = struct.unpack_from("=i", buf, body)[0]
            else:
                errors += 1
    return tuple.__new__(Decoded, (events, errors, done, error_code))


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

    def to_json(self) -> str:
        """One JSON object, equal to ``json.dumps(self.as_dict())`` but ~3x cheaper.

        Records are serialized once each, at the event rate: this is on the hot path.
        Strings go through json's own (C) string encoder, so any content is escaped right
        (and the text is pure ASCII).
        """
        return self._format(_RECORD_JSON)

    def to_log_line(self) -> str:
        """The record as the agent prints and spools it: the JSON object with
        ``"event": "flow"`` first (so log pipelines can pick flow lines out of the agent's
        output), and a newline. One format call: the agent's per-event path."""
        return self._format(_RECORD_LINE)

    def _format(self, template: str) -> str:
        (kind, fid, pod, user, session, proto, start, end, tunnel_ip, tunnel_port, nat_ip,
         nat_port, dst_ip, dst_port, p_out, b_out, p_in, b_in, inferred) = self  # fmt: skip
        return template % (
            _json_str(kind), _json_str(fid), _json_str(pod),
            "null" if user is None else _json_str(user),
            "null" if session is None else _json_str(session),
            _json_str(proto), start, "null" if end is None else end,
            _json_str(tunnel_ip), tunnel_port, _json_str(nat_ip), nat_port,
            "null" if dst_ip is None else _json_str(dst_ip),
            "null" if dst_port is None else dst_port,
            "null" if p_out is None else p_out, "null" if b_out is None else b_out,
            "null" if p_in is None else p_in, "null" if b_in is None else b_in,
            "true" if inferred else "false",
        )  # fmt: skip


# One %-format for a whole record: a single C call instead of ~20 concatenations. %d (not %s)
# for the never-null numbers, so a wrong type fails loudly instead of writing bad JSON.
_RECORD_JSON = (
    '{"kind":%s,"flow_id":%s,"pod":%s,"user":%s,"session_uid":%s,"proto":%s,"start_ms":%d,'
    '"end_ms":%s,"tunnel_ip":%s,"tunnel_port":%d,"nat_ip":%s,"nat_port":%d,"dst_ip":%s,'
    '"dst_port":%s,"packets_out":%s,"bytes_out":%s,"packets_in":%s,"bytes_in":%s,'
    '"end_inferred":%s}'
)
_RECORD_LINE = '{"event":"flow",' + _RECORD_JSON[1:] + "\n"


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
    above ``nf_conntrack_max`` (a tracked flow costs ~0.5 KB: the default is ~130 MB at
    worst). ``record_destination=False`` leaves destinations out of the records and out of
    memory (privacy).
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
        # Resync bookkeeping, between Resync begin and end: when the dump began, the flows
        # it listed, and the flows that ended meanwhile (so a stale dump entry cannot revive
        # them).
        self._resync_begin_ms: int | None = None
        self._listed: set[_FlowKey] = set()
        self._ended_in_resync: set[_FlowKey] = set()
        self._is_tunnel: dict[str, bool] = {}

    def __len__(self) -> int:
        return len(self._flows)

    def is_tunnel(self, address: str) -> bool:
        """Is ``address`` inside one of the tunnel networks?"""
        # Few distinct sources (the tunnel IPs and the pod's own), many events: memoize.
        known = self._is_tunnel.get(address)
        if known is None:
            known = self._is_tunnel[address] = self._in_networks(address)
            if len(self._is_tunnel) > 65_536:
                self._is_tunnel.clear()  # bounded: a scan of many sources cannot grow it
        return known

    def _in_networks(self, address: str) -> bool:
        try:
            value = int.from_bytes(socket.inet_aton(address), "big")
        except (OSError, TypeError):
            return False  # IPv6 or garbage: not a tunnel address of this IPv4-only pod
        return any(value & mask == net for net, mask in self._nets)

    def feed(self, item: FlowItem) -> list[FlowRecord]:
        """Account one event (or resync marker); returns the records to ship (0, 1 or many)."""
        if isinstance(item, Resync):
            return self._resync(item)
        # Runs once per conntrack event: the event is unpacked once and the NEW and DESTROY
        # paths are written out flat (attribute reads and method calls dominate otherwise).
        (kind, proto, src, sport, dst, dport, _, _, _, _, ct_id, start_ns,
         stop_ns, _, p_out, b_out, p_in, b_in, at, from_dump) = item  # fmt: skip
        tunnel = self._is_tunnel.get(src)
        if tunnel is None:
            tunnel = self.is_tunnel(src)
        if not tunnel:
            self.counters.ignored += 1
            return []
        key: _FlowKey = (ct_id, proto, src, sport, dst, dport)
        flows = self._flows
        if kind is FlowEventKind.NEW:
            if from_dump:
                self._listed.add(key)
            if key in flows:
                return []  # already known (a dump re-listing an open flow)
            if from_dump and key in self._ended_in_resync:
                return []  # the dump snapshot predates this flow's DESTROY
            record = self._start_record(item)
            if len(flows) >= self.max_flows:
                flows.popitem(last=False)
                self.counters.evicted += 1
            flows[key] = record
            self.counters.records += 1
            return [record]
        start = flows.pop(key, None)
        if self._resync_begin_ms is not None and len(self._ended_in_resync) < self.max_flows:
            self._ended_in_resync.add(key)
        if start is None:
            self.counters.late += 1  # the listener started late, or the flow was evicted
            start = self._start_record(item)
        self.counters.records += 1
        start_ms = start[6] if start_ns is None else start_ns // 1_000_000
        end_ms = stop_ns // 1_000_000 if stop_ns is not None else int(at.timestamp() * 1000)
        return [tuple.__new__(FlowRecord, (
            "end", *start[1:6], start_ms, end_ms, *start[8:14],
            p_out, b_out, p_in, b_in, False,
        ))]  # fmt: skip

    def _start_record(self, ev: FlowEvent) -> FlowRecord:
        owner = self.lookup(ev.orig_src)
        if owner is None:
            self.counters.unattributed += 1
            user = session = None
        else:
            user, session = owner
        ns = ev.start_ns if ev.start_ns is not None else ev.event_ns
        start_ms = ns // 1_000_000 if ns is not None else int(ev.at.timestamp() * 1000)
        keep_dst = self.record_destination
        # tuple.__new__ skips the NamedTuple's Python-level __new__: once per flow, it counts.
        return tuple.__new__(FlowRecord, (
            # The flow id as flow_id() makes it, inlined.
            "start", f"{self.pod}:{ev.ct_id}:{start_ms // 1000}", self.pod, user, session,
            PROTO_NAMES.get(ev.proto) or str(ev.proto), start_ms, None,
            ev.orig_src, ev.orig_sport, ev.reply_dst, ev.reply_dport,
            ev.reply_src if keep_dst else None, ev.reply_sport if keep_dst else None,
            None, None, None, None, False,
        ))  # fmt: skip

    def end_all(self, at: dt.datetime) -> list[FlowRecord]:
        """End every open flow now (``end_inferred``): the pod is shutting down, its clients
        are gone, and nobody will be listening for these flows' DESTROY events."""
        at_ms = int(at.timestamp() * 1000)
        out = [
            tuple.__new__(FlowRecord, (
                "end", *start[1:7], max(at_ms, start.start_ms), *start[8:14],
                None, None, None, None, True,
            ))
            for start in self._flows.values()
        ]  # fmt: skip
        self._flows.clear()
        self.counters.inferred_ends += len(out)
        self.counters.records += len(out)
        return out

    def _resync(self, mark: Resync) -> list[FlowRecord]:
        at_ms = int(mark.at.timestamp() * 1000)
        if mark.phase == "begin":
            self._resync_begin_ms = at_ms
            self._listed.clear()
            self._ended_in_resync.clear()
            return []
        begin_ms, self._resync_begin_ms = self._resync_begin_ms, None
        listed, self._listed = self._listed, set()
        self._ended_in_resync.clear()
        if mark.phase == "abort" or begin_ms is None:
            return []
        # A flow that started before the dump began and is still open would have been listed.
        # Not listed and not ended since: its DESTROY was lost (it may even have been its
        # NEW that we read late, from the backlog). Say so rather than leave it open forever.
        # Flows started after the dump began cannot be judged; the next resync will.
        gone = [key for key, rec in self._flows.items()
                if rec.start_ms < begin_ms and key not in listed]  # fmt: skip
        out: list[FlowRecord] = []
        for key in gone:
            start = self._flows.pop(key)
            out.append(
                tuple.__new__(FlowRecord, (
                    "end", *start[1:7], max(at_ms, start.start_ms), *start[8:14],
                    None, None, None, None, True,
                ))
            )  # fmt: skip
        self.counters.inferred_ends += len(out)
        self.counters.records += len(out)
        return out
