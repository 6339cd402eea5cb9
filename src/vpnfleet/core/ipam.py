"""Address pool arithmetic: which tunnel addresses a pool may hand out.

The first usable address of every pool is the OpenVPN server's own tunnel address (the
clients' route gateway); the network and broadcast addresses are never handed out.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Iterator


class PoolExhausted(Exception):
    """Every address of the pool is in use."""


def server_address(pool: ipaddress.IPv4Network) -> ipaddress.IPv4Address:
    """The pod's own address inside a tunnel pool."""
    return pool.network_address + 1


def client_addresses(pool: ipaddress.IPv4Network) -> Iterator[ipaddress.IPv4Address]:
    """Every address a client may get, in order."""
    first = int(pool.network_address) + 2
    last = int(pool.broadcast_address) - 1
    for value in range(first, last + 1):
        yield ipaddress.IPv4Address(value)


def capacity(pool: ipaddress.IPv4Network) -> int:
    """How many clients the pool holds."""
    return max(0, pool.num_addresses - 3)


def allocate(
    pool: ipaddress.IPv4Network, used: Iterable[ipaddress.IPv4Address]
) -> ipaddress.IPv4Address:
    """The lowest free client address of `pool`, or PoolExhausted."""
    taken = set(used)
    for addr in client_addresses(pool):
        if addr not in taken:
            return addr
    raise PoolExhausted(f"address pool {pool} is exhausted ({capacity(pool)} addresses in use)")


def is_client_address(pool: ipaddress.IPv4Network, addr: ipaddress.IPv4Address) -> bool:
    """True if `addr` is one a client of `pool` may hold."""
    return addr in pool and addr not in (
        pool.network_address,
        pool.broadcast_address,
        server_address(pool),
    )
