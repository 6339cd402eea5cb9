"""Denied packets: decode NFLOG netlink messages and aggregate them into audit events. Pure.

The pod firewall (:mod:`vpnfleet.core.fwrender`) ends its forward chain with a rate-limited
``-j NFLOG --nflog-prefix P-deny --nflog-group N`` followed by ``DROP``. The kernel hands each
logged packet to ``nfnetlink_log``, which sends it to the listening socket
(:mod:`vpnfleet.agent.nflog`) as one netlink message::

    nlmsghdr (16 bytes, host order)  type = NFNL_SUBSYS_ULOG << 8 | NFULNL_MSG_PACKET
    nfgenmsg (4 bytes)               family, version, res_id = group (big-endian)
    attributes (nlattr: u16 len, u16 type, value, padded to 4 bytes)
        NFULA_PACKET_HDR   be16 hw_protocol, u8 hook, u8 pad
        NFULA_TIMESTAMP    be64 sec, be64 usec
        NFULA_PREFIX       NUL-terminated string
        NFULA_PAYLOAD      the IPv4 packet, cut at the configured copy range
        ...                (mark, interfaces, uid, ... : ignored)

Netlink headers are in host byte order, nfnetlink attribute values in network order.

Decoding never raises: malformed input yields ``None`` and bumps a reason in a
:class:`collections.Counter` the caller passes in, so a garbled message costs one counter
increment, never the listener.

:class:`DeniedAggregator` turns packets into :class:`DeniedEvent` records: one per
(session, destination, protocol, port) per time window, with a cap on distinct keys per window
so that a port scan produces a bounded number of records plus one overflow summary per
session instead of one record per probed port.
"""

from __future__ import annotations

import datetime as dt
import struct
import sys
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from ipaddress import IPv4Address
from typing import Any

# --- netlink / nfnetlink_log constants (linux/netlink.h, linux/netfilter/nfnetlink_log.h) ---

NLMSG_NOOP = 1
NLMSG_ERROR = 2
NLMSG_DONE = 3
NLMSG_OVERRUN = 4
NFNL_SUBSYS_ULOG = 4
NFULNL_MSG_PACKET = 0
NFULNL_MSG_CONFIG = 1
NFULNL_PACKET_TYPE = (NFNL_SUBSYS_ULOG << 8) | NFULNL_MSG_PACKET

NFULA_PACKET_HDR = 1
NFULA_TIMESTAMP = 3
NFULA_PAYLOAD = 9
NFULA_PREFIX = 10
# The two high bits of nla_type are flags (nested, net byte order), not part of the type.
NLA_TYPE_MASK = 0x3FFF

ETH_P_IP = 0x0800
IPPROTO_ICMP = 1
IPPROTO_TCP = 6
IPPROTO_UDP = 17
PROTO_NAMES: dict[int, str] = {IPPROTO_ICMP: "icmp", IPPROTO_TCP: "tcp", IPPROTO_UDP: "udp"}

# Netlink headers use the host's byte order; every agent runs on the machine it parses for.
_NATIVE = "<" if sys.byteorder == "little" else ">"
NLMSGHDR = struct.Struct(_NATIVE + "IHHII")  # len, type, flags, seq, pid
NLATTR = struct.Struct(_NATIVE + "HH")  # len, type
NFGENMSG = struct.Struct("!BBH")  # family, version, res_id (group, big-endian)
_PACKET_HDR = struct.Struct("!HBx")  # hw_protocol, hook
_TIMESTAMP = struct.Struct("!QQ")  # sec, usec
_IPV4 = struct.Struct("!BBHHHBBH4s4s")
_PORTS = struct.Struct("!HH")

# A kernel timestamp further than this from the receive time is not wall-clock time (older
# kernels may report 0 or a monotonic value); the receive time is used instead.
DEFAULT_MAX_SKEW = 60.0


def nl_align(n: int) -> int:
    """Round ``n`` up to netlink's 4-byte alignment."""
    return (n + 3) & ~3


# --- decoding --------------------------------------------------------------------------------


@dataclass(frozen=True)
class NetlinkMessage:
    """One netlink message split out of a datagram (``body`` follows the 16-byte header)."""

    type: int
    flags: int
    seq: int
    pid: int
    body: bytes


