"""Parsing and validation of the names, destinations, protocols and ports admins type.

Everything here is pure and raises `ValueError` with one sentence a user can act on.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from typing import Literal

Protocol = Literal["tcp", "udp", "icmp", "any"]
PROTOCOLS: tuple[Protocol, ...] = ("tcp", "udp", "icmp", "any")
Mode = Literal["nat", "gateway"]
MODES: tuple[Mode, ...] = ("nat", "gateway")

# User and group names become certificate CNs, ipset comments and file names: keep them tame.
_NAME_RE = re.compile(r"^[a-z0-9](?:[a-z0-9._-]{0,62}[a-z0-9])?$")


def validate_name(name: str, what: str = "name") -> str:
    """Return `name` if it is a valid user/group/pod name, else raise ValueError."""
    if not isinstance(name, str) or not _NAME_RE.fullmatch(name):
        raise ValueError(
            f"invalid {what} {name!r}: use 1-64 lowercase letters, digits, '.', '_' or '-', "
            "starting and ending with a letter or digit"
        )
    return name


def validate_email(text: str) -> str:
    """Return `text` if it looks like an email address (one rule for the API and policy files)."""
    local, at, domain = text.partition("@")
    if not at or not local or "." not in domain or " " in text or len(text) > 254:
        raise ValueError(f"{text!r} is not an email address")
    return text


def parse_destination(text: str) -> ipaddress.IPv4Network:
    """Parse a destination: an IPv4 host (`10.0.0.5`) or network (`10.0.0.0/24`).

    Host bits set in a network (`10.0.0.5/24`) are an error, not silently masked: the admin
    probably meant something else.
    """
    if not isinstance(text, str) or not text.strip():
        raise ValueError("destination is empty: give an IPv4 address or CIDR like 10.0.0.0/24")
    raw = text.strip()
    try:
        net = ipaddress.ip_network(raw, strict=True)
    except ValueError as exc:
        if "has host bits set" in str(exc):
            fixed = ipaddress.ip_network(raw, strict=False)
            raise ValueError(
                f"destination {raw!r} has host bits set; did you mean {fixed}?"
            ) from None
        raise ValueError(
            f"destination {raw!r} is not an IPv4 address or CIDR (example: 10.0.0.0/24)"
        ) from None
    if not isinstance(net, ipaddress.IPv4Network):
        raise ValueError(f"destination {raw!r} is IPv6; only IPv4 is supported")
    return net


def parse_pool_cidr(text: str, min_prefix: int = 8, max_prefix: int = 29) -> ipaddress.IPv4Network:
    """Parse an address pool CIDR, which must leave room for a gateway and clients."""
    net = parse_destination(text)
    if not (min_prefix <= net.prefixlen <= max_prefix):
        raise ValueError(
            f"pool {net} must have a prefix length between /{min_prefix} and /{max_prefix}"
        )
    return net


def parse_protocol(text: str) -> Protocol:
    """Parse a protocol name: tcp, udp, icmp or any."""
    value = text.strip().lower() if isinstance(text, str) else ""
    if value not in PROTOCOLS:
        raise ValueError(f"unknown protocol {text!r}: use one of {', '.join(PROTOCOLS)}")
    return value


def parse_mode(text: str) -> Mode:
    """Parse a user mode: nat or gateway."""
    value = text.strip().lower() if isinstance(text, str) else ""
    if value not in MODES:
        raise ValueError(f"unknown mode {text!r}: use 'nat' or 'gateway'")
    return value


@dataclass(frozen=True, order=True)
class PortRange:
    """An inclusive port range; a single port has lo == hi."""

    lo: int
    hi: int

    def __str__(self) -> str:
        return str(self.lo) if self.lo == self.hi else f"{self.lo}-{self.hi}"


def _port(text: str, spec: str) -> int:
    if not text.isdigit():
        raise ValueError(f"port {text!r} in {spec!r} is not a number")
    value = int(text)
    if not 1 <= value <= 65535:
        raise ValueError(f"port {value} in {spec!r} is out of range 1-65535")
    return value


def parse_ports(spec: str | None) -> tuple[PortRange, ...]:
    """Parse `80,443,8000-8100` into sorted, merged ranges. Empty or None means all ports."""
    if spec is None or not spec.strip():
        return ()
    ranges: list[PortRange] = []
    for part in spec.split(","):
        item = part.strip()
        if not item:
            raise ValueError(f"empty entry in port list {spec!r}")
        if "-" in item:
            lo_s, _, hi_s = item.partition("-")
            lo, hi = _port(lo_s.strip(), spec), _port(hi_s.strip(), spec)
            if lo > hi:
                raise ValueError(f"port range {item!r} is reversed; write {hi}-{lo}")
        else:
            lo = hi = _port(item, spec)
        ranges.append(PortRange(lo, hi))
    ranges.sort()
    merged: list[PortRange] = [ranges[0]]
    for r in ranges[1:]:
        last = merged[-1]
        if r.lo <= last.hi + 1:
            merged[-1] = PortRange(last.lo, max(last.hi, r.hi))
        else:
            merged.append(r)
    return tuple(merged)


def format_ports(ranges: tuple[PortRange, ...]) -> str | None:
    """The canonical text form of parsed ports (None = all ports)."""
    return ",".join(str(r) for r in ranges) if ranges else None


def check_ports_for_protocol(proto: Protocol, ranges: tuple[PortRange, ...]) -> None:
    """Ports only make sense for tcp and udp."""
    if ranges and proto not in ("tcp", "udp"):
        raise ValueError(f"ports can only be given for tcp or udp, not {proto}")


def parse_endpoint(text: str, default_port: int = 1194) -> tuple[str, int]:
    """Parse `HOST[:PORT]` (a public endpoint clients connect to)."""
    raw = text.strip() if isinstance(text, str) else ""
    if not raw:
        raise ValueError("endpoint is empty: give HOST or HOST:PORT")
    host, sep, port_s = raw.rpartition(":")
    if not sep:
        host, port_s = raw, str(default_port)
    if not host or not re.fullmatch(r"[A-Za-z0-9.-]{1,253}", host):
        raise ValueError(f"endpoint {raw!r} has an invalid host name")
    return host, _port(port_s, raw)


def parse_listen(text: str) -> tuple[str, int]:
    """Parse `HOST:PORT` for a listening socket."""
    host, sep, port_s = text.rpartition(":")
    if not sep or not host:
        raise ValueError(f"listen address {text!r} must be HOST:PORT, e.g. 127.0.0.1:8000")
    return host, _port(port_s, text)
