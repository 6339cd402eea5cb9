"""One fleet snapshot serves every agent that asks for one within a moment.

Every agent that starts, or resyncs after its stream fell too far behind, asks for the whole
fleet view (`GET /agent/snapshot`). With 20,000 users one costs a replica about a second of its
CPU to read and serialize, so a fleet asking at once (every pod after a control-plane outage, a
rolling update of the pods) queued for it: 20 agents at once waited 6.8 s for theirs (p50), and
200 would wait minutes while heartbeats starve (docs/performance.md).

An agent's snapshot need not be the newest one: the agent watches the change log from the
snapshot's revision on, so every later change reaches it anyway. So agents ask with
``max_age`` (seconds): a replica answers them with the snapshot it built last if that build
started at most that long ago, or with the build under way if that one did, and starts a
build only otherwise. A request without ``max_age`` (an operator's, a test's) gets a snapshot
built after it arrived, as before. A failed build fails the requests waiting for it and is
not kept.
"""

from __future__ import annotations

import asyncio
import time
import weakref
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Generic, TypeVar

MAX_AGE_LIMIT = 10.0  # the oldest snapshot a request may accept, seconds
T = TypeVar("T")


@dataclass(frozen=True)
class _Build(Generic[T]):
    started: float  # clock(): when its build started (before its revision was read)
    task: asyncio.Task[T]


class SnapshotCache(Generic[T]):
    """The latest built snapshot (whatever `build` makes of it: its serialized forms), and
    the builds under way, per event loop."""

    def __init__(
        self,
        build: Callable[[], Awaitable[T]],
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._build = build
        self._clock = clock
        self._latest: tuple[float, T] | None = None  # when its build started, what it made
        self._newest: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _Build[T]] = (
            weakref.WeakKeyDictionary()
        )
        self.builds = 0  # snapshots built (the replica's metrics show it)
        self.shared = 0  # requests answered with another request's snapshot

    async def get(self, max_age: float = 0.0) -> T:
        """A snapshot whose build started at most `max_age` seconds before now; with 0, one
        whose build starts now."""
        if not 0.0 <= max_age <= MAX_AGE_LIMIT:
            raise ValueError(f"max_age must be between 0 and {MAX_AGE_LIMIT:g} seconds")
        now = self._clock()
        latest = self._latest
        if max_age > 0 and latest is not None and now - latest[0] <= max_age:
            self.shared += 1
            return latest[1]
        loop = asyncio.get_running_loop()
        build = self._newest.get(loop)
        if (
            max_age > 0
            and build is not None
            and not build.task.done()
            and now - build.started <= max_age
        ):
            self.shared += 1
            return await asyncio.shield(build.task)
        build = _Build(now, loop.create_task(self._rebuild(now)))
        self._newest[loop] = build
        # Shielded: a request that gives up does not cancel a build others may wait for.
        return await asyncio.shield(build.task)

    async def _rebuild(self, started: float) -> T:
        body = await self._build()
        self.builds += 1
        latest = self._latest
        if latest is None or latest[0] <= started:  # an older, slower build never replaces it
            self._latest = (started, body)
        return body
