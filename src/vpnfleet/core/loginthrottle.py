"""Rate limits of console sign-ins: failures counted per account name and per address.

After ``PER_NAME`` failures for one name from one address within ``WINDOW``, or ``PER_ADDRESS``
failures from one address for any names, further attempts from there are refused (429) until
the oldest failure leaves the window; they cost no password check. A success clears that
name's count for that address. Kept in memory of each replica: with R replicas behind a
load balancer a guesser gets at most R times the budget, still a handful of guesses a minute
against passwords of 12+ characters (docs/console.md).
"""

from __future__ import annotations

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
        now = self._clock()
        waits = [0.0]
        for key, limit in (((name, address), PER_NAME), (("", address), PER_ADDRESS)):
            times = self._recent(key, now)
            if len(times) >= limit:
                waits.append(times[-limit] + WINDOW - now)
        return max(waits)

    def failed(self, name: str, address: str) -> None:
        now = self._clock()
        for key in ((name, address), ("", address)):
            if key not in self._fails and len(self._fails) >= MAX_KEYS:
                del self._fails[next(iter(self._fails))]
            self._fails.setdefault(key, deque(maxlen=PER_ADDRESS)).append(now)

    def succeeded(self, name: str, address: str) -> None:
        self._fails.pop((name, address), None)
