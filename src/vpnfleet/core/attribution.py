"""Reverse lookup of NAT flows: which flow, hence which user, was POD_IP:PORT at time T.

Pure decision logic; the queries that fetch the flows live in
:mod:`vpnfleet.controlplane.reverse_lookup`.

A backend saw a connection from the pod's address and port at some instant inside
``[at, at + window]`` (``window`` covers log times with whole seconds). A flow *covers* that
when it started no later than ``at + window`` and was still alive at ``at``:

- its end is known and not before ``at``; or
- its end is unknown (the flow is open, or its end record is still on the way) and its
  session has not ended before ``at``, and no later flow with the same destination reused
  the address and port before ``at`` (the kernel cannot hand out the same NAT tuple twice at
  once, so the earlier flow had ended by then).

The same NAT address and port *can* be in use by two flows at once towards different
destinations (Linux only keeps the whole 5-tuple unique): then two flows cover the time and
the answer is ambiguous unless the destination the backend listens on is given.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

Status = Literal["match", "ambiguous", "no_match", "expired"]
PROTOCOLS = ("tcp", "udp", "icmp")
MAX_WINDOW = dt.timedelta(hours=1)

# Flows are stored with a lifetime class: class c lived at most CLASS_BOUNDS[c]; LONG_CLASS
# lived longer; OPEN_CLASS has no end yet. A flow of a bounded class covering T started no
# earlier than T minus its bound, so the lookup reads a bounded slice of the index per class
# however often the port was reused before. (Interval "stabbing" with B-trees only.)
CLASS_BOUNDS = (dt.timedelta(minutes=1), dt.timedelta(hours=1), dt.timedelta(days=1))
LONG_CLASS = len(CLASS_BOUNDS)
OPEN_CLASS = LONG_CLASS + 1


_BOUNDS_MS = tuple(int(b.total_seconds() * 1000) for b in CLASS_BOUNDS)


def duration_class(start: dt.datetime, end: dt.datetime | None) -> int:
    """The lifetime class of a flow (see CLASS_BOUNDS)."""
    if end is None:
        return OPEN_CLASS
    return duration_class_ms(0, (end - start) // dt.timedelta(milliseconds=1))


def duration_class_ms(start_ms: int, end_ms: int | None) -> int:
    """:func:`duration_class` on epoch milliseconds (what agents send)."""
    if end_ms is None:
        return OPEN_CLASS
    life = end_ms - start_ms
    for c, bound in enumerate(_BOUNDS_MS):
        if life <= bound:
            return c
    return LONG_CLASS


@dataclass(frozen=True)
class Query:
    """One question: who was ``ip:port`` (``proto``) at ``at`` (give or take ``window``)."""

    ip: str
    port: int
    proto: str
    at: dt.datetime
    window: dt.timedelta = dt.timedelta(0)
    dst_ip: str | None = None
    dst_port: int | None = None

    @property
    def latest(self) -> dt.datetime:
        """The end of the instant range the backend's time stands for."""
        return self.at + self.window

    def describe(self) -> str:
        """`10.0.0.1:40000/tcp at 2026-11-26T15:04:05Z` (the way messages name a query)."""
        return f"{self.ip}:{self.port}/{self.proto} at {iso(self.at)}"


@dataclass(frozen=True)
class FlowSpan:
    """What the decision needs to know about one stored flow."""

    row_id: int
    start: dt.datetime
    end: dt.datetime | None
    user: str | None
    dst_ip: str | None
    dst_port: int | None
    session_end: dt.datetime | None = None
    reused_at: dt.datetime | None = None  # next same-tuple flow's start (implies this one ended)

    def known_end(self) -> dt.datetime | None:
        """The latest moment the flow can have been alive, or None if it may still be."""
        if self.end is not None:
            return self.end
        ends = [e for e in (self.session_end, self.reused_at) if e is not None]
        return min(ends) if ends else None

    def covers(self, q: Query) -> bool:
        """Was this flow alive at some instant of ``[q.at, q.latest]``?"""
        if self.start > q.latest:
            return False
        end = self.known_end()
        return end is None or end >= q.at

    def distance(self, q: Query) -> dt.timedelta:
        """How far the flow's lifetime is from the query's instant range (zero if it covers)."""
        if self.start > q.latest:
            return self.start - q.latest
        end = self.known_end()
        if end is None or end >= q.at:
            return dt.timedelta(0)
        return q.at - end


