"""Watch fan-out: one poller per control-plane process feeds every watch stream.

The change log lives in the database, so replicas that share one PostgreSQL see the same
revisions. Each process polls the log (cheap: an indexed `id > last` query) or is woken by a
local commit, keeps the most recent events in memory and serves every subscriber from there.
A subscriber too far behind the log's oldest kept row is told to resync.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import json
import logging
from collections.abc import AsyncIterator
from typing import Any

from sqlalchemy import delete, func, select
from sqlalchemy.orm import Session, sessionmaker
from starlette.concurrency import run_in_threadpool

from vpnfleet.controlplane.models import Change

log = logging.getLogger("vpnfleet.watch")

BUFFER = 10_000
BATCH = 1_000


def change_event(row: Change) -> dict[str, Any]:
    return {
        "type": "change",
        "revision": row.id,
        "at": row.at.isoformat(),
        "kind": row.kind,
        "op": row.op,
        "id": row.object_id,
        "data": row.data,
    }


class ChangeHub:
    """Tails the change log and fans events out to subscribers."""

    def __init__(
        self, factory: sessionmaker[Session], poll_interval: float = 0.2, keep: int = 100_000
    ) -> None:
        self._factory = factory
        self._poll = poll_interval
        self._keep = keep
        # Newest events, ascending by revision; trimmed to BUFFER..2*BUFFER entries.
        self._events: list[dict[str, Any]] = []
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

    def _fetch(self, after: int, limit: int = BATCH) -> list[dict[str, Any]]:
        with self._factory() as db:
            rows = db.scalars(
                select(Change).where(Change.id > after).order_by(Change.id).limit(limit)
            ).all()
            return [change_event(r) for r in rows]

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
                    self._head = events[-1]["revision"]
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

    async def subscribe(self, since: int, heartbeat: float) -> AsyncIterator[dict[str, Any]]:
        """Events after revision `since`, forever; `resync` if `since` is no longer served."""
        oldest = await run_in_threadpool(self._min_revision)
        if since > self._head or (oldest and since < oldest - 1):
            yield {"type": "resync", "revision": self._head}
            since = self._head
        # Catch up from the database while the gap is wider than the in-memory buffer.
        while True:
            first = self._events[0]["revision"] if self._events else self._head + 1
            if since + 1 >= first:
                break
            batch = await run_in_threadpool(self._fetch, since)
            if not batch:
                break
            for ev in batch:
                yield ev
            since = batch[-1]["revision"]
        while True:
            # Binary search: subscribers wake on every change, the buffer holds thousands.
            start = bisect.bisect_right(self._events, since, key=lambda e: int(e["revision"]))
            pending = self._events[start:]
            if pending:
                for ev in pending:
                    yield ev
                since = pending[-1]["revision"]
                continue
            if not await self._wait_past(since, heartbeat):
                yield {"type": "heartbeat", "revision": self._head}

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


def ndjson(event: dict[str, Any]) -> bytes:
    return (json.dumps(event, separators=(",", ":"), default=str) + "\n").encode()
