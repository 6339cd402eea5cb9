"""Conntrack flow events as the agent sees them: one NEW or DESTROY of a conntrack entry,
and the markers around a table dump. Pure: no I/O.

The decoder (:mod:`vpnfleet.core.ctnetlink`) produces them from the kernel's messages, the
listener (:mod:`vpnfleet.agent.conntrack`) streams them, and the tracker
(:mod:`vpnfleet.core.flowtracker`) turns them into attributed flow records. They are the
contract between those three, so they live apart from each of them.
"""

from __future__ import annotations

import datetime as dt
import enum
import socket
from dataclasses import dataclass
from typing import Any, Literal, NamedTuple


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