@dataclass
class Decision:
    """The outcome: the covering flows (one for a match) or the nearest candidates."""

    status: Status
    matches: list[FlowSpan] = field(default_factory=list)
    candidates: list[tuple[FlowSpan, dt.timedelta]] = field(default_factory=list)

    @property
    def users(self) -> list[str | None]:
        """Distinct owners of the covering flows, in order (None: nobody owned the address)."""
        seen: list[str | None] = []
        for f in self.matches:
            if f.user not in seen:
                seen.append(f.user)
        return seen


def decide(
    q: Query,
    covering: Sequence[FlowSpan],
    nearby: Sequence[FlowSpan] = (),
    *,
    horizon: dt.datetime | None = None,
    max_candidates: int = 5,
) -> Decision:
    """Pick the flow(s) covering the query; else name the nearest flows in time.

    ``covering`` are flows the database found alive around ``q.at`` (re-checked here: an open
    flow may be ruled out by its session's end or a later reuse). ``nearby`` are other flows of
    the same address, port and protocol close in time. ``horizon``: flows that started before
    it were deleted by retention, so an empty answer for an earlier time is "expired", not
    "nobody".
    """
    matches = sorted((f for f in covering if f.covers(q)), key=lambda f: f.start, reverse=True)
    if len(matches) == 1:
        return Decision("match", matches)
    if matches:
        return Decision("ambiguous", matches)
    if horizon is not None and q.at < horizon:
        return Decision("expired")
    pool = {f.row_id: f for f in (*covering, *nearby)}
    ranked = sorted(pool.values(), key=lambda f: (f.distance(q), f.start))
    return Decision("no_match", candidates=[(f, f.distance(q)) for f in ranked[:max_candidates]])


def iso(value: dt.datetime) -> str:
    """UTC ISO 8601 with a Z and milliseconds only when they are not zero."""
    utc = value.astimezone(dt.UTC)
    text = utc.strftime("%Y-%m-%dT%H:%M:%S")
    if utc.microsecond:
        text += f".{utc.microsecond // 1000:03d}"
    return text + "Z"


def human_duration(delta: dt.timedelta) -> str:
    """`850 ms`, `4.2 s`, `3 min 20 s`, `2 h 5 min`, `3 d 4 h`: a distance people can read."""
    seconds = delta.total_seconds()
    if seconds < 1:
        return f"{round(seconds * 1000)} ms"
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, sec = divmod(int(seconds), 60)
    if minutes < 60:
        return f"{minutes} min {sec} s"
    hours, minutes = divmod(minutes, 60)
    if hours < 48:
        return f"{hours} h {minutes} min"
    days, hours = divmod(hours, 24)
    return f"{days} d {hours} h"


def parse_query(
    ip: str,
    port: int,
    proto: str,
    at: dt.datetime,
    window: float = 0.0,
    dst: str | None = None,
) -> Query:
    """Validate the parts of a lookup; raises ValueError with one sentence a user can act on."""
    try:
        address = ipaddress.ip_address(ip.strip())
    except ValueError:
        raise ValueError(f"ip {ip!r} is not an IP address") from None
    if not isinstance(address, ipaddress.IPv4Address):
        raise ValueError(f"ip {ip!r} is IPv6; pods NAT to IPv4 addresses only")
    if not 1 <= port <= 65535:
        raise ValueError(f"port {port} is out of range 1-65535")
    name = proto.strip().lower()
    if name not in PROTOCOLS:
        raise ValueError(f"proto {proto!r} is not one of tcp, udp, icmp")
    if at.tzinfo is None:
        raise ValueError("at needs a time zone, e.g. 2026-11-26T15:04:05Z")
    if not 0 <= window <= MAX_WINDOW.total_seconds():
        raise ValueError(f"window {window} must be between 0 and 3600 seconds")
    dst_ip, dst_port = parse_dst(dst) if dst else (None, None)
    return Query(
        str(address), port, name, at.astimezone(dt.UTC), dt.timedelta(seconds=window),
        dst_ip, dst_port,
    )  # fmt: skip


def parse_dst(text: str) -> tuple[str, int | None]:
    """`10.20.0.5` or `10.20.0.5:443`: the destination a backend listens on."""
    host, sep, port_text = text.strip().rpartition(":")
    if not sep:
        host, port_text = text.strip(), ""
    try:
        address = ipaddress.IPv4Address(host)
    except ValueError:
        raise ValueError(f"dst {text!r} is not IPv4 or IPv4:PORT") from None
    if not port_text:
        return str(address), None
    if not port_text.isdigit() or not 1 <= int(port_text) <= 65535:
        raise ValueError(f"dst {text!r} has a port outside 1-65535")
    return str(address), int(port_text)
