"""What this pod announces over BGP: one /32 per gateway-mode user it hosts. Pure.

Gateway-mode users keep one address from the cluster's gateway pool wherever they connect, so
the network must learn which pod holds each one. Every pod announces the /32 of each of its
live gateway sessions to the company's routers (through BIRD, ``agent/bird.py``); the router
forwards traffic for that address to the announcing pod.

The announcement set is computed from the session book and the fleet view
(:func:`announcements`) and moved to by a diff (:func:`plan`), so what the speaker is told is
exactly what changed: a new session is an *add*, a disconnect, kick or drain a *withdraw*.

When the same user reconnects to another pod, two pods may announce the same /32 for a moment
(the old pod withdraws once it learns its session was replaced, or, if it died, when the
router's hold timer expires). The MED says which is newer: it falls as the session's start
time rises (:func:`recency_med`), and routers prefer the lowest MED among routes from the same
neighbouring AS, which all pods share. So the route follows the newest session at once.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from vpnfleet.core.sessionbook import Client

# MED is a 32-bit number; seconds since 2024 keep it decreasing with time until 2160.
_MED_EPOCH = dt.datetime(2024, 1, 1, tzinfo=dt.UTC)
MED_MAX = 2**32 - 1


@dataclass(frozen=True, order=True)
class Announcement:
    """One announced route: ``prefix`` (a /32 in the gateway pool) with its ``med``."""

    prefix: ipaddress.IPv4Network
    med: int


@dataclass(frozen=True)
class AnnouncementDiff:
    """What to tell the speaker: routes to (re)announce and prefixes to withdraw.

    A route whose MED changed is in ``add`` (announcing it again replaces it)."""

    add: tuple[Announcement, ...] = ()
    withdraw: tuple[ipaddress.IPv4Network, ...] = ()

    def __bool__(self) -> bool:
        return bool(self.add or self.withdraw)


Announced = Mapping[ipaddress.IPv4Network, Announcement]


def recency_med(connected_at: str) -> int:
    """The MED for a session that started at ``connected_at`` (ISO 8601): lower is newer.

    Unparseable or naive times get the highest MED (the least preferred), never an error:
    a route is still announced."""
    try:
        started = dt.datetime.fromisoformat(connected_at.replace("Z", "+00:00"))
    except ValueError:
        return MED_MAX
    if started.tzinfo is None:
        return MED_MAX
    seconds = int((started - _MED_EPOCH).total_seconds())
    return max(0, min(MED_MAX, MED_MAX - seconds))


def announcements(
    clients: Iterable[Client],
    gateway_pool: ipaddress.IPv4Network | None,
    killed: Iterable[str] = (),
) -> dict[ipaddress.IPv4Network, Announcement]:
    """The routes this pod should announce now.

    Only established gateway-mode clients that the agent has not kicked and whose session the
    control plane has not marked to end (``killed``: session uids, e.g. replaced by a newer
    connection elsewhere), and only addresses inside this pod's gateway pool: whatever a
    client record might say, a router must never learn anything else from a pod.
    """
    if gateway_pool is None:
        return {}
    ended = set(killed)
    out: dict[ipaddress.IPv4Network, Announcement] = {}
    for client in clients:
        if client.mode != "gateway" or not client.established or client.kicked is not None:
            continue
        if client.uid in ended:
            continue
        try:
            addr = ipaddress.IPv4Address(client.tunnel_ip)
        except ValueError:
            continue
        if addr not in gateway_pool:
            continue
        prefix = ipaddress.IPv4Network(f"{addr}/32")
        route = Announcement(prefix, recency_med(client.connected_at))
        # Two records of one address (an adopted duplicate): the newest session wins.
        if prefix not in out or route.med < out[prefix].med:
            out[prefix] = route
    return out


def plan(old: Announced, new: Announced) -> AnnouncementDiff:
    """The diff that takes the speaker from ``old`` to ``new``."""
    add = tuple(sorted(r for p, r in new.items() if old.get(p) != r))
    withdraw = tuple(sorted(p for p in old if p not in new))
    return AnnouncementDiff(add, withdraw)


def apply(old: Announced, diff: AnnouncementDiff) -> dict[ipaddress.IPv4Network, Announcement]:
    """``old`` with ``diff`` carried out (``apply(old, plan(old, new)) == new``)."""
    out = dict(old)
    for prefix in diff.withdraw:
        out.pop(prefix, None)
    for route in diff.add:
        out[route.prefix] = route
    return out
