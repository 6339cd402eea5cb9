"""The pod's own IPv4 address, when the pod spec does not give it (``VPNFLEET_POD_IP``).

Gateway routes (``TUNNEL_IP/32 via POD_IP``, static or over BGP) and the BGP router id need the
address the pod is reached at. Kubernetes hands it over with ``fieldRef: status.podIP``; other
runtimes (podman, plain containers, a VM) do not, and then the agent reads it from its own
network namespace, in this order:

1. ``--uplink`` given: the first global IPv4 address of that interface;
2. otherwise the source address the kernel picks for the default route (a route lookup,
   no packet is sent).

Netlink is read through pyroute2. Nothing found is not an error here: the caller decides
(a pod without an address simply gets no gateway routes; BGP refuses to start).

:func:`leaving_elsewhere` uses the same route lookup to check the uplink against the routes
pushed to clients: NAT only masquerades what leaves through the uplink, so a pushed network the
kernel reaches through another interface would leave with the client's tunnel address, and its
answers would never come back.
"""

from __future__ import annotations

import ipaddress
import socket
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pyroute2 import IPRoute

# Any address outside the pod's own networks: the kernel answers with the route a packet to
# the wider network would take (TEST-NET-2, RFC 5737: never a real destination).
PROBE_DESTINATION = "198.51.100.1"
RTN_UNICAST = 1  # a route through a gateway or a link (not local, blackhole, ...)


@dataclass(frozen=True)
class Found:
    address: str
    source: str  # how it was found, for the start-up log line


def discover(uplink: str | None) -> Found | None:
    """The pod's IPv4 address, or None when this network namespace has none to offer."""
    try:
        return _discover(uplink)
    except OSError:  # no netlink here: the pod runs without an address, as before
        return None


def _discover(uplink: str | None) -> Found | None:
    from pyroute2 import IPRoute, NetlinkError

    with IPRoute() as ipr:
        if uplink:
            indexes = ipr.link_lookup(ifname=uplink)
            if not indexes:
                return None
            for msg in ipr.get_addr(index=indexes[0], family=socket.AF_INET):
                addr = msg.get_attr("IFA_ADDRESS")
                if addr and _usable(addr) and msg["scope"] == 0:  # RT_SCOPE_UNIVERSE
                    return Found(addr, f"the address of the uplink {uplink}")
            return None
        try:
            routes = ipr.route("get", dst=PROBE_DESTINATION)
        except NetlinkError:  # ENETUNREACH: no default route
            return None
        for msg in routes:
            src = msg.get_attr("RTA_PREFSRC")
            if src and _usable(src):
                dev = _out_interface(ipr, msg) or "?"
                return Found(src, f"the source address of the default route (dev {dev})")
    return None


def _out_interface(ipr: IPRoute, route: Any) -> str | None:
    """The name of the interface a route lookup's answer leaves through, if it names one."""
    oif = route.get_attr("RTA_OIF")
    links = ipr.get_links(oif) if oif else []
    return str(links[0].get_attr("IFLA_IFNAME")) if links else None


def _usable(text: str) -> bool:
    addr = ipaddress.IPv4Address(text)
    return not (addr.is_loopback or addr.is_link_local or addr.is_unspecified)


def leaving_elsewhere(uplink: str, networks: list[str]) -> list[tuple[str, str]]:
    """The pushed networks the kernel reaches through another interface than `uplink`, each
    with that interface's name. Networks it has no route to, or a namespace without netlink,
    say nothing."""
    from pyroute2 import NetlinkError

    try:
        return _leaving_elsewhere(uplink, networks)
    except (OSError, NetlinkError):  # no netlink, or an interface gone meanwhile: no opinion
        return []


def _leaving_elsewhere(uplink: str, networks: list[str]) -> list[tuple[str, str]]:
    from pyroute2 import IPRoute, NetlinkError

    out: list[tuple[str, str]] = []
    with IPRoute() as ipr:
        for text in networks:
            net = ipaddress.ip_network(text, strict=False)
            if net.version != 4:
                continue
            # A host inside the network (its first one; the address itself for a /32).
            probe = str(net.network_address + 1 if net.num_addresses > 2 else net[0])
            try:
                routes = ipr.route("get", dst=probe)
            except NetlinkError:  # no route at all: nothing to compare
                continue
            for msg in routes:
                if msg["type"] != RTN_UNICAST:  # e.g. one of the pod's own addresses (local)
                    break
                dev = _out_interface(ipr, msg)
                if dev and dev != uplink:
                    out.append((text, dev))
                break
    return out
