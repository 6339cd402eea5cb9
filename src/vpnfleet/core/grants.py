"""What a group may reach: a grant is a network, a protocol and optionally a port range.
Pure: no I/O.

Grants are the firewall's unit of access: the desired state gives each group a tuple of them
(:mod:`vpnfleet.core.fwstate`), the renderer turns them into set elements
(:mod:`vpnfleet.core.fwrender`), and revocation compares them (:meth:`Grant.covers`,
:mod:`vpnfleet.core.revocation`). The access rules an administrator writes (a destination,
a protocol and a port list such as ``"22,8000-8100"``) become grants through
:func:`grants_of`, one per port range.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network
from typing import Literal, cast, get_args

from vpnfleet.core import netparse

Proto = Literal["tcp", "udp", "icmp", "any"]
PROTOS: frozenset[str] = frozenset(get_args(Proto))


def _is_int(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


@dataclass(frozen=True)
class Grant:
    """Access to ``network`` for ``proto``; ports only for tcp/udp (None = all ports).

    ``port_hi`` defaults to ``port_lo`` (a single port).
    """

    network: IPv4Network
    proto: Proto = "any"
    port_lo: int | None = None
    port_hi: int | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.network, IPv4Network):
            raise ValueError(f"grant network must be an IPv4Network, not {self.network!r}")
        if self.proto not in PROTOS:
            raise ValueError(f"grant protocol must be one of {sorted(PROTOS)}, not {self.proto!r}")
        if self.port_lo is None:
            if self.port_hi is not None:
                raise ValueError("grant has port_hi without port_lo")
            return
        if self.proto not in ("tcp", "udp"):
            raise ValueError(f"ports are only valid for tcp and udp grants, not {self.proto}")
        if self.port_hi is None:
            object.__setattr__(self, "port_hi", self.port_lo)
        lo, hi = self.port_lo, self.port_hi
        if not _is_int(lo) or not _is_int(hi):
            raise ValueError("grant ports must be integers")
        assert lo is not None and hi is not None
        if not 0 <= lo <= hi <= 65535:
            raise ValueError(f"invalid port range {lo}-{hi}: need 0 <= low <= high <= 65535")

    @property
    def all_ports(self) -> bool:
        """True when the grant does not restrict ports (None, or a range covering 1-65535)."""
        return self.port_lo is None or (
            self.port_lo <= 1 and self.port_hi is not None and self.port_hi == 65535
        )

    @property
    def port_count(self) -> int:
        """How many ports a hash:net,port set needs per network (0 when not port-based)."""
        if self.proto not in ("tcp", "udp") or self.all_ports:
            return 0
        assert self.port_lo is not None and self.port_hi is not None
        return self.port_hi - self.port_lo + 1

    def matches(self, proto: str, dst: IPv4Address, dport: int | None) -> bool:
        """Would a new flow (proto name, destination, destination port) be allowed?"""
        if dst not in self.network:
            return False
        if self.proto == "any":
            return True
        if proto != self.proto:
            return False
        if self.proto == "icmp" or self.all_ports:
            return True
        assert self.port_lo is not None and self.port_hi is not None
        return dport is not None and self.port_lo <= dport <= self.port_hi

    @functools.cached_property
    def span(self) -> tuple[int, int]:
        """First and last address of the network as integers.

        :meth:`covers` runs in revocation loops, where IPv4Network.subnet_of() would dominate.
        (cached_property writes the instance ``__dict__`` directly, so it works on a frozen
        dataclass and stays out of eq/hash.)
        """
        lo = int(self.network.network_address)
        return lo, lo | (0xFFFFFFFF >> self.network.prefixlen)

    def covers(self, other: Grant) -> bool:
        """True when every flow ``other`` allows is also allowed by this grant alone."""
        lo, hi = self.span
        other_lo, other_hi = other.span
        if not lo <= other_lo <= other_hi <= hi:
            return False
        if self.proto == "any":
            return True
        if other.proto != self.proto:
            return False
        if self.proto == "icmp" or self.all_ports:
            return True
        if other.all_ports:
            return False
        assert self.port_lo is not None and self.port_hi is not None
        assert other.port_lo is not None and other.port_hi is not None
        return self.port_lo <= other.port_lo and other.port_hi <= self.port_hi

    def sort_key(self) -> tuple[int, int, str, int, int]:
        """Deterministic ordering for rendering."""
        return (
            int(self.network.network_address),
            self.network.prefixlen,
            self.proto,
            -1 if self.port_lo is None else self.port_lo,
            -1 if self.port_hi is None else self.port_hi,
        )


def grants_of(destination: str, proto: str, ports: str | None) -> list[Grant]:
    """One access rule as grants, one per port range (``ports`` as :func:`netparse.parse_ports`
    reads it; None or empty: all ports).

    Raises ValueError for a destination that is not an IPv4 network, a bad port list, or a
    protocol/port combination a grant cannot hold.
    """
    net = IPv4Network(destination)
    ranges = netparse.parse_ports(ports)
    # Grant.__post_init__ checks the protocol name; the cast only tells the type checker.
    p = cast(Proto, proto)
    if not ranges:
        return [Grant(net, p)]
    return [Grant(net, p, r.lo, r.hi) for r in ranges]
