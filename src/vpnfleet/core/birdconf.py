"""The pod's BGP settings and the BIRD 2 configuration they become. Pure.

The agent writes two files for its BIRD (``agent/bird.py``): the main configuration, rendered
once from :class:`BgpConfig` (router id, the pod's AS, one BGP session per neighbour), and the
routes include, rewritten whenever the announcement set changes (:func:`render_routes`). BIRD
reads both at start and again on ``configure``; the static protocol then announces and
withdraws only the routes that changed.

Choices (docs/bgp.md):

- Only the routes of the ``vpnfleet_gw`` static protocol are exported, nothing is imported:
  the pod's own kernel already routes the gateway pool into the tunnel.
- Graceful restart is off: a router must not keep a dead pod's routes as "stale" for minutes;
  the hold timer (short, configurable) bounds how long they outlive the pod.
- ``multihop``: in a cluster the routers are rarely on the pod's own link.
- Connect retries every 5 s, so a pod that starts before its router, or loses it, is back
  within seconds (BIRD's default waits 120 s).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from vpnfleet.core.bgpplan import Announcement

STATIC_PROTOCOL = "vpnfleet_gw"
MIN_HOLD_TIME = 3  # RFC 4271: 0 or at least 3 seconds; 0 (no keepalives) is refused here
MAX_HOLD_TIME = 65535
DEFAULT_HOLD_TIME = 9
CONNECT_RETRY = 5
_AS_TRANS = 23456  # RFC 6793's placeholder, never a real AS


@dataclass(frozen=True)
class Neighbor:
    """A BGP peer: the router's address and AS number."""

    address: ipaddress.IPv4Address
    asn: int

    @classmethod
    def parse(cls, text: str) -> Neighbor:
        """``ADDRESS:ASN`` (e.g. ``10.0.0.1:64512``); ValueError with a clear sentence."""
        addr, sep, asn = text.strip().rpartition(":")
        if not sep:
            raise ValueError(f"BGP neighbor {text!r} must be ADDRESS:ASN, e.g. 10.0.0.1:64512")
        try:
            address = ipaddress.IPv4Address(addr)
        except ValueError:
            raise ValueError(
                f"BGP neighbor {text!r}: {addr!r} is not an IPv4 address (ADDRESS:ASN)"
            ) from None
        return cls(address, parse_asn(asn, f"BGP neighbor {text!r}"))


def parse_asn(text: str | int, what: str = "BGP AS number") -> int:
    """A 4-byte AS number (1 to 4294967295, not 23456)."""
    try:
        asn = int(str(text).strip().removeprefix("AS").removeprefix("as"))
    except ValueError:
        raise ValueError(f"{what}: AS number {text!r} is not a whole number") from None
    if not 1 <= asn <= 2**32 - 1 or asn == _AS_TRANS:
        raise ValueError(f"{what}: AS number {asn} is out of range (1-4294967295, not 23456)")
    return asn


@dataclass(frozen=True)
class BgpConfig:
    """What the pod's BGP speaker needs: validated, ready to render."""

    asn: int
    router_id: ipaddress.IPv4Address
    neighbors: tuple[Neighbor, ...]
    hold_time: int = DEFAULT_HOLD_TIME

    @classmethod
    def build(
        cls,
        *,
        asn: str | int | None,
        router_id: str | None,
        pod_ip: str | None,
        neighbors: Sequence[str],
        hold_time: str | int | float | None = None,
    ) -> BgpConfig:
        """From the agent's options; every problem is one ValueError sentence naming the option."""
        if asn is None or str(asn).strip() == "":
            raise ValueError("BGP needs this pod's AS number: give --bgp-asn or VPNFLEET_BGP_ASN")
        local = parse_asn(asn, "--bgp-asn")
        rid_text = router_id or pod_ip
        if not rid_text:
            raise ValueError(
                "BGP needs a router id: give --bgp-router-id (or --pod-ip, its default)"
            )
        try:
            rid = ipaddress.IPv4Address(rid_text)
        except ValueError:
            raise ValueError(f"BGP router id {rid_text!r} is not an IPv4 address") from None
        if not neighbors:
            raise ValueError(
                "BGP needs at least one neighbor: give --bgp-neighbor ADDRESS:ASN "
                "(or VPNFLEET_BGP_NEIGHBORS, comma-separated)"
            )
        peers = tuple(Neighbor.parse(n) for n in neighbors)
        seen: set[ipaddress.IPv4Address] = set()
        for peer in peers:
            if peer.address in seen:
                raise ValueError(f"BGP neighbor {peer.address} is given twice")
            seen.add(peer.address)
        hold = DEFAULT_HOLD_TIME
        if hold_time is not None and str(hold_time).strip() != "":
            try:
                hold = int(str(hold_time).strip())
            except ValueError:
                raise ValueError(
                    f"BGP hold time {hold_time!r} must be a whole number of seconds"
                ) from None
        if not MIN_HOLD_TIME <= hold <= MAX_HOLD_TIME:
            raise ValueError(
                f"BGP hold time must be between {MIN_HOLD_TIME} and {MAX_HOLD_TIME} seconds, "
                f"got {hold}"
            )
        return cls(local, rid, peers, hold)

    @property
    def keepalive_time(self) -> int:
        """A third of the hold time, as RFC 4271 suggests (at least 1 s)."""
        return max(1, self.hold_time // 3)


def render_config(config: BgpConfig, routes_file: Path) -> str:
    """BIRD's main configuration for this pod; ``routes_file`` holds the announced routes."""
    lines = [
        "# Written by the vpnfleet agent at every start; edits are lost. See docs/bgp.md.",
        "log stderr { info, remote, warning, error, auth, fatal, bug };",
        f"router id {config.router_id};",
        "",
        "protocol device {",
        "}",
        "",
        f"protocol static {STATIC_PROTOCOL} {{",
        "  ipv4;",
        f'  include "{routes_file}";',
        "}",
    ]
    for i, peer in enumerate(config.neighbors, start=1):
        lines += [
            "",
            f"protocol bgp peer{i} {{",
            f'  description "{peer.address} AS{peer.asn}";',
            f"  local as {config.asn};",
            f"  neighbor {peer.address} as {peer.asn};",
            "  multihop;",
            f"  hold time {config.hold_time};",
            f"  keepalive time {config.keepalive_time};",
            "  connect delay time 1;",
            f"  connect retry time {CONNECT_RETRY};",
            "  error wait time 1, 30;",
            "  graceful restart off;",
            "  ipv4 {",
            "    import none;",
            f'    export where proto = "{STATIC_PROTOCOL}";',
            "  };",
            "}",
        ]
    return "\n".join(lines) + "\n"


def render_routes(routes: Iterable[Announcement]) -> str:
    """The static protocol's routes: one blackhole /32 per announcement, with its MED.

    Blackhole only inside BIRD (no kernel protocol exports it): BGP sends the route with the
    pod's address as next hop, and the pod's kernel delivers into the tunnel."""
    out = ["# Written by the vpnfleet agent: the gateway users this pod announces."]
    for route in sorted(routes):
        out.append(f"route {route.prefix} blackhole {{ bgp_med = {route.med}; }};")
    return "\n".join(out) + "\n"
