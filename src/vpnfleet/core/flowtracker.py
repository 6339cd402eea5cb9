"""NAT audit: conntrack events + "which session owns this tunnel IP" -> flow records, and an
index of the open flows for revocation. Pure: no I/O.

:class:`FlowTracker` emits a :class:`FlowRecord` when a flow starts (so it is attributed even
if its end is never seen) and when it ends (with bytes and end time). Both carry the same
``flow_id``; the receiver upserts on it, which makes at-least-once delivery idempotent.

Why the tracker attributes at NEW time: the tunnel IP may belong to somebody else by the time
the flow ends (disconnect, then the address is leased again). The owner at the start is the
one who opened the connection.

The tracker also knows, from the same events, which connections are open: the ones from a
tunnel address (it keeps a record of each) and the ones opened from outside towards a tunnel
address (gateway users are reachable back; it keeps only their tuple).
:meth:`FlowTracker.open_flows` lists both, so revocation can pick the entries to delete
without listing the kernel's table (:mod:`vpnfleet.core.revocation`); the list is complete
once a table dump has been read (:attr:`FlowTracker.synced`).
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import socket
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from json.encoder import encode_basestring_ascii as _json_str
from typing import Any, Literal, NamedTuple

from vpnfleet.core.flowevents import PROTO_NAMES, FlowEvent, FlowEventKind, FlowItem, Resync
from vpnfleet.core.revocation import Flow

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
# Protocols whose conntrack tuple ports are ports (ICMP's "source port" is its echo id).
_PORTED = frozenset((socket.IPPROTO_TCP, socket.IPPROTO_UDP))


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
    """Turns conntrack events into attributed :class:`FlowRecord` s, and knows which flows
    are open.

    ``networks``: the tunnel networks (events of other sources produce no record). ``lookup``:
    tunnel IP -> (user, session uid) of the session holding it now, or None; it is asked when a
    flow is first seen. ``max_flows`` bounds the open flows remembered; beyond it the oldest is
    forgotten (counted in ``evicted``). A forgotten flow already has its start record; its
    DESTROY then yields a complete record with the same ``flow_id`` (kernel start time), but
    attributed to whoever owns the tunnel IP at that moment, so keep ``max_flows`` at or
    above ``nf_conntrack_max`` (a tracked flow costs ~0.5 KB: the default is ~130 MB at
    worst). ``record_destination=False`` leaves destinations out of the records and out of
    memory (privacy).

    Flows opened from outside towards a tunnel address are remembered as tuples only (no
    record, no attribution; ``max_flows`` bounds them separately, oldest forgotten first), so
    :meth:`open_flows` can list them for revocation: a user who loses gateway mode must lose
    the connections made to them too.
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
        # Inbound flows (towards a tunnel address from elsewhere): key -> start, ms.
        self._inbound: OrderedDict[_FlowKey, int] = OrderedDict()
        # Resync bookkeeping, between Resync begin and end: when the dump began, the flows
        # it listed, and the flows that ended meanwhile (so a stale dump entry cannot revive
        # them).
        self._resync_begin_ms: int | None = None
        self._listed: set[_FlowKey] = set()
        self._ended_in_resync: set[_FlowKey] = set()
        self._is_tunnel: dict[str, bool] = {}
        self._synced = False

    def __len__(self) -> int:
        return len(self._flows)

    @property
    def inbound(self) -> int:
        """How many open flows towards a tunnel address from elsewhere are known (a gauge)."""
        return len(self._inbound)

    @property
    def synced(self) -> bool:
        """True once a table dump (Resync ``begin`` .. ``end``) has completed since the
        tracker was created: before that, flows opened earlier may be missing from
        :meth:`open_flows`."""
        return self._synced

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
         stop_ns, event_ns, p_out, b_out, p_in, b_in, at, from_dump) = item  # fmt: skip
        tunnel = self._is_tunnel.get(src)
        if tunnel is None:
            tunnel = self.is_tunnel(src)
        if not tunnel:
            self.counters.ignored += 1
            # Towards a tunnel address? One memoized lookup; the pod's own flows end here.
            inbound = self._is_tunnel.get(dst)
            if inbound is None:
                inbound = self.is_tunnel(dst)
            if inbound:
                self._inbound_event(
                    (ct_id, proto, src, sport, dst, dport),
                    kind is FlowEventKind.NEW,
                    from_dump,
                    start_ns if start_ns is not None else event_ns,
                    at,
                )
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

    def _inbound_event(
        self, key: _FlowKey, new: bool, from_dump: bool, ns: int | None, at: dt.datetime
    ) -> None:
        """The index side of :meth:`feed` for a flow towards a tunnel address: the same
        bookkeeping as for tracked flows (dump re-listing, DESTROY during a resync), no record.
        ``ns``: the kernel's start or event time, if it gave one."""
        inbound = self._inbound
        if not new:
            inbound.pop(key, None)
            if self._resync_begin_ms is not None and len(self._ended_in_resync) < self.max_flows:
                self._ended_in_resync.add(key)
            return
        if from_dump:
            self._listed.add(key)
            if key in self._ended_in_resync:
                return  # the dump snapshot predates this flow's DESTROY
        if key in inbound:
            return
        if len(inbound) >= self.max_flows:
            inbound.popitem(last=False)
        inbound[key] = ns // 1_000_000 if ns is not None else int(at.timestamp() * 1000)

    def _start_record(self, ev: FlowEvent) -> FlowRecord:
        owner = self.lookup(ev.orig_src)
        if owner is None:
            self.counters.unattributed += 1
            user = session = None
        else:
            user, session = owner
        # The kernel's start time (dumps, DESTROY), else its event time (NEW on Linux >= 6.14),
        # else when the listener read the event.
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

    def open_flows(self) -> list[Flow]:
        """Every open flow the tracker knows, as original-direction tuples: the ones from a
        tunnel address, then the ones from elsewhere towards a tunnel address.

        Complete only when :attr:`synced` (flows opened before the listener started are
        learned from the first dump) and as long as nothing was evicted (``max_flows``).
        Ports are given for TCP and UDP only, as :class:`~vpnfleet.core.revocation.Flow`
        expects. Costs one pass over the open flows: for revocation, not per event.
        """
        out: dict[tuple[int, str, int, str, int], Flow] = {}
        addrs: dict[str, ipaddress.IPv4Address] = {}
        for keys in (self._flows.keys(), self._inbound.keys()):
            for _, proto, src, sport, dst, dport in keys:
                tup = (proto, src, sport, dst, dport)
                if tup in out:
                    continue  # a stale entry (its DESTROY lost) under an older ct_id
                try:
                    s, d = _address(addrs, src), _address(addrs, dst)
                except ValueError:
                    continue  # not an IPv4 address as the kernel prints one
                ported = proto in _PORTED
                out[tup] = Flow(
                    proto=PROTO_NAMES.get(proto) or str(proto),
                    protonum=proto,
                    src=s,
                    dst=d,
                    sport=sport if ported else None,
                    dport=dport if ported else None,
                )
        return list(out.values())

    def end_all(self, at: dt.datetime) -> list[FlowRecord]:
        """End every open flow now (``end_inferred``): the pod is shutting down, its clients
        are gone, and nobody will be listening for these flows' DESTROY events. Inbound flows
        are forgotten too (they have no records)."""
        at_ms = int(at.timestamp() * 1000)
        out = [
            tuple.__new__(FlowRecord, (
                "end", *start[1:7], max(at_ms, start.start_ms), *start[8:14],
                None, None, None, None, True,
            ))
            for start in self._flows.values()
        ]  # fmt: skip
        self._flows.clear()
        self._inbound.clear()
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
        # Inbound flows the same way, silently: they have no records to end.
        inbound = self._inbound
        lost = [k for k, start_ms in inbound.items() if start_ms < begin_ms and k not in listed]
        for key in lost:
            del inbound[key]
        self._synced = True
        self.counters.inferred_ends += len(out)
        self.counters.records += len(out)
        return out


def _address(cache: dict[str, ipaddress.IPv4Address], text: str) -> ipaddress.IPv4Address:
    # Few distinct addresses among many flows: one object (and one parse) each.
    addr = cache.get(text)
    if addr is None:
        addr = cache[text] = ipaddress.IPv4Address(text)
    return addr
