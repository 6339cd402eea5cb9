"""Fleet snapshots built once for all the agents that ask while one is being built.

Every agent that starts, or resyncs, asks for the whole fleet view (`GET /agent/snapshot`).
With 20,000 users one costs a replica about a second of its CPU to read and serialize, so a
fleet asking at once (every pod after a control-plane outage, a rolling update of the pods)
queued for them: 20 agents at once waited 8 s for theirs (p50), and of 200 only 8 had theirs
after 4 minutes (docs/performance.md).

Requests are coalesced instead: the first starts a build; those that come while it runs wait
for the next build, which starts as soon as that one ends, and share it. So every request
gets a snapshot whose reading started after the request arrived (as fresh as if it had been
built for it alone: what it asked for never predates a change it already knew of), and a
storm of requests costs one build at a time, back to back, however many agents ask. A failed
build fails the requests waiting for it; the next request starts a new one.
"""

from __future__ import annotations

import asyncio
import gzip
import weakref
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Generic, TypeVar

from sqlalchemy.orm import Session, sessionmaker

from vpnfleet.controlplane import fleetstate
from vpnfleet.wire import Snapshot

T = TypeVar("T")
GZIP_LEVEL = 5


@dataclass(frozen=True)
class SnapshotBody:
    """A built snapshot as JSON, and gzipped (compressed once, sent to every agent asking:
    several times fewer bytes to encrypt, send and buffer per agent)."""

    json: bytes
    gzipped: bytes

    @classmethod
    def of(cls, snap: Snapshot) -> SnapshotBody:
        body = snap.model_dump_json().encode()
        return cls(body, gzip.compress(body, compresslevel=GZIP_LEVEL, mtime=0))


def read_snapshot(factory: sessionmaker[Session]) -> Snapshot:
    """The fleet snapshot, read in one read-only transaction of `factory`'s."""
    with factory() as db:
        if db.get_bind().dialect.name == "postgresql":
            # One view of the database for all its reads: under READ COMMITTED a change
            # committed between the revision's read and the users' would be in the snapshot
            # and replayed on top of it by the watch from that revision (a user disabled, then
            # enabled again, read enabled: the replay kicks them). SQLite's read transaction
            # sees one view already.
            db.connection(execution_options={"isolation_level": "REPEATABLE READ"})
        try:
            return fleetstate.build_snapshot(db)
        finally:
            db.rollback()


@dataclass
class _Builds(Generic[T]):
    running: asyncio.Task[T] | None = None  # reading and serializing now
    waiting: asyncio.Task[T] | None = None  # starts when `running` ends; takes newcomers


class SnapshotCache(Generic[T]):
    """Coalesces snapshot builds, per event loop (a server has one; tests may start several)."""

    def __init__(self, build: Callable[[], Awaitable[T]]) -> None:
        self._build = build
        self._loops: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _Builds[T]] = (
            weakref.WeakKeyDictionary()
        )
        self.builds = 0  # snapshots built (the replica's metrics show them)
        self.shared = 0  # requests answered with a build another request started

    async def get(self) -> T:
        """A snapshot whose build started after this call."""
        loop = asyncio.get_running_loop()
        builds = self._loops.setdefault(loop, _Builds())
        if builds.waiting is not None:
            self.shared += 1
            task = builds.waiting
        elif builds.running is not None and not builds.running.done():
            task = builds.waiting = loop.create_task(self._after(builds, builds.running))
        else:
            task = builds.running = loop.create_task(self._counted())
        # Shielded: a request that gives up does not cancel a build others wait for.
        return await asyncio.shield(task)

    async def _after(self, builds: _Builds[T], before: asyncio.Task[T]) -> T:
        await asyncio.wait([before])  # whatever became of it
        builds.running, builds.waiting = builds.waiting, None  # this one; newcomers wait anew
        return await self._counted()

    async def _counted(self) -> T:
        out = await self._build()
        self.builds += 1
        return out
