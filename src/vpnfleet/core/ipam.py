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


def server_pools(pool: ipaddress.IPv4Network, servers: int) -> list[ipaddress.IPv4Network]:
    """The pod's NAT pool split between its OpenVPN servers (one per protocol), in order.

    Each server has its own tunnel device, and the kernel routes a tunnel address into the
    device whose subnet holds it: two servers on one subnet would hand out the same address
    twice and could not both be routed to. With one server the pool is used whole; with two,
    each gets one half (its first address is that server's own, the clients' gateway).
    """
    if servers == 1:
        return [pool]
    if servers != 2:
        raise ValueError(f"a pod runs one or two OpenVPN servers, not {servers}")
    if pool.prefixlen > 29:
        raise ValueError(
            f"NAT pool {pool} is too small to split between UDP and TCP (/29 at least)"
        )
    return list(pool.subnets(prefixlen_diff=1))


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


class AddressAllocator:
    """Hands out a pool's client addresses in O(1) amortised time.

    Used for the pod's NAT pool, whose addresses only need to be unique on this pod. A
    rotating cursor means a just-released address is not reused at once, which keeps
    attribution of late conntrack events unambiguous.
    """

    def __init__(self, pool: ipaddress.IPv4Network) -> None:
        self.pool = pool
        self._first = int(pool.network_address) + 2
        self._last = int(pool.broadcast_address) - 1
        self._cursor = self._first
        self._used: set[int] = set()

    def __len__(self) -> int:
        return len(self._used)

    def allocate(self) -> ipaddress.IPv4Address:
        """The next free address after the cursor, or PoolExhausted."""
        size = self._last - self._first + 1
        if len(self._used) >= size:
            raise PoolExhausted(f"address pool {self.pool} is exhausted ({size} addresses in use)")
        while True:
            value = self._cursor
            self._cursor = self._first if value >= self._last else value + 1
            if value not in self._used:
                self._used.add(value)
                return ipaddress.IPv4Address(value)

    def reserve(self, addr: ipaddress.IPv4Address) -> bool:
        """Mark `addr` used (adopting a client after a restart); False if outside the pool."""
        if not is_client_address(self.pool, addr):
            return False
        self._used.add(int(addr))
        return True

    def release(self, addr: ipaddress.IPv4Address) -> None:
        self._used.discard(int(addr))

    def in_use(self, addr: ipaddress.IPv4Address) -> bool:
        return int(addr) in self._used
