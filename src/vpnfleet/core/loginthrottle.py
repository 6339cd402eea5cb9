"""Rate limits of console sign-ins: failures counted per account name and per address.

After ``PER_NAME`` failures for one name from one address within ``WINDOW``, or ``PER_ADDRESS``
failures from one address for any names, further attempts from there are refused (429) until
the oldest failure leaves the window; they cost no password check. A success clears that
name's count for that address. An attempt counts as failed from before its password is
checked, so concurrent guesses cannot slip through together; IPv6 clients are counted by /64.
Kept in memory of each replica: with R replicas behind a load balancer a guesser gets at most
R times the budget, still a handful of guesses a minute against passwords of 12+ characters
(docs/console.md).
"""

from __future__ import annotations

import ipaddress
import time
from collections import deque
from collections.abc import Callable

WINDOW = 300.0
PER_NAME = 5
PER_ADDRESS = 20
MAX_KEYS = 100_000  # bounded memory under a spray of names: oldest keys go first


class LoginThrottle:
    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._fails: dict[tuple[str, str], deque[float]] = {}

    def _recent(self, key: tuple[str, str], now: float) -> deque[float]:
        times = self._fails.get(key)
        if times is None:
            return deque()
        while times and times[0] <= now - WINDOW:
            times.popleft()
        if not times:
            del self._fails[key]
        return times

    def wait(self, name: str, address: str) -> float:
        """Seconds until ``address`` may try ``name`` again (0: now)."""
        address = source(address)
        now = self._clock()
        waits = [0.0]
        for key, limit in (((name, address), PER_NAME), (("", address), PER_ADDRESS)):
            times = self._recent(key, now)
            if len(times) >= limit:
                waits.append(times[-limit] + WINDOW - now)
        return max(waits)

    def failed(self, name: str, address: str) -> float:
        """Count an attempt as failed (before its password is checked); returns its mark."""
        address = source(address)
        now = self._clock()
        for key in ((name, address), ("", address)):
            if key not in self._fails and len(self._fails) >= MAX_KEYS:
                del self._fails[next(iter(self._fails))]
            self._fails.setdefault(key, deque(maxlen=PER_ADDRESS)).append(now)
        return now

    def succeeded(self, name: str, address: str, mark: float | None = None) -> None:
        """The attempt marked ``mark`` succeeded: it no longer counts, nor do the name's
        earlier failures from that address."""
        address = source(address)
        self._fails.pop((name, address), None)
        shared = self._fails.get(("", address))
        if mark is not None and shared is not None and mark in shared:
            shared.remove(mark)


def source(address: str) -> str:
    """Whom to count: an IPv4 address, or the /64 of an IPv6 one (one host has them all)."""
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return address
    if ip.version == 6:
        return str(ipaddress.ip_network(f"{ip}/64", strict=False))
    return str(ip)
