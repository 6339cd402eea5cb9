"""Watch fan-out: one poller per control-plane process feeds every watch stream.

The change log lives in the database, so replicas that share one PostgreSQL see the same
revisions. Each process polls the log (cheap: an indexed `id > last` query) or is woken by a
local commit, keeps the most recent events in memory and serves every subscriber from there.
A subscriber too far behind the log's oldest kept row is told to resync.

Rows are served as typed messages (vpnfleet.wire). A row that does not read as a change event
(written by an older version before an upgrade, or by hand) is not skipped, which would leave
subscribers silently wrong, and not fatal: a subscriber that reaches it is told to resync, and
the snapshot it fetches then holds the state that row described.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass

from sqlalchemy import delete, func, select
from sqlalchemy.orm import Session, sessionmaker
from starlette.concurrency import run_in_threadpool

from vpnfleet.controlplane.changelog import event_from_row
from vpnfleet.controlplane.models import Change
from vpnfleet.wire import ChangeEvent, WatchHeartbeat, WatchMessage, WatchResync

log = logging.getLogger("vpnfleet.watch")

BUFFER = 10_000
BATCH = 1_000


@dataclass(frozen=True)
class Unreadable:
    """A change-log row that is not a valid change event: subscribers resync past it."""

    revision: int
    problem: str


Entry = ChangeEvent | Unreadable


def read_row(row: Change) -> Entry:
    try:
        return event_from_row(row)
    except ValueError as exc:
        log.warning(
            "change-log row %d (%s/%s) is unreadable; watchers past it resync: %s",
            row.id,
            row.kind,
            row.op,
            exc,
        )
        return Unreadable(row.id, str(exc))


class ChangeHub:
    """Tails the change log and fans events out to subscribers."""

    def __init__(
        self, factory: sessionmaker[Session], poll_interval: float = 0.2, keep: int = 100_000
    ) -> None:
        self._factory = factory
        self._poll = poll_interval
        self._keep = keep
        # Newest events, ascending by revision; trimmed to BUFFER..2*BUFFER entries.
        self._events: list[Entry] = []
        self._head = 0  # highest revision seen
        # Set (and replaced by a fresh one) whenever the head moves. An Event, not a
        # Condition: a subscriber cancelled while waiting (its client went away) must not be
        # able to leave a lock behind. With Python 3.11's wait_for around Condition.wait, a
        # cancelled waiter could re-acquire the lock after its caller had left, and the
        # tailing task then blocked on it forever: no change reached any agent again.
        self._moved = asyncio.Event()
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    @property
    def head(self) -> int:
        return self._head

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._head = await run_in_threadpool(self._max_revision)
        self._task = asyncio.create_task(self._run(), name="change-hub")

    async def stop(self) -> None:
        if self._task:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    def poke(self) -> None:
        """Called from any thread after a local commit: poll now instead of at the next tick."""
        if self._loop is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self._wake.set)

    def _max_revision(self) -> int:
        with self._factory() as db:
            return int(db.scalar(select(func.coalesce(func.max(Change.id), 0))) or 0)

    def _min_revision(self) -> int:
        with self._factory() as db:
            return int(db.scalar(select(func.coalesce(func.min(Change.id), 0))) or 0)

    def _fetch(self, after: int, limit: int = BATCH) -> list[Entry]:
        with self._factory() as db:
            rows = db.scalars(
                select(Change).where(Change.id > after).order_by(Change.id).limit(limit)
            ).all()
            return [read_row(r) for r in rows]

    def _prune(self) -> int:
        with self._factory() as db, db.begin():
            cutoff = self._head - self._keep
            if cutoff <= 0:
                return 0
            result = db.execute(delete(Change).where(Change.id <= cutoff))
            return int(getattr(result, "rowcount", 0) or 0)

    async def _run(self) -> None:
        ticks = 0
        while True:
            try:
                events = await run_in_threadpool(self._fetch, self._head)
                if events:
                    self._events.extend(events)
                    if len(self._events) > 2 * BUFFER:
                        del self._events[:-BUFFER]
                    self._head = events[-1].revision
                    moved, self._moved = self._moved, asyncio.Event()
                    moved.set()
                    if len(events) == BATCH:
                        continue
                ticks += 1
                if ticks % 3000 == 0:  # about every 10 minutes at the default interval
                    pruned = await run_in_threadpool(self._prune)
                    if pruned:
                        log.info("pruned %d old change-log rows", pruned)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # the database may be briefly away; keep tailing
                log.warning("change log poll failed: %s", type(exc).__name__)
                await asyncio.sleep(1.0)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout=self._poll)
            self._wake.clear()

    async def subscribe(self, since: int, heartbeat: float) -> AsyncIterator[WatchMessage]:
        """Events after revision `since`, forever; a resync if `since` is no longer served or
        an unreadable row lies ahead (the stream then goes on from the head)."""
        oldest = await run_in_threadpool(self._min_revision)
        if since > self._head or (oldest and since < oldest - 1):
            yield WatchResync(revision=self._head)
            since = self._head
        # Catch up from the database while the gap is wider than the in-memory buffer.
        while True:
            first = self._events[0].revision if self._events else self._head + 1
            if since + 1 >= first:
                break
            batch = await run_in_threadpool(self._fetch, since)
            if not batch:
                break
            for entry in batch:
                if isinstance(entry, Unreadable):
                    yield WatchResync(revision=self._head)
                    since = max(self._head, entry.revision)
                    break
                yield entry
                since = entry.revision
        while True:
            # Binary search: subscribers wake on every change, the buffer holds thousands.
            start = bisect.bisect_right(self._events, since, key=lambda e: e.revision)
            pending = self._events[start:]
            if pending:
                for entry in pending:
                    if isinstance(entry, Unreadable):
                        yield WatchResync(revision=self._head)
                        since = max(self._head, entry.revision)
                        break
                    yield entry
                    since = entry.revision
                continue
            if not await self._wait_past(since, heartbeat):
                yield WatchHeartbeat(revision=self._head)

    async def _wait_past(self, revision: int, patience: float) -> bool:
        """Wait until the head moves past `revision`; False on timeout."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + patience
        while self._head <= revision:
            left = deadline - loop.time()
            if left <= 0:
                return False
            # asyncio.timeout, not wait_for: 3.11's wait_for can swallow a cancellation that
            # coincides with the wait ending, and a subscriber must stop when its client goes.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(left):
                    await self._moved.wait()
        return True


def ndjson(message: WatchMessage) -> bytes:
    """One line of the watch stream."""
    return (message.model_dump_json() + "\n").encode()