def iter_netlink(data: bytes, reasons: Counter[str] | None = None) -> Iterator[NetlinkMessage]:
    """Split a received datagram into netlink messages.

    Stops at the first message whose length field does not fit the datagram (counted as
    ``truncated_netlink``): nothing after it can be framed reliably.
    """
    offset = 0
    while offset + NLMSGHDR.size <= len(data):
        length, mtype, flags, seq, pid = NLMSGHDR.unpack_from(data, offset)
        if length < NLMSGHDR.size or offset + length > len(data):
            _count(reasons, "truncated_netlink")
            return
        yield NetlinkMessage(
            mtype, flags, seq, pid, bytes(data[offset + NLMSGHDR.size : offset + length])
        )
        offset += nl_align(length)
    if offset < len(data) and any(data[offset:]):
        # Trailing bytes too short for a header (zero padding is harmless).
        _count(reasons, "truncated_netlink")


def parse_attributes(data: bytes, offset: int = 0) -> dict[int, bytes] | None:
    """Top-level netlink attributes from ``offset`` on, keyed by type (last one wins).

    None when an attribute's length is impossible; trailing padding is ignored.
    """
    attrs: dict[int, bytes] = {}
    while offset + NLATTR.size <= len(data):
        length, atype = NLATTR.unpack_from(data, offset)
        if length < NLATTR.size or offset + length > len(data):
            return None
        attrs[atype & NLA_TYPE_MASK] = bytes(data[offset + NLATTR.size : offset + length])
        offset += nl_align(length)
    return attrs


@dataclass(frozen=True)
class DeniedPacket:
    """A packet the firewall dropped, as far as NFLOG copied it.

    ``at`` is Unix time in seconds (the kernel's timestamp, or the receive time when the kernel
    gave none or an implausible one). ``proto`` is ``tcp``/``udp``/``icmp`` or the protocol
    number in decimal. Ports are set for tcp/udp, ``icmp_type`` for icmp; all three are None
    for other protocols and for non-first fragments (no transport header).
    """

    at: float
    src: IPv4Address
    dst: IPv4Address
    proto: str
    sport: int | None
    dport: int | None
    icmp_type: int | None
    prefix: str

    def as_record(self) -> dict[str, Any]:
        """JSON-ready dict (addresses as strings, time as ISO 8601 UTC)."""
        return {
            "at": _iso(self.at),
            "src": str(self.src),
            "dst": str(self.dst),
            "proto": self.proto,
            "sport": self.sport,
            "dport": self.dport,
            "icmp_type": self.icmp_type,
            "prefix": self.prefix,
        }


def parse_nflog_packet(
    body: bytes,
    received_at: float,
    reasons: Counter[str] | None = None,
    *,
    max_skew: float = DEFAULT_MAX_SKEW,
) -> DeniedPacket | None:
    """Decode the body (after nlmsghdr) of an ``NFULNL_MSG_PACKET`` message.

    Returns None for anything that is not a well-formed IPv4 packet with a readable transport
    header, counting why in ``reasons``.
    """
    if len(body) < NFGENMSG.size:
        return _fail(reasons, "truncated_nfgenmsg")
    attrs = parse_attributes(body, NFGENMSG.size)
    if attrs is None:
        return _fail(reasons, "bad_attribute")
    hdr = attrs.get(NFULA_PACKET_HDR)
    if hdr is not None:
        if len(hdr) < _PACKET_HDR.size:
            return _fail(reasons, "bad_attribute")
        hw_protocol, _hook = _PACKET_HDR.unpack_from(hdr)
        # 0 means "unknown" (e.g. logged on a tunnel device without a link layer); the
        # payload's version nibble decides then.
        if hw_protocol not in (0, ETH_P_IP):
            return _fail(reasons, "not_ipv4")
    payload = attrs.get(NFULA_PAYLOAD)
    if payload is None:
        return _fail(reasons, "no_payload")
    at = received_at
    ts = attrs.get(NFULA_TIMESTAMP)
    if ts is not None and len(ts) >= _TIMESTAMP.size:
        sec, usec = _TIMESTAMP.unpack_from(ts)
        stamp = sec + usec / 1e6
        if usec < 1_000_000 and abs(stamp - received_at) <= max_skew:
            at = stamp
    raw_prefix = attrs.get(NFULA_PREFIX, b"")
    prefix = raw_prefix.split(b"\0", 1)[0].decode("utf-8", "replace")
    return parse_ipv4(payload, at, prefix, reasons)


