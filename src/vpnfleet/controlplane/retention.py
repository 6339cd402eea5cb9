"""Audit retention: delete flows and denied attempts older than the configured horizon.

Deletion runs in small transactions (``BATCH`` rows each, with a short pause between them)
so that pruning a large backlog never holds a long lock: SQLite has one writer, and agents
keep writing flows while the prune runs.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI
from sqlalchemy import and_, delete, or_, select
from sqlalchemy.orm import Session, sessionmaker
from starlette.concurrency import run_in_threadpool

from vpnfleet.controlplane.models import DeniedAttempt, Flow, utcnow

log = logging.getLogger("vpnfleet.retention")

BATCH = 10_000
PAUSE = 0.05  # least rest between batches, in seconds: lets waiting writers in
FIRST_RUN_DELAY = 30.0  # after start, so a restart loop does not prune in a loop
INTERVAL = 3600.0


@dataclass
class Pruned:
    """Rows one prune removed."""

    flows: int = 0
    denied: int = 0


def horizon(days: int, now: dt.datetime | None = None) -> dt.datetime:
    """The oldest time still kept with a retention of ``days``."""
    return (now or utcnow()) - dt.timedelta(days=days)


def _delete_batch(factory: sessionmaker[Session], stmt: Any) -> int:
    # Core execution: no ORM objects are loaded, so there is nothing to synchronize.
    with factory() as db, db.begin():
        result = db.connection().execute(stmt)
        return int(getattr(result, "rowcount", 0) or 0)


def _statements(before: dt.datetime, batch: int) -> list[tuple[str, Any]]:
    # "id IN (SELECT id ... LIMIT n)" bounds each transaction on both dialects; the inner
    # select walks the start_at (first_at) index from the oldest row.
    old_flows = (
        select(Flow.id)
        .where(Flow.start_at < before, or_(Flow.end_at.is_(None), Flow.end_at < before))
        .limit(batch)
    )
    old_denied = (
        select(DeniedAttempt.id)
        .where(and_(DeniedAttempt.first_at < before, DeniedAttempt.last_at < before))
        .limit(batch)
    )
    return [
        ("flows", delete(Flow).where(Flow.id.in_(old_flows))),
        ("denied", delete(DeniedAttempt).where(DeniedAttempt.id.in_(old_denied))),
    ]


def prune(
    factory: sessionmaker[Session],
    before: dt.datetime,
    *,
    batch: int = BATCH,
    pause: float = PAUSE,
) -> Pruned:
    """Delete flows that ended (or, never ended, started) before ``before`` and denied attempts
    last seen before it, ``batch`` rows per transaction. Blocking; the server uses
    :func:`prune_async`.

    A flow that started before the horizon but is still open, or ended after it, stays: it can
    still answer for times after the horizon. (One whose end record was lost is deleted, since
    its start is old; should the end arrive later, it brings a complete row back.)
    """
    done = Pruned()
    for what, stmt in _statements(before, batch):
        while True:
            started = time.monotonic()
            n = _delete_batch(factory, stmt)
            setattr(done, what, getattr(done, what) + n)
            if n < batch:
                break
            time.sleep(_rest(pause, started))
    return done


def _rest(pause: float, started: float) -> float:
    # Rest at least as long as the batch held the lock: on SQLite (one writer) agents then
    # get at least half of the write time even while a large backlog is pruned.
    return max(pause, time.monotonic() - started)


async def prune_async(
    factory: sessionmaker[Session],
    before: dt.datetime,
    *,
    batch: int = BATCH,
    pause: float = PAUSE,
) -> Pruned:
    """:func:`prune` with each batch in a worker thread: cancellable between batches, so a
    shutdown never waits for a long backlog."""
    done = Pruned()
    for what, stmt in _statements(before, batch):
        while True:
            started = time.monotonic()
            n = await run_in_threadpool(_delete_batch, factory, stmt)
            setattr(done, what, getattr(done, what) + n)
            if n < batch:
                break
            await asyncio.sleep(_rest(pause, started))
    return done


async def run_retention(
    factory: sessionmaker[Session],
    days: int,
    *,
    first_delay: float = FIRST_RUN_DELAY,
    interval: float = INTERVAL,
) -> None:
    """Prune now and then, forever (cancel the task to stop)."""
    await asyncio.sleep(first_delay)
    while True:
        started = time.monotonic()
        before = horizon(days)
        try:
            done = await prune_async(factory, before)
        except Exception as exc:
            # A database hiccup must not end retention for good: try again next time.
            log.error(
                "audit retention failed: %s; retrying in %.0f s", type(exc).__name__, interval
            )
        else:
            log.info(
                "audit retention (%d days): deleted %d flows and %d denied attempts "
                "older than %s in %.1f s",
                days,
                done.flows,
                done.denied,
                before.isoformat(),
                time.monotonic() - started,
            )
        await asyncio.sleep(interval)


@contextlib.asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    """Run the retention task while the app serves, when a retention is configured."""
    state = app.state.vpnfleet
    days = state.settings.audit_retention_days
    task = None
    if days:
        log.info("audit retention: flows and denied attempts are kept %d days", days)
        task = asyncio.create_task(run_retention(state.factory, days), name="audit-retention")
    try:
        yield
    finally:
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