def parse_ipv4(
    payload: bytes, at: float, prefix: str = "", reasons: Counter[str] | None = None
) -> DeniedPacket | None:
    """Decode an IPv4 packet (possibly cut short after the transport header)."""
    if len(payload) < _IPV4.size:
        return _fail(reasons, "truncated_ip")
    vihl, _tos, total_len, _ident, frag, _ttl, proto, _csum, src, dst = _IPV4.unpack_from(payload)
    if vihl >> 4 != 4:
        return _fail(reasons, "not_ipv4")
    ihl = (vihl & 0x0F) * 4
    if ihl < _IPV4.size or total_len < ihl:
        return _fail(reasons, "bad_ip_header")
    if len(payload) < ihl:
        return _fail(reasons, "truncated_ip")
    # Captured bytes beyond the IP total length are not part of the packet.
    l4 = payload[ihl : min(len(payload), total_len)]
    name = PROTO_NAMES.get(proto, str(proto))
    sport = dport = icmp_type = None
    first_fragment = (frag & 0x1FFF) == 0
    if first_fragment and proto in (IPPROTO_TCP, IPPROTO_UDP):
        if len(l4) < _PORTS.size:
            return _fail(reasons, "truncated_l4")
        sport, dport = _PORTS.unpack_from(l4)
    elif first_fragment and proto == IPPROTO_ICMP:
        if len(l4) < 2:  # type and code
            return _fail(reasons, "truncated_l4")
        icmp_type = l4[0]
    return DeniedPacket(
        at=at,
        src=IPv4Address(src),
        dst=IPv4Address(dst),
        proto=name,
        sport=sport,
        dport=dport,
        icmp_type=icmp_type,
        prefix=prefix,
    )


def decode_datagram(
    data: bytes, received_at: float, reasons: Counter[str] | None = None
) -> list[DeniedPacket]:
    """Every denied packet in one datagram from an NFLOG socket; other messages are skipped."""
    out: list[DeniedPacket] = []
    for msg in iter_netlink(data, reasons):
        if msg.type != NFULNL_PACKET_TYPE:
            continue
        pkt = parse_nflog_packet(msg.body, received_at, reasons)
        if pkt is not None:
            out.append(pkt)
    return out


def _count(reasons: Counter[str] | None, reason: str) -> None:
    if reasons is not None:
        reasons[reason] += 1


def _fail(reasons: Counter[str] | None, reason: str) -> DeniedPacket | None:
    _count(reasons, reason)
    return None


def _iso(t: float) -> str:
    return dt.datetime.fromtimestamp(t, dt.UTC).isoformat(timespec="milliseconds")


# --- aggregation ----------------------------------------------------------------------------

SessionLookup = Callable[[IPv4Address], tuple[str, str] | None]
"""Maps a tunnel IP to (user, session uid) of the session holding it now, or None."""

DEFAULT_WINDOW = 10.0
DEFAULT_MAX_KEYS = 256


@dataclass(frozen=True)
class DeniedEvent:
    """Denied attempts of one session to one destination within one window.

    An *overflow* event (``overflow=True``) summarises the packets of one session that arrived
    after the window's key cap was reached: ``dst``, ``proto`` and ``dport`` are None then.
    ``user`` and ``session_uid`` are None when no session held the source address.
    """

    user: str | None
    session_uid: str | None
    src: IPv4Address | None
    dst: IPv4Address | None
    proto: str | None
    dport: int | None
    first_at: float
    last_at: float
    count: int
    overflow: bool = False

    def as_record(self) -> dict[str, Any]:
        """JSON-ready audit record (``event`` is ``denied`` or ``denied_overflow``)."""
        return {
            "event": "denied_overflow" if self.overflow else "denied",
            "user": self.user,
            "session_uid": self.session_uid,
            "src": None if self.src is None else str(self.src),
            "dst": None if self.dst is None else str(self.dst),
            "proto": self.proto,
            "dport": self.dport,
            "first_at": _iso(self.first_at),
            "last_at": _iso(self.last_at),
            "count": self.count,
        }


# (user, session uid, src, dst, proto, dport): a session has one tunnel IP, so for known
# sessions this is "per user and destination"; several sessions of one user stay separate so
# each record names the session it came from, and unknown sources stay apart by address.
_Key = tuple[str | None, str | None, IPv4Address, IPv4Address, str, int | None]
_Owner = tuple[str | None, str | None]


class _Bucket:
    __slots__ = ("count", "first_at", "last_at", "src")

    def __init__(self, at: float, src: IPv4Address | None) -> None:
        self.first_at = at
        self.last_at = at
        self.count = 0
        self.src = src

    def add(self, at: float, src: IPv4Address | None) -> None:
        self.first_at = min(self.first_at, at)
        self.last_at = max(self.last_at, at)
        self.count += 1
        if src != self.src:
            self.src = None  # several sources in one overflow summary


class DeniedAggregator:
    """Groups denied packets into per-window :class:`DeniedEvent` records.

    A window opens with its first packet and lasts ``window`` seconds of packet time; a packet
    past its end (or more than one window before its start: the clock went back) closes it.
    Each window holds at most ``max_keys`` distinct keys; packets for further keys are counted
    in one overflow summary per session. Memory is therefore bounded by ``max_keys`` plus the
    number of sessions, whatever the packet rate.

    The session lookup runs when a packet is added, so a tunnel IP reused by a later session
    is attributed to whoever held it at that moment.
    """

    def __init__(
        self,
        lookup: SessionLookup,
        *,
        window: float = DEFAULT_WINDOW,
        max_keys: int = DEFAULT_MAX_KEYS,
    ) -> None:
        if window <= 0:
            raise ValueError(f"window must be positive, not {window}")
        if max_keys < 1:
            raise ValueError(f"max_keys must be at least 1, not {max_keys}")
        self.lookup = lookup
        self.window = window
        self.max_keys = max_keys
        self._start: float | None = None
        self._buckets: dict[_Key, _Bucket] = {}
        self._overflow: dict[_Owner, _Bucket] = {}
        # Cumulative counters (for metrics).
        self.packets = 0
        self.events = 0
        self.overflow_packets = 0
        self.unattributed_packets = 0

    @property
    def deadline(self) -> float | None:
        """Packet time at which the open window ends (None: no window open)."""
        return None if self._start is None else self._start + self.window

    def add(self, pkt: DeniedPacket) -> list[DeniedEvent]:
        """Account one packet; returns the events of a window it closed (usually empty)."""
        out: list[DeniedEvent] = []
        if self._start is not None and self._expired(pkt.at):
            out = self._close()
        if self._start is None:
            self._start = pkt.at
        self.packets += 1
        owner = self.lookup(pkt.src)
        user, uid = owner if owner is not None else (None, None)
        if owner is None:
            self.unattributed_packets += 1
        key: _Key = (user, uid, pkt.src, pkt.dst, pkt.proto, pkt.dport)
        bucket = self._buckets.get(key)
        if bucket is None and len(self._buckets) >= self.max_keys:
            self.overflow_packets += 1
            bucket = self._overflow.get((user, uid))
            if bucket is None:
                bucket = self._overflow[(user, uid)] = _Bucket(pkt.at, pkt.src)
        elif bucket is None:
            bucket = self._buckets[key] = _Bucket(pkt.at, pkt.src)
        bucket.add(pkt.at, pkt.src)
        return out

    def flush(self, now: float) -> list[DeniedEvent]:
        """Close the open window if it has ended by ``now`` (Unix time); call periodically."""
        if self._start is None or not self._expired(now):
            return []
        return self._close()

    def drain(self) -> list[DeniedEvent]:
        """Close the open window now, whatever its age (shutdown)."""
        return self._close()

    def _expired(self, t: float) -> bool:
        assert self._start is not None
        return t >= self._start + self.window or t < self._start - self.window

    def _close(self) -> list[DeniedEvent]:
        events = [
            DeniedEvent(user, uid, src, dst, proto, dport, b.first_at, b.last_at, b.count)
            for (user, uid, src, dst, proto, dport), b in self._buckets.items()
        ]
        events.sort(
            key=lambda e: (e.first_at, str(e.user), str(e.dst), e.proto or "", e.dport or 0)
        )
        summaries = [
            DeniedEvent(user, uid, b.src, None, None, None, b.first_at, b.last_at, b.count, True)
            for (user, uid), b in self._overflow.items()
        ]
        summaries.sort(key=lambda e: (e.first_at, str(e.user)))
        self._start = None
        self._buckets = {}
        self._overflow = {}
        out = events + summaries
        self.events += len(out)
        return out
